"""Supervision: every long-lived task sdproxy runs is owned, logged when it crashes, restarted.

A lane, a health watcher or the benchmark runner that raises something unexpected must not die
silently and leave its node "up" with work nobody runs. The :class:`Supervisor` owns such tasks:
an exception that escapes one is logged once with its traceback, counted, and the task is started
again after a short pause (the pause keeps a bug that raises at once from spinning the loop).
Cancellation is the only way a supervised task ends. One-off tasks use
:func:`sdproxy.logs.log_crash` as a done-callback instead, so their errors are logged too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from sdproxy.cluster.clock import Clock

log = logging.getLogger(__name__)

RESTART_DELAY_S = 1.0


class Supervisor:
    """The owner of the cluster's long-lived tasks."""

    def __init__(self, clock: Clock, restart_delay_s: float = RESTART_DELAY_S) -> None:
        self._clock = clock
        self._restart_delay_s = restart_delay_s
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.crashes: dict[str, int] = {}  # task name -> times it crashed and was restarted

    def start(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        """Run ``run()`` as the task ``name``, restarting it whenever it raises."""
        if name in self._tasks:
            raise ValueError(f"a task named {name!r} is already supervised")
        self._tasks[name] = asyncio.create_task(self._keep_running(name, run), name=name)

    async def _keep_running(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        while True:
            try:
                await run()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.crashes[name] = self.crashes.get(name, 0) + 1
                log.exception("%s crashed (restarting it in %g s)", name, self._restart_delay_s)
            else:
                log.error("%s returned; it should run until cancelled (restarting it)", name)
            await self._clock.sleep(self._restart_delay_s)

    async def aclose(self) -> None:
        """Cancel every task and wait until each has stopped."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        # Every task ends with CancelledError here: the exceptions are expected, not results.
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
