"""Limits on what clients send: body size before it is read, connection-level server limits."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from sdproxy.config import ServerSettings
from sdproxy.errors import BodyTooLarge

LINGERING_S = 2.0

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


def connection_limits(server: ServerSettings) -> dict[str, Any]:
    """Keyword arguments for ``web.AppRunner``: request head size, keep-alive.

    aiohttp applies ``keepalive_timeout`` from the moment a connection opens, and whenever it
    waits for the next request head, so it is also the deadline for a slow client's headers.
    """
    return {
        # After answering a request whose body was not read (413, 401, 408), aiohttp reads and
        # discards the rest this long, so the client sees the answer rather than a reset.
        "lingering_time": LINGERING_S,
        "max_line_size": server.max_line_size,
        "max_field_size": server.max_field_size,
        "max_headers": server.max_headers,
        "keepalive_timeout": server.keepalive_timeout_s,
    }
