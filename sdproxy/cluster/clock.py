"""The cluster's one clock: monotonic seconds for scheduling, Unix seconds for what is shown.

Everything in ``cluster/`` that waits or stamps a time asks a :class:`Clock`, never ``time`` or
the event loop directly, so tests can drive lanes, parking and watchers with a fake clock and no
sleeps. Both readings come from one source: ``wall()`` is ``now()`` plus an offset fixed when the
clock is made, so a node's "down since" and its cooldown can never disagree.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Protocol


class Timer(Protocol):
    """A callback scheduled by :meth:`Clock.call_at`."""

    def cancel(self) -> None: ...


class Clock(Protocol):
    """Where the cluster's time comes from."""

    def now(self) -> float:
        """Monotonic seconds."""
        ...

    def wall(self) -> float:
        """Unix seconds at ``now()``."""
        ...

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        """Run ``callback`` once ``now()`` reaches ``when``."""
        ...

    async def sleep(self, seconds: float) -> None: ...

    async def wait(self, event: asyncio.Event, timeout_s: float) -> bool:
        """Wait until ``event`` is set or ``timeout_s`` passes; True if it was set."""
        ...


class LoopClock:
    """The running event loop's clock (``loop.time()``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._epoch = time.time() - self._loop.time()

    def now(self) -> float:
        return self._loop.time()

    def wall(self) -> float:
        return self._loop.time() + self._epoch

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        return self._loop.call_at(when, callback)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def wait(self, event: asyncio.Event, timeout_s: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(timeout_s, 0.0)):
                await event.wait()
        return event.is_set()
