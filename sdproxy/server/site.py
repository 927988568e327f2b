"""Serving an aiohttp app on a TCP port: connection limits, start-up, graceful stop."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from sdproxy.config import ServerSettings, Settings
from sdproxy.server.app import create_app

LINGERING_S = 2.0


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
        # Bodies are inflated by bodies.read_body, with the size limit on the inflated bytes
        # and a 4xx for what it cannot decode (aiohttp's own answers plain text, or logs).
        "auto_decompress": False,
    }


async def start_site(
    app: web.Application,
    host: str,
    port: int,
    *,
    shutdown_timeout_s: float = 30.0,
    handler_cancellation: bool = False,
    **server_args: Any,
) -> web.AppRunner:
    """Serve ``app`` on host:port; the caller owns the runner's cleanup().

    cleanup() stops accepting connections, waits up to ``shutdown_timeout_s`` for requests in
    flight, then cancels them. ``handler_cancellation`` cancels a handler whose client has
    disconnected (aiohttp does not by default). ``server_args`` go to aiohttp's request handler
    (see limits.connection_limits).
    """
    runner = web.AppRunner(
        app,
        access_log=None,
        shutdown_timeout=shutdown_timeout_s,
        handler_cancellation=handler_cancellation,
        **server_args,
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError:
        await runner.cleanup()
        raise
    return runner


async def start_proxy(settings: Settings, host: str, port: int) -> web.AppRunner:
    """Serve sdproxy: handlers of departed clients are cancelled, shutdown waits the grace."""
    return await start_site(
        create_app(settings),
        host,
        port,
        shutdown_timeout_s=settings.server.shutdown_grace_s,
        handler_cancellation=True,
        **connection_limits(settings.server),
    )
