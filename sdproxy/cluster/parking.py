"""Work that waits for a usable node: parked jobs, each failed once wait_for_node_s passes.

A job is parked when no usable node may render it. It stays until the cluster dispatches the
parked jobs again (a node came back or was enabled) or until ``wait_for_node_s`` after it was
first parked: then its request fails, with the node failures it met (502) or, if it met none,
with the error the cluster gives for "no usable node" (503 with Retry-After).
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from sdproxy.cluster.clock import Clock, Timer
from sdproxy.cluster.work import Job, Run
from sdproxy.errors import GenerationFailed, SdproxyError


class Parking:
    """The parked jobs of a cluster and the timers that expire them."""

    def __init__(
        self, clock: Clock, wait_for_node_s: float, no_node: Callable[[], SdproxyError]
    ) -> None:
        self._clock = clock
        self._wait_s = wait_for_node_s
        self._no_node = no_node  # the error for a request that met no node failure
        self.jobs: list[Job] = []
        self._timers: dict[float, Timer] = {}  # when it fires -> timer; one per deadline

    def __bool__(self) -> bool:
        return bool(self.jobs)

    @property
    def waiting_images(self) -> int:
        """Images of requests parked until a node comes back."""
        return sum(job.images for job in self.jobs if not job.run.finished)

    def park(self, job: Job) -> None:
        """Hold ``job`` until it is taken back or its wait (from when first parked) runs out."""
        if job.parked_at is None:
            job.parked_at = self._clock.now()
        self.jobs.append(job)
        when = job.parked_at + self._wait_s
        if when not in self._timers:  # a job parked again keeps its first deadline
            self._timers[when] = self._clock.call_at(when, self._expire)

    def take_all(self) -> list[Job]:
        """Every parked job, for the cluster to dispatch again."""
        parked, self.jobs = self.jobs, []
        return parked

    def withdraw(self, runs: Collection[Run]) -> list[Job]:
        """Remove and return the parked jobs of ``runs``."""
        taken = [job for job in self.jobs if job.run in runs]
        self.jobs = [job for job in self.jobs if job.run not in runs]
        return taken

    def cancel_timers(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    def _expire(self) -> None:
        now, wait_s = self._clock.now(), self._wait_s
        self._timers = {when: t for when, t in self._timers.items() if when > now}
        keep: list[Job] = []
        for job in self.jobs:
            run = job.run
            if run.finished:
                job.retire()
            elif job.parked_at is not None and job.parked_at + wait_s > now + 1e-3:
                keep.append(job)
            else:
                job.retire()
                if run.failures:
                    why = f"no usable node came back within {wait_s:g} s"
                    run.fail(GenerationFailed(f"generation failed: {why}", dict(run.failures)))
                else:
                    run.fail(self._no_node())
        self.jobs = keep
