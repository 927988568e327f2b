"""Stopping with requests in flight: wait ``shutdown_grace_s`` for them, then answer them 503.

aiohttp's own graceful stop waits its timeout for a handler, then cancels it and waits as long
again, and a cancelled handler answers nothing (the client sees the connection close). Here
every request runs under ``Drain.middleware``; on shutdown (``app.on_shutdown``, after the
listening socket closed) ``Drain.stop`` waits up to the grace for them to finish, then cancels
those still running and the middleware turns that cancellation into the webui-shaped 503 of
``ShuttingDown``, which aiohttp then sends before it closes the connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from sdproxy.errors import SdproxyError
from sdproxy.server.bodies import json_response

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# After the grace, how long cancelled handlers get to answer their 503.
ANSWER_MARGIN_S = 5.0


class ShuttingDown(SdproxyError):
    """sdproxy is stopping and the request was still running when shutdown_grace_s ended."""

    status = 503

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1", "Connection": "close"}


class Drain:
    """The requests in flight, and how they end when sdproxy stops."""

    def __init__(self, grace_s: float, margin_s: float = ANSWER_MARGIN_S) -> None:
        self.grace_s, self.margin_s = grace_s, margin_s
        self._running: set[asyncio.Task[object]] = set()
        self._expired: set[asyncio.Task[object]] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def in_flight(self) -> int:
        return len(self._running)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Run ``handler`` as a request in flight; if the drain cancelled it, answer 503."""
        task = asyncio.current_task()
        assert task is not None  # aiohttp runs every request in a task of its own
        self._running.add(task)
        self._idle.clear()
        try:
            return await handler(request)
        except asyncio.CancelledError:
            if task not in self._expired:
                raise  # the client left (handler_cancellation), or the loop is closing
            task.uncancel()
            error = ShuttingDown("sdproxy is shutting down; the request did not finish in time")
            return json_response(error.body(), status=error.status, headers=error.headers())
        finally:
            if task in self._expired and task.cancelling():
                task.uncancel()  # the handler swallowed the cancellation: do not leak it
            self._running.discard(task)
            self._expired.discard(task)
            if not self._running:
                self._idle.set()

    async def stop(self, app: web.Application | None = None) -> None:
        """Wait up to the grace for the requests in flight, then answer the rest with 503.

        ``app`` is unused: the signature of an on_shutdown handler.
        """
        if self._running:
            log.info("waiting up to %g s for %d request(s) in flight", self.grace_s, self.in_flight)
            try:
                async with asyncio.timeout(self.grace_s):
                    await self._idle.wait()
            except TimeoutError:
                pass
        late = set(self._running)
        if not late:
            return
        log.warning("shutdown grace over: answering %d request(s) in flight with 503", len(late))
        for task in late:
            self._expired.add(task)
            task.cancel("sdproxy shutdown grace over")
        _, stuck = await asyncio.wait(late, timeout=self.margin_s)
        if stuck:
            log.error("%d request(s) running %g s after cancelling", len(stuck), self.margin_s)


drain_key = web.AppKey("drain", Drain)
