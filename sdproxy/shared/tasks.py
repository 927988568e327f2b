"""The background tasks of the shared layer, supervised: none dies silently, none is lost.

A loop (the pub/sub reader, the heartbeat, the Redis monitor) that raises unexpectedly is
logged with its traceback and restarted after a pause that doubles up to 30 s; a one-off task
(a lease renewal, a cleanup after a cancelled wait) has its exception logged. ``aclose``
cancels them all and waits for them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

log = logging.getLogger(__name__)

_MAX_PAUSE_S = 30.0
_CANCEL_ROUNDS = 20


def cancelling() -> bool:
    """The current task is being cancelled (an error caught now must not swallow that)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class Supervisor:
    """Owns every task the shared layer starts."""

    def __init__(self, first_pause_s: float = 0.5) -> None:
        self._tasks: set[asyncio.Task[None]] = set()
        self._first_pause_s = first_pause_s
        self.restarts = 0  # loops restarted after an unexpected exception

    def loop(self, name: str, body: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        """Run ``body`` until it returns; restart it if it raises."""
        return self._track(asyncio.create_task(self._forever(name, body), name=name))

    def once(self, name: str, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``work`` in the background; an exception it raises is logged."""
        task = self._track(asyncio.create_task(work, name=name))
        task.add_done_callback(_log_failure)
        return task

    async def _forever(self, name: str, body: Callable[[], Awaitable[None]]) -> None:
        pause_s = self._first_pause_s
        while True:
            try:
                await body()
            except asyncio.CancelledError:
                raise
            except Exception:
                if cancelling():
                    raise asyncio.CancelledError from None
                self.restarts += 1
                log.exception("%s failed; restarting it in %g s", name, pause_s)
                await asyncio.sleep(pause_s)
                pause_s = min(pause_s * 2, _MAX_PAUSE_S)
            else:
                return

    def _track(self, task: asyncio.Task[None]) -> asyncio.Task[None]:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @property
    def running(self) -> int:
        return len(self._tasks)

    async def aclose(self) -> None:
        """Cancel every task and wait until each has stopped.

        A cancellation can be lost inside a library (turned into a timeout, then handled as
        one), so tasks still running are cancelled again, for at most ~10 s in all.
        """
        pending = set(self._tasks)
        for _ in range(_CANCEL_ROUNDS):
            if not pending:
                break
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=0.5)
        if pending:
            names = ", ".join(sorted(task.get_name() for task in pending))
            log.error("shared-state tasks did not stop when cancelled: %s", names)
        self._tasks.clear()


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (error := task.exception()) is not None:
        log.error("%s failed", task.get_name(), exc_info=error)
