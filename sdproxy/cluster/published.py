"""What this process tells the other replicas it runs: per node its backlog, its requests in
flight, and its oldest rendering request for their /sdapi/v1/progress."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from sdproxy.cluster.clock import Clock
from sdproxy.cluster.interrupts import running_jobs
from sdproxy.cluster.lanes import Lane
from sdproxy.cluster.state import Backlog
from sdproxy.cluster.work import Run
from sdproxy.core.progress import Shape, shape_of


@dataclass(frozen=True)
class Rendering:
    """The request /progress shows: this process's oldest rendering one, or another's."""

    shape: Shape
    started_at: float  # Unix time
    done_images: int  # back from the nodes already
    interrupted: bool
    nodes: dict[str, int]  # node -> images it renders for the request now

    def to_json(self) -> dict[str, Any]:
        return {
            **self.shape.to_json(),
            "started_at": self.started_at,
            "done_images": self.done_images,
            "interrupted": self.interrupted,
            "nodes": self.nodes,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], known: Collection[str]) -> Rendering | None:
        """The rendering in ``data`` (it crossed Redis), on nodes in ``known``; None if it is
        not a valid one."""
        shape = Shape.from_json(data)
        started_at, done = data.get("started_at"), data.get("done_images")
        interrupted, nodes = data.get("interrupted"), data.get("nodes")
        if shape is None or not isinstance(started_at, int | float) or not isinstance(nodes, dict):
            return None
        if not isinstance(done, int) or not isinstance(interrupted, bool):
            return None
        mine = {
            node: images
            for node, images in nodes.items()
            if node in known and isinstance(images, int) and 0 < images <= shape.total_images
        }
        if not mine or not 0 <= done <= shape.total_images:
            return None
        return cls(shape, float(started_at), done, interrupted, mine)


def oldest_rendering(lanes: Mapping[str, Lane]) -> Rendering | None:
    """The oldest request a node of ``lanes`` is rendering now, with the nodes at it."""
    running = running_jobs(lanes)
    if not running:
        return None
    run = min((job.run for _, job in running), key=lambda r: r.started_at)
    nodes: dict[str, int] = {}
    for node, job in running:
        if job.run is run:
            nodes[node] = nodes.get(node, 0) + job.images
    # Images still to come (rendering or queued) are the run's remaining ones.
    done = run.request.total_images - max(run.remaining, 0)
    return Rendering(shape_of(run.request), run.started_at, max(done, 0), run.interrupted, nodes)


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
        rendering = oldest_rendering(self._lanes)
        return rendering.to_json() if rendering is not None else None
