"""Request bodies: size and encoding checks before reading, reading with a deadline, JSON in/out.

Every body sdproxy reads comes through ``read_body`` (and ``read_json``), in this order:

1. the middleware, after authentication: an Expect other than ``100-continue`` is 417, a
   Content-Encoding sdproxy does not decode is 415, a Content-Length over the limit is 413;
2. ``100 Continue`` is sent only now, so a client that waits for it never sends a body to a
   request that will be refused (aiohttp's own handler would answer it before any middleware);
3. the raw body is read with ``body_timeout_s`` and ``max_body_mb`` (aiohttp's own inflating is
   off, see ``site.connection_limits``), then inflated here with the same limit on the inflated
   size: a 50 KB deflate body cannot become a 50 MB prompt;
4. JSON is decoded and refused beyond ``core.jsondepth.MAX_DEPTH`` levels of nesting.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import HttpVersion11, hdrs, web
from aiohttp.typedefs import Middleware

from sdproxy.config import ServerSettings
from sdproxy.core.jsondepth import depth_error
from sdproxy.errors import (
    BodyTimeout,
    BodyTooLarge,
    ClientError,
    ClientGone,
    RequestValidationError,
    validation_error,
)
from sdproxy.server.keys import settings_key

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Content codings sdproxy inflates (zlib's window bits); "identity" means none.
DECODED = {"gzip": zlib.MAX_WBITS | 16, "x-gzip": zlib.MAX_WBITS | 16, "deflate": zlib.MAX_WBITS}
BAD_BODY = "There was an error parsing the body"  # FastAPI's words for a body it cannot read
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_continued_key = web.RequestKey("continued", bool)


class BadBody(ClientError):
    """The body cannot be read (a corrupt compressed stream, broken chunking): FastAPI's 400."""

    status, error_name = 400, "HTTPException"


class UnsupportedEncoding(ClientError):
    """The body has a Content-Encoding sdproxy does not decode (RFC 9110: 415)."""

    status, error_name = 415, "HTTPException"


class ExpectationFailed(ClientError):
    """An Expect header other than 100-continue (RFC 9110: 417)."""

    status, error_name = 417, "HTTPException"


def body_too_large(server: ServerSettings) -> BodyTooLarge:
    return BodyTooLarge(f"request body larger than {server.max_body_mb:g} MiB")


def content_coding(request: web.BaseRequest) -> str | None:
    """The body's one content coding (None: identity); 415 for anything sdproxy cannot inflate."""
    codings = [
        token.strip().lower()
        for value in request.headers.getall(hdrs.CONTENT_ENCODING, ())
        for token in value.split(",")
    ]
    codings = [coding for coding in codings if coding not in ("", "identity")]
    if not codings:
        return None
    if len(codings) > 1 or codings[0] not in DECODED:
        # The client's header is not echoed: only sdproxy's own words reach the answer.
        raise UnsupportedEncoding("unsupported Content-Encoding: send gzip, deflate or none")
    return codings[0]


def body_limit_middleware(server: ServerSettings) -> Middleware:
    """Expect, Content-Encoding and Content-Length checked before a byte of the body is read.

    Bodies without a Content-Length (chunked) are cut off by aiohttp's ``client_max_size``
    once they pass the limit while being read; the error middleware answers that 413 too.
    """
    limit = server.max_body_bytes

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        expect = request.headers.get(hdrs.EXPECT)
        if expect is not None and expect.strip().lower() != "100-continue":
            raise ExpectationFailed("the only expectation understood is 100-continue")
        if request.can_read_body:
            content_coding(request)
        length = request.content_length
        if length is not None and length > limit:
            raise body_too_large(server)
        return await handler(request)

    return middleware


async def defer_continue(_: web.Request) -> None:
    """Every route's expect handler: no ``100 Continue`` before the checks (read_body sends it)."""


def defer_expect_continue(app: web.Application) -> None:
    """Make every route wait with ``100 Continue`` until its body is read, after authentication.

    aiohttp runs a route's expect handler before any middleware, and its default answers
    ``100 Continue`` at once; routes take another only when added, hence this pass over them.
    """
    for route in app.router.routes():
        if isinstance(route, web.ResourceRoute):
            route._expect_handler = defer_continue  # aiohttp has no public setter


def json_response(
    payload: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """A JSON response serialized with orjson (``null`` included, as the webui sends it)."""
    return web.Response(
        body=orjson.dumps(payload), status=status, headers=headers, content_type="application/json"
    )


async def read_body(request: web.Request) -> bytes:
    """The request's body, inflated; 408 when it takes longer than ``body_timeout_s`` to arrive.

    Handlers read bodies only through here (or read_json), so a slow client cannot hold a
    handler for longer than that, and no body passes the size limit once inflated.
    """
    server = request.app[settings_key].server
    coding = content_coding(request)
    if _waits_for_continue(request):
        request[_continued_key] = True
        await request.writer.write(_CONTINUE)
        request.writer.output_size = 0  # as aiohttp's own handler: the answer starts after
    try:
        async with asyncio.timeout(server.body_timeout_s):
            raw = await request.read()
    except TimeoutError:
        timeout_s = server.body_timeout_s
        raise BodyTimeout(f"the request body did not arrive within {timeout_s:g} s") from None
    except ConnectionResetError:
        raise ClientGone("the client closed the connection before its body arrived") from None
    if coding is None or not raw:
        return raw
    return await asyncio.to_thread(inflate, raw, DECODED[coding], server)


def _waits_for_continue(request: web.Request) -> bool:
    expect = request.headers.get(hdrs.EXPECT, "").strip().lower()
    wanted = expect == "100-continue" and request.version >= HttpVersion11
    return wanted and not request.get(_continued_key)


def inflate(raw: bytes, wbits: int, server: ServerSettings) -> bytes:
    """``raw`` decompressed, never past the body limit; BadBody if the stream is broken."""
    limit = server.max_body_bytes
    if wbits == zlib.MAX_WBITS and raw[0] & 0x0F != 8:
        wbits = -zlib.MAX_WBITS  # "deflate" sent raw, without the zlib header (common)
    decompressor = zlib.decompressobj(wbits)
    try:
        body = decompressor.decompress(raw, limit + 1)
    except zlib.error:
        raise BadBody(BAD_BODY) from None
    if len(body) > limit:
        raise body_too_large(server)
    if not decompressor.eof or decompressor.unused_data:
        raise BadBody(BAD_BODY)  # cut short, or followed by something that is not the stream
    return body


async def read_json(request: web.Request) -> Any:
    """The request's JSON body; FastAPI's 422 shapes for a missing or malformed one.

    Nesting deeper than ``MAX_DEPTH`` is refused here, before anything walks the body.
    """
    raw = await read_body(request)
    if not raw.strip():
        raise RequestValidationError(
            [validation_error(["body"], "field required", "value_error.missing")]
        )
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RequestValidationError(
            [
                validation_error(
                    ["body", exc.pos],
                    f"{exc.msg}: line {exc.lineno} column {exc.colno} (char {exc.pos})",
                    "value_error.jsondecode",
                    msg=exc.msg,
                    pos=exc.pos,
                    lineno=exc.lineno,
                    colno=exc.colno,
                )
            ]
        ) from None
    too_deep = depth_error(body)
    if too_deep is not None:
        raise RequestValidationError([too_deep])
    return body
