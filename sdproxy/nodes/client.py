"""NodeClient: the only code that talks HTTP to webui nodes.

It knows how to call a node and what its answers mean as errors; what a failure means for the
node's health is the cluster's business (cluster/state.py).
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from http import HTTPStatus
from typing import Any

import aiohttp
import orjson
from yarl import URL

from sdproxy.config import NodeSettings, SchedulerSettings
from sdproxy.core.answers import (
    MAX_ANSWER_DEPTH,
    AnswerBudget,
    is_webui_error,
    nested_deeper_than,
    webui_answers_status,
)
from sdproxy.errors import (
    NodeAnswerTooLarge,
    NodeAuthFailed,
    NodeBadResponse,
    NodeRaised,
    NodeRejected,
    NodeTimeout,
    NodeUnexpectedStatus,
    NodeUnreachable,
)

_DECODE_IN_THREAD_BYTES = 1 << 20
_JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}
# What a node without the route answers (starlette's default): for the routes every webui
# serving its API has, that means the node is not one.
_NO_ROUTE = ({"detail": "Not Found"}, {"detail": "Method Not Allowed"})


class NodeClient:
    """Calls one webui node's API over the app's shared ClientSession.

    Every aiohttp and timeout error is turned into a NodeError here, and only here.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        settings: NodeSettings,
        scheduler: SchedulerSettings,
    ) -> None:
        self.settings = settings
        self.name = settings.name
        self._session = session
        self._base = URL(settings.base_url)
        self._connect_timeout_s = scheduler.connect_timeout_s
        self._max_answer_bytes = scheduler.max_node_answer_bytes
        self._bytes_per_pixel = scheduler.node_answer_bytes_per_pixel
        # Given explicitly, so aiohttp adds no Accept-Encoding of its own.
        self._headers = {**_JSON_HEADERS, "Accept-Encoding": scheduler.node_accept_encoding}
        if settings.username is not None and settings.password is not None:
            password = settings.password.get_secret_value()
            self._headers["Authorization"] = aiohttp.encode_basic_auth(settings.username, password)
        self._ssl = tls_context(settings)

    def url(self, path: str) -> URL:
        """The node's URL for ``path`` (relative, e.g. ``sdapi/v1/txt2img``)."""
        return self._base / path

    async def generate(
        self, kind: str, body: dict[str, Any], timeout_s: float, budget: AnswerBudget | None = None
    ) -> Any:
        """POST a txt2img/img2img body; the decoded JSON answer, read up to ``budget``.

        Without a budget (a benchmark run) the answer may take max_node_answer_mb.
        """
        data = orjson.dumps(body)
        limit = self._max_answer_bytes
        if budget is not None:
            limit = budget.limit_bytes(len(data), self._bytes_per_pixel, self._max_answer_bytes)
        return await self._call(
            "POST", f"sdapi/v1/{kind}", data, timeout_s, limit_bytes=limit, webui_route=True
        )

    async def probe(self, timeout_s: float) -> None:
        """One cheap call that works on a busy node too; raises NodeError if it fails."""
        await self._call(
            "GET",
            "sdapi/v1/progress",
            None,
            timeout_s,
            params={"skip_current_image": "true"},
            webui_route=True,
        )

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        timeout_s: float,
        params: dict[str, str] | None = None,
    ) -> Any:
        """One call to the node; the decoded JSON answer (at most max_node_answer_mb), or a
        NodeError."""
        data = orjson.dumps(body) if body is not None else None
        return await self._call(method, path, data, timeout_s, params=params)

    async def _call(
        self,
        method: str,
        path: str,
        data: bytes | None,
        timeout_s: float,
        *,
        params: dict[str, str] | None = None,
        limit_bytes: int | None = None,
        webui_route: bool = False,
    ) -> Any:
        """Send one request and classify what comes back.

        Redirects are never followed (a 3xx is node trouble). At most ``limit_bytes`` of the
        answer are read: more (announced or sent) is NodeAnswerTooLarge. ``webui_route``: a
        route every webui serving its API has, so "Not Found" there means it is not one.
        """
        limit = self._max_answer_bytes if limit_bytes is None else limit_bytes
        timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=self._connect_timeout_s)
        try:
            async with self._session.request(
                method,
                self.url(path),
                data=data,
                params=params,
                headers=self._headers,
                timeout=timeout,
                ssl=self._ssl,
                allow_redirects=False,
            ) as resp:
                raw = await self._read_capped(resp, limit)
                status = resp.status
                location = resp.headers.get("Location")
        except TimeoutError as exc:
            raise NodeTimeout(self.name, f"no answer within {timeout_s:g} s") from exc
        except aiohttp.ClientConnectorCertificateError as exc:
            reason = getattr(exc.certificate_error, "verify_message", None) or "not trusted"
            raise NodeUnreachable(self.name, f"TLS certificate rejected: {reason}") from exc
        except aiohttp.ClientConnectorError as exc:
            raise NodeUnreachable(self.name, f"cannot connect: {_os_error(exc.os_error)}") from exc
        except aiohttp.ClientError as exc:
            raise NodeUnreachable(self.name, f"connection failed: {type(exc).__name__}") from exc
        if len(raw) > _DECODE_IN_THREAD_BYTES:  # a batch of images: keep the event loop free
            return await asyncio.to_thread(self._decode, status, raw, location, webui_route)
        return self._decode(status, raw, location, webui_route)

    async def _read_capped(self, resp: aiohttp.ClientResponse, limit: int) -> bytearray:
        """The body, read as it comes, never more than ``limit`` bytes of it."""
        if resp.content_length is not None and resp.content_length > limit:
            resp.close()  # do not read (or keep the connection for) what was announced
            raise NodeAnswerTooLarge(self.name, limit)
        buffer = bytearray()
        async for chunk in resp.content.iter_any():
            buffer += chunk
            if len(buffer) > limit:
                resp.close()
                raise NodeAnswerTooLarge(self.name, limit)
        return buffer

    def _decode(self, status: int, raw: bytearray, location: str | None, webui_route: bool) -> Any:
        """The answer of a 200, or the NodeError its status and body mean (errors.py)."""
        payload = self._json(raw)
        if status == 200:
            if payload is _NOT_JSON:
                raise NodeBadResponse(self.name, "answered 200 with a body that is not JSON")
            if payload is _TOO_DEEP:
                raise NodeBadResponse(
                    self.name, f"answered JSON nested deeper than {MAX_ANSWER_DEPTH} levels"
                )
            return payload
        if status in (401, 403):
            # Not the client's fault: passing the 401 on would blame the client's credentials.
            raise NodeAuthFailed(
                self.name,
                f"refused sdproxy's credentials ({status} {_error_text(payload)}): "
                "check username and password for this node",
            )
        no_route = status in (404, 405) and payload in _NO_ROUTE
        if is_webui_error(status, payload) and not (webui_route and no_route):
            if status == 500:
                raise NodeRaised(self.name, payload)
            raise NodeRejected(self.name, status, payload)
        raise NodeUnexpectedStatus(self.name, status, _not_webui(status, payload, location))

    @staticmethod
    def _json(raw: bytearray) -> Any:
        try:
            payload = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return _NOT_JSON
        return _TOO_DEEP if nested_deeper_than(payload, MAX_ANSWER_DEPTH) else payload


