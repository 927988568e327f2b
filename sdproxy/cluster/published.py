"""What this process tells the other replicas it runs: per node its backlog, its requests in
flight, and its oldest rendering request for their /sdapi/v1/progress."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from sdproxy.cluster.clock import Clock
from sdproxy.cluster.interrupts import running_jobs
from sdproxy.cluster.lanes import Lane
from sdproxy.cluster.state import Backlog
from sdproxy.cluster.work import Run
from sdproxy.core.progress import shape_of


class Published:
    """The LocalWork of a cluster (cluster/state.py): read when a lane's queue changes."""

    def __init__(self, lanes: Mapping[str, Lane], runs: Collection[Run], clock: Clock) -> None:
        self._lanes, self._runs, self._clock = lanes, runs, clock

    def backlog(self, node: str) -> Backlog:
        lane, now = self._lanes[node], self._clock.now()
        return Backlog(lane.backlog_s(now), lane.queued_images, lane.running_left_s(now))

    def in_flight(self) -> int:
        return sum(1 for run in self._runs if not run.finished)

    def progress(self) -> dict[str, Any] | None:
        running = running_jobs(self._lanes)
        if not running:
            return None
        run = min((job.run for _, job in running), key=lambda r: r.started_at)
        nodes: dict[str, int] = {}
        for node, job in running:
            if job.run is run:
                nodes[node] = nodes.get(node, 0) + job.images
        done = run.request.total_images - max(run.remaining, 0)
        return {
            **shape_of(run.request).to_json(),
            "started_at": run.started_at,
            "done_images": max(done, 0),
            "interrupted": run.interrupted,
            "nodes": nodes,
        }
