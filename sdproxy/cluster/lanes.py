"""Each node's queue (Lane): its jobs, run one at a time like the webui's own queue lock.

A lane runs client jobs first come first served and, only while no client job waits, the node's
background work (benchmark runs). Before each job it takes the node's turn from the cluster
state, so that no other job of any sdproxy process runs on the node meanwhile. What a job does
and what its outcome means is the host's business (the cluster, through :class:`LaneHost`); a
lane only runs it, and a job whose handling raises is reported, never lost: the lane goes on.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Coroutine
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from sdproxy.cluster.clock import Clock
from sdproxy.cluster.work import Job, Run

log = logging.getLogger(__name__)

STEAL_INTERVAL_S = 0.5  # how often an idle lane looks for late work elsewhere
# Background work starts only after the node has been free of client jobs this long: clients
# send requests in runs, and a benchmark run started between two of them delays the second.
BACKGROUND_AFTER_IDLE_S = 0.25
BACKGROUND_PRIORITY_S = 86400.0  # background waits behind client work started within a day


@dataclass(eq=False)
class Background:
    """Work a lane runs only while no client job waits (a benchmark run).

    ``preempt``, if given, is called when a client job arrives while this runs: it asks the
    node to stop (the webui's interrupt), and the work puts itself back in line. The lane keeps
    the node's turn until that call is done, so the interrupt can only reach this work.
    """

    work: float  # units, for the backlog while it runs
    run: Callable[[], Awaitable[None]]
    requests: int = 1
    preempt: Callable[[], Coroutine[Any, Any, None]] | None = None


class LaneHost(Protocol):
    """What a lane needs from the cluster."""

    @property
    def clock(self) -> Clock: ...

    def usable(self, node: str) -> bool: ...

    def predict_s(self, node: str, work: float, requests: int = 1) -> float: ...

    def turn(self, node: str, priority: float) -> AbstractAsyncContextManager[None]: ...

    def rebalance(self) -> bool:
        """Let idle lanes take over late work; True if any did."""
        ...

    async def run_job(self, lane: Lane, job: Job) -> None: ...

    def job_crashed(self, lane: Lane, job: Job, error: Exception) -> None:
        """Handling ``job`` raised unexpectedly (a bug): its images must go on."""
        ...

    def redispatch(self, job: Job) -> None:
        """``job`` can no longer run on this lane's node (it went down or was disabled)."""
        ...

    def queue_changed(self, lane: Lane) -> None: ...


class Lane:
    """One node's queue of jobs."""

    def __init__(self, node: str, host: LaneHost, steal_interval_s: float = STEAL_INTERVAL_S):
        self.name = node
        self.pending: deque[Job] = deque()
        self.background: deque[Background] = deque()
        self.current: Job | Background | None = None
        self.started_at = 0.0  # clock time the current job started
        self._host = host
        self._steal_interval_s = steal_interval_s
        self._wake = asyncio.Event()
        self._preempting: asyncio.Task[None] | None = None  # asking a background run to stop
        self._client_done_at = float("-inf")  # clock time the last client job ended

    @property
    def idle(self) -> bool:
        return self.current is None and not self.pending

    @property
    def running(self) -> Job | None:
        """The client job the node is rendering now, if any."""
        return self.current if isinstance(self.current, Job) else None

    def submit(self, job: Job) -> None:
        self.pending.append(job)
        current = self.current
        if isinstance(current, Background) and current.preempt and self._preempting is None:
            self._preempting = asyncio.create_task(current.preempt(), name=f"preempt {self.name}")
        self._changed()

    def submit_background(self, work: Background, *, first: bool = False) -> None:
        """Queue background work (``first``: ahead of the rest, e.g. a preempted run)."""
        if first:
            self.background.appendleft(work)
        else:
            self.background.append(work)
        self._changed()

    def take_pending(self) -> list[Job]:
        """Remove and return every client job not yet started."""
        jobs = list(self.pending)
        self.pending.clear()
        self._changed()
        return jobs

    def withdraw(self, runs: Collection[Run]) -> list[Job]:
        """Remove and return the jobs of ``runs`` not yet started."""
        taken = [job for job in self.pending if job.run in runs]
        if taken:
            self.pending = deque(job for job in self.pending if job.run not in runs)
            self._changed()
        return taken

    def replace(self, job: Job, kept: list[Job]) -> None:
        """Put ``kept`` where ``job`` waits (work stealing keeps the rest of a split job)."""
        at = self.pending.index(job)
        del self.pending[at]
        for each in reversed(kept):
            self.pending.insert(at, each)
        self._changed()

    @property
    def queued_images(self) -> int:
        """Client images waiting or rendering on this node."""
        jobs = [*self.pending, *([self.running] if self.running else [])]
        return sum(job.images for job in jobs if job.live)

    def backlog_s(self, now: float) -> float:
        """Predicted seconds until this node has finished what is queued on it.

        Queued background work is left out: it waits for the client work. Background work in
        progress that a client job would preempt counts at most one request's overhead: about
        what stopping it costs.
        """
        total = self.running_left_s(now)
        for job in self.pending:
            if job.live:
                total += self._host.predict_s(self.name, job.work)
        return total

    def running_left_s(self, now: float) -> float:
        """The part of :meth:`backlog_s` the node is rendering now."""
        host, current = self._host, self.current
        if current is None or (isinstance(current, Job) and not current.live):
            return 0.0
        requests = current.requests if isinstance(current, Background) else 1
        predicted = host.predict_s(self.name, current.work, requests)
        left = max(predicted - (now - self.started_at), 0.0)
        if isinstance(current, Background) and current.preempt is not None:
            left = min(left, host.predict_s(self.name, 0.0))
        return left

    def background_s(self, now: float) -> float:
        """The part of :meth:`backlog_s` that is background work in progress (it gives way)."""
        return self.running_left_s(now) if isinstance(self.current, Background) else 0.0

    def _changed(self) -> None:
        self._wake.set()
        self._host.queue_changed(self)

    async def run_forever(self) -> None:
        """Run jobs as they come; cancelled when the cluster stops."""
        while True:
            await self._wait_for_work()
            async with self._host.turn(self.name, self._priority()):
                item = self._next()
                if item is not None:
                    await self._run(item)
            self._host.rebalance()

    async def _wait_for_work(self) -> None:
        clock = self._host.clock
        while not self.pending:
            idle_for = clock.now() - self._client_done_at
            if self.background and idle_for >= BACKGROUND_AFTER_IDLE_S:
                return
            self._wake.clear()
            if self._host.rebalance():
                continue
            # Idle: look again now and then, in case work elsewhere runs late.
            wait_s = self._steal_interval_s
            if self.background:
                wait_s = min(wait_s, BACKGROUND_AFTER_IDLE_S - idle_for)
            await clock.wait(self._wake, wait_s)

    def _priority(self) -> float:
        """Where the next job stands in the node's line across replicas: the Unix time its
        request started; background work after any client's."""
        started = [job.run.started_at for job in self.pending if job.live]
        return min(started) if started else self._host.clock.wall() + BACKGROUND_PRIORITY_S

    def _next(self) -> Job | Background | None:
        """The next client job, else the next background work; None if nothing is left."""
        while self.pending:
            job = self.pending.popleft()
            if job.run.finished:  # the answer was decided while it waited
                job.retire()
                continue
            if not self._host.usable(self.name):  # went down after the job was queued
                self._host.redispatch(job)
                continue
            return job
        # Background work runs on a node that is down too: a benchmark then fails and says why.
        return self.background.popleft() if self.background else None

    async def _run(self, item: Job | Background) -> None:
        self.current, self.started_at = item, self._host.clock.now()
        self._host.queue_changed(self)
        try:
            if isinstance(item, Background):
                await item.run()
            else:
                await self._host.run_job(self, item)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # A bug, not a node failure: logged once here, and the images go on elsewhere.
            request_id = item.run.request_id if isinstance(item, Job) else None
            log.exception(
                "node %s: unexpected error running a job (request %s)", self.name, request_id
            )
            if isinstance(item, Job):
                self._host.job_crashed(self, item, exc)
        finally:
            await self._preempted()
            if isinstance(item, Job):
                self._client_done_at = self._host.clock.now()
            self.current = None
            self._host.queue_changed(self)

    async def _preempted(self) -> None:
        """Wait for a preemption's interrupt call to end, still holding the node's turn."""
        task, self._preempting = self._preempting, None
        if task is None:
            return
        try:
            await task
        except asyncio.CancelledError:
            task.cancel()
            raise
        except Exception:
            log.exception("node %s: preempting background work failed", self.name)
