"""Serving an aiohttp app on a TCP port: connection limits, malformed requests, graceful stop.

aiohttp answers a request head it cannot parse (a control character in a header, a header
over ``max_field_size``) in plain text quoting the offending bytes, and logs it at ERROR with a
traceback and the raw header line: an ``Authorization`` header would reach the log whole. Its
request handler is replaced here (``_RequestHandler``): such requests get the webui's JSON
error shape and one rate-limited access line naming only the kind of error
(``accesslog.BadRequestLog``); a broken body noticed after the answer is one rate-limited
warning. Nothing of the request itself is ever logged.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import (
    BadStatusLine,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
    PayloadEncodingError,
)
from aiohttp.web_log import AccessLogger

from sdproxy.config import ServerSettings, Settings
from sdproxy.errors import webui_error_body
from sdproxy.logs import RateLimitedLog
from sdproxy.server.accesslog import BadRequestLog
from sdproxy.server.app import create_app
from sdproxy.server.bodies import json_response
from sdproxy.server.drain import ANSWER_MARGIN_S
from sdproxy.server.keys import metrics_key

log = logging.getLogger(__name__)

LINGERING_S = 2.0

# What a request aiohttp could not parse is told (never the bytes it sent).
_BAD_HEADS: tuple[tuple[type[Exception], str], ...] = (
    (LineTooLong, "request line or header too long"),
    (InvalidHeader, "invalid header"),
    (BadStatusLine, "invalid request line"),
    (InvalidURLError, "invalid request target"),
    (PayloadEncodingError, "invalid body framing"),
)


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


class _RequestHandler(web.RequestHandler):
    """aiohttp's HTTP protocol, answering and logging malformed requests sdproxy's way."""

    def __init__(self, manager: _Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._bad_requests = manager.bad_requests
        self._broken_bodies = manager.broken_bodies

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """The answer to a request that failed outside the application (``message`` unused).

        A head the parser refused is the client's error: JSON, no traceback, no bytes of it.
        Anything else escaped sdproxy's error middleware: a bug, logged with its traceback.
        """
        if request.writer.output_size > 0:
            raise ConnectionError("an answer was sent already; cannot send the error")
        if isinstance(exc, HttpProcessingError):
            kind = type(exc).__name__
            self._bad_requests.note(kind, status)
            reason = next((text for cls, text in _BAD_HEADS if isinstance(exc, cls)), None)
            detail = f"Invalid HTTP request: {reason or 'malformed request'}"
            body = webui_error_body("HTTPException", detail=detail)
        else:
            self.logger.error("error outside the application", exc_info=exc)
            body = webui_error_body(type(exc).__name__ if exc else "Error", errors="internal error")
        response = json_response(body, status=status)
        response.force_close()
        return response

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """aiohttp's "Unhandled exception": a client's broken body is one line, not a traceback."""
        exc = kw.get("exc_info")
        if isinstance(exc, HttpProcessingError | web.RequestPayloadError | ConnectionError):
            kind = type(exc).__name__
            text = f"a client sent a body that could not be read ({kind}); connection closed"
            self._broken_bodies.log(kind, logging.WARNING, text, {"error": kind})
            return
        super().log_exception(*args, **kw)


class _Server(web.Server):
    """aiohttp's low-level server, making sdproxy's request handler for each connection."""

    def __init__(
        self,
        handler: Any,
        *,
        request_factory: Any,
        handler_cancellation: bool,
        bad_requests: BadRequestLog,
        **handler_kwargs: Any,
    ) -> None:
        super().__init__(
            handler,
            request_factory=request_factory,
            handler_cancellation=handler_cancellation,
            **handler_kwargs,
        )
        self._handler_kwargs = handler_kwargs
        self.bad_requests = bad_requests
        self.broken_bodies = RateLimitedLog(log, schedule=_call_later)

    def __call__(self) -> web.RequestHandler:
        return _RequestHandler(self, loop=asyncio.get_running_loop(), **self._handler_kwargs)


class _Runner(web.AppRunner):
    """An AppRunner whose server uses ``_RequestHandler``."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        # What aiohttp hands each connection's handler (AppRunner adds access_log_class).
        self._handler_kwargs = {
            key: value
            for key, value in kwargs.items()
            if key not in ("shutdown_timeout", "handler_cancellation")
        }
        self._handler_kwargs.setdefault("access_log_class", AccessLogger)

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()  # starts the app: on_startup, cleanup contexts
        metrics = self.app.get(metrics_key)
        return _Server(
            made.request_handler,
            request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation,
            bad_requests=BadRequestLog(metrics, schedule=_call_later),
            **self._handler_kwargs,
        )


def _call_later(delay_s: float, callback: Any) -> object:
    return asyncio.get_running_loop().call_later(delay_s, callback)


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

    cleanup() stops accepting connections, runs the app's on_shutdown (sdproxy's drain: the
    grace, then 503s), waits up to ``shutdown_timeout_s`` for requests still in flight, then
    cancels them. ``handler_cancellation`` cancels a handler whose client has disconnected
    (aiohttp does not by default). ``server_args`` go to aiohttp's request handler (see
    connection_limits).
    """
    runner = _Runner(
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
    """Serve sdproxy: handlers of departed clients are cancelled; stopping drains (drain.py)."""
    return await start_site(
        create_app(settings),
        host,
        port,
        # on_shutdown (the drain) has waited shutdown_grace_s and answered what was left.
        shutdown_timeout_s=ANSWER_MARGIN_S,
        handler_cancellation=True,
        **connection_limits(settings.server),
    )


# After the grace and the 503s, how long closing the cluster (lanes, node connections) may take.
CLOSE_MARGIN_S = 10.0


async def stop_proxy(runner: web.AppRunner, settings: Settings) -> None:
    """Stop serving within ``shutdown_grace_s`` plus margins, whatever is still running.

    cleanup(): no new connections; requests in flight get the grace, then a 503 (drain.py);
    then the cluster closes. Should any of it hang, the process is not held hostage by it.
    """
    budget_s = settings.server.shutdown_grace_s + 2 * ANSWER_MARGIN_S + CLOSE_MARGIN_S
    stopping = asyncio.ensure_future(runner.cleanup())
    done, _ = await asyncio.wait([stopping], timeout=budget_s)
    if done:
        await stopping  # its exception, if it raised one
        return
    # A deadline passed, not an error: nothing to log a traceback of.
    log.error("stopping took longer than %g s: exiting with work still stopping", budget_s)
    stopping.cancel()
