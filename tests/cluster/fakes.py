"""A fake clock for the cluster's pieces: time moves only when a test advances it."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable


class FakeTimer:
    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback: Callable[[], None] | None = callback

    def cancel(self) -> None:
        self.callback = None


class FakeClock:
    """A Clock (sdproxy/cluster/clock.py) whose time a test moves with :meth:`advance`."""

    def __init__(self, start: float = 1000.0, epoch: float = 1_700_000_000.0) -> None:
        self._now = start
        self._epoch = epoch
        self._timers: list[tuple[float, int, FakeTimer]] = []
        self._order = itertools.count()

    def now(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._now + self._epoch

    def call_at(self, when: float, callback: Callable[[], None]) -> FakeTimer:
        timer = FakeTimer(callback)
        heapq.heappush(self._timers, (when, next(self._order), timer))
        return timer

    async def sleep(self, seconds: float) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.call_at(self._now + seconds, lambda: _resolve(done))
        await done

    async def wait(self, event: asyncio.Event, timeout_s: float) -> bool:
        if event.is_set():
            return True
        expired = asyncio.get_running_loop().create_future()
        timer = self.call_at(self._now + timeout_s, lambda: _resolve(expired))
        waiter = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait({expired, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()
            waiter.cancel()
            expired.cancel()
        return event.is_set()

    async def advance(self, seconds: float) -> None:
        """Move time on by ``seconds``, firing every timer due on the way, in order."""
        target = self._now + seconds
        await settle()
        while self._timers and self._timers[0][0] <= target:
            when, _, timer = heapq.heappop(self._timers)
            self._now = max(self._now, when)
            if timer.callback is not None:
                timer.callback()
            await settle()
        self._now = target
        await settle()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def settle() -> None:
    """Let every task that can run do so (a few loop iterations; no time passes)."""
    for _ in range(50):
        await asyncio.sleep(0)
