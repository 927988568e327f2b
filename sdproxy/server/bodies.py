"""Request bodies: the size limit before reading, reading with a deadline, JSON in and out."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Middleware

from sdproxy.config import ServerSettings
from sdproxy.errors import (
    BodyTimeout,
    BodyTooLarge,
    ClientGone,
    RequestValidationError,
    validation_error,
)
from sdproxy.server.keys import settings_key

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def body_too_large(server: ServerSettings) -> BodyTooLarge:
    return BodyTooLarge(f"request body larger than {server.max_body_mb:g} MiB")


def body_limit_middleware(server: ServerSettings) -> Middleware:
    """413 before reading a byte when Content-Length already says the body is too large.

    Bodies without a Content-Length (chunked) are cut off by aiohttp's ``client_max_size``
    once they pass the limit while being read; the error middleware answers that 413 too.
    """
    limit = server.max_body_bytes

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        length = request.content_length
        if length is not None and length > limit:
            raise body_too_large(server)
        return await handler(request)

    return middleware


def json_response(
    payload: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """A JSON response serialized with orjson (``null`` included, as the webui sends it)."""
    return web.Response(
        body=orjson.dumps(payload), status=status, headers=headers, content_type="application/json"
    )


async def read_body(request: web.Request) -> bytes:
    """The request's raw body; 408 when it takes longer than ``body_timeout_s`` to arrive.

    Handlers read bodies only through here (or read_json), so a slow client cannot hold a
    handler for longer than that.
    """
    timeout_s = request.app[settings_key].server.body_timeout_s
    try:
        async with asyncio.timeout(timeout_s):
            return await request.read()
    except TimeoutError:
        raise BodyTimeout(f"the request body did not arrive within {timeout_s:g} s") from None
    except ConnectionResetError:
        raise ClientGone("the client closed the connection before its body arrived") from None


async def read_json(request: web.Request) -> Any:
    """The request's JSON body; FastAPI's 422 shapes for a missing or malformed one."""
    raw = await read_body(request)
    if not raw.strip():
        raise RequestValidationError(
            [validation_error(["body"], "field required", "value_error.missing")]
        )
    try:
        return orjson.loads(raw)
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