def tls_context(settings: NodeSettings) -> ssl.SSLContext | bool:
    """The TLS settings for requests to one node, built once; True: aiohttp's default."""
    if settings.url.scheme != "https":
        return True
    cafile = str(settings.ca_file) if settings.ca_file is not None else None
    context = ssl.create_default_context(cafile=cafile)
    if not settings.verify_tls:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class _Unusable:
    """A body that cannot be passed on: not JSON, or nested too deep."""

    def __init__(self, what: str) -> None:
        self.what = what


_NOT_JSON = _Unusable("a body that is not JSON")
_TOO_DEEP = _Unusable(f"JSON nested deeper than {MAX_ANSWER_DEPTH} levels")


def _not_webui(status: int, payload: Any, location: str | None) -> str:
    """Why an answer that is not the webui's is node trouble, without echoing the node's text."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "unknown status"
    if 300 <= status < 400:
        return f"{phrase}: a redirect{_origin(location)}, not followed"
    if not webui_answers_status(status):
        return f"{phrase}: a status the webui does not answer (a server in the way?)"
    if isinstance(payload, _Unusable):
        return f"{phrase}, with {payload.what}"
    if status in (404, 405) and payload in _NO_ROUTE:
        return f"{phrase}: no such route (not a webui serving its API? start it with --api)"
    return f"{phrase}, with a body that is not the webui's"


def _os_error(error: OSError) -> str:
    """Why a connection failed, without the address it was made to: the OS names the node's
    host and port ("Connect call failed ('10.0.0.5', 7860)"), and error texts go to clients,
    into the logs and into the state shared in Redis, which holds no node URL."""
    if isinstance(error, socket.gaierror):
        return str(error)  # "[Errno -2] Name or service not known": no address in it
    if error.errno is not None and error.errno > 0:
        return os.strerror(error.errno)  # "Connection refused"
    return type(error).__name__  # "Multiple exceptions: ..." lists every address


def _origin(location: str | None) -> str:
    """ " to scheme://host:port" of a redirect's target (no path or query: they may hold tokens)."""
    try:
        url = URL(location or "")
        return f" to {url.origin()}" if url.absolute and url.host else ""
    except ValueError:
        return ""


def _error_text(payload: Any) -> str:
    """The message of a webui error body, or a short description of an unexpected one."""
    if isinstance(payload, dict):
        for key in ("errors", "detail", "message", "error"):
            value = payload.get(key)
            if isinstance(value, str) and value:
                return value[:200]
    return "unexpected body"
