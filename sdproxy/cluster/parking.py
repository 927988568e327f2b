"""Work that waits for a usable node: parked jobs, each failed once wait_for_node_s passes.

A job is parked when no usable node may render it. It stays until the cluster dispatches the
parked jobs again (a node came back or was enabled) or until ``wait_for_node_s`` after it was
first parked: then its request fails, with the node failures it met (502) or, if it met none,
with the error the cluster gives for "no usable node" (503 with Retry-After).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection

from sdproxy.cluster.lanes import Job, Run
from sdproxy.errors import GenerationFailed, SdproxyError


class Parking:
    """The parked jobs of a cluster and the timers that expire them."""

    def __init__(self, wait_for_node_s: float, no_node: Callable[[], SdproxyError]) -> None:
        self._wait_s = wait_for_node_s
        self._no_node = no_node  # the error for a request that met no node failure
        self._jobs: list[Job] = []
        self._timers: set[asyncio.TimerHandle] = set()

    def __bool__(self) -> bool:
        return bool(self._jobs)

    @property
    def waiting_images(self) -> int:
        """Images of requests parked until a node comes back."""
        return sum(job.chunk.images for job in self._jobs if not job.run.finished)

    def park(self, job: Job) -> None:
        """Hold ``job`` until it is taken back or its wait (from when first parked) runs out."""
        loop = asyncio.get_running_loop()
        if job.parked_at is None:
            job.parked_at = loop.time()
        self._jobs.append(job)
        timer = loop.call_at(job.parked_at + self._wait_s, self._expire)
        self._timers.add(timer)

    def take_all(self) -> list[Job]:
        """Every parked job, for the cluster to dispatch again."""
        parked, self._jobs = self._jobs, []
        return parked

    def drop_interrupted(self, runs: Collection[Run]) -> None:
        """Give up the split jobs of interrupted requests; their unsplit jobs stay parked."""
        for job in self._jobs:
            if job.run in runs and not job.whole:
                job.run.drop(job.chunk.images)
        self._jobs = [job for job in self._jobs if job.run not in runs or job.whole]

    def cancel_timers(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()

    def _expire(self) -> None:
        loop = asyncio.get_running_loop()
        now, wait_s = loop.time(), self._wait_s
        self._timers = {t for t in self._timers if t.when() > now}
        keep: list[Job] = []
        for job in self._jobs:
            run = job.run
            if run.finished:
                continue
            if job.parked_at is not None and job.parked_at + wait_s > now + 1e-3:
                keep.append(job)
            elif run.failures:
                why = f"no usable node came back within {wait_s:g} s"
                run.fail(GenerationFailed(f"generation failed: {why}", dict(run.failures)))
            else:
                run.fail(self._no_node())
        self._jobs = keep
