"""Dispatch: which usable nodes may take a job, the plan that ends it earliest, its node requests.

A job's images are planned into contiguous shares over the nodes its checkpoint routes to,
given each node's speed model and backlog (core/planner.py), and each share is cut into node
requests no larger than the batch the node may take. An unsplit job goes whole to the node that
finishes it first. Work that finds no usable node is parked (parking.py).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Collection, Mapping

from sdproxy.cluster.checkpoints import CheckpointRouter
from sdproxy.cluster.clock import Clock
from sdproxy.cluster.forecast import Forecast
from sdproxy.cluster.lanes import Lane
from sdproxy.cluster.parking import Parking
from sdproxy.cluster.state import ClusterState
from sdproxy.cluster.work import Job, Run
from sdproxy.core.planner import (
    Chunk,
    NodeLoad,
    Share,
    Traffic,
    chunk_share,
    plan_under_load,
    vary_for_learning,
)
from sdproxy.core.request import GenerationRequest
from sdproxy.errors import NodeRaised, NoNodeAvailable, QueueFull, SdproxyError


class Dispatcher:
    """Puts jobs on lanes, or in the parking, as planned."""

    def __init__(
        self,
        lanes: Mapping[str, Lane],
        forecast: Forecast,
        router: CheckpointRouter,
        parking: Parking,
        state: ClusterState,
        clock: Clock,
        runs: Collection[Run],
    ) -> None:
        self._lanes = lanes
        self._forecast = forecast
        self._router = router
        self._parking = parking
        self._state = state
        self._clock = clock
        self._runs = runs  # the requests in flight, to tell a busy cluster from an idle one
        self._finished_at: deque[float] = deque(maxlen=256)  # clock times requests ended

    def note_finished(self) -> None:
        """A request ended: recent ends tell the planner whether requests keep coming."""
        self._finished_at.append(self._clock.now())

    def usable_nodes(self) -> list[str]:
        return [node for node in self._state.nodes if self._state.usable(node)]

    def routable(self, run: Run) -> list[str]:
        """The usable nodes that may render ``run`` (its checkpoint is there)."""
        return self._router.select(run.request, self.usable_nodes()).nodes

    def may_render(self, node: str, job: Job) -> bool:
        """Whether the planner could have given ``node`` this job.

        A node the job's work raised on (a webui 500) is not eligible: the retry is there to
        learn whether another node renders it.
        """
        return node not in job.run.raised and node in self.routable(job.run)

    def dispatch(self, job: Job, *, first: bool = False) -> SdproxyError | None:
        """Queue a job's images on the nodes that may render it, or park it.

        On a request's ``first`` dispatch, a request no node may render (its checkpoint is
        nowhere, its images too large for every node) is returned, for the client; later, that
        job waits like one with no usable node. The job given is always retired or placed.
        """
        run = job.run
        if run.finished:
            job.retire()
            return None
        if run.interrupted and not job.whole:  # the client wants what is done, not the rest
            job.retire()
            run.drop(job.images)
            return None
        usable = self.usable_nodes()
        if usable:
            routing = self._router.select(run.request, usable)
            if routing.problem is not None and first:
                job.retire()
                return routing.problem
            usable = routing.nodes
        # Work that raised on a node (a webui 500), or whose handling crashed in sdproxy, is
        # retried on the others, if there are any.
        usable = [n for n in usable if n not in run.raised and n not in run.avoid] or usable
        if not usable:
            self._parking.park(job)
            return None
        job.parked_at = None
        if job.whole:
            self._whole_lane(job, usable).submit(job)
            return None
        unit = run.request.unit_size
        shares = self._plan(run, job.images // unit, job.chunk.start // unit, usable)
        job.retire()
        if not shares:  # no usable node takes images this large (max_pixels)
            problem = NoNodeAvailable(
                f"no healthy node takes {run.request.width}x{run.request.height} images "
                "within its max_pixels"
            )
            if first:
                return problem
            run.fail(problem)
            return None
        for share in shares:
            for each in self.jobs_for(run, share, job.blame):
                self._lanes[share.node].submit(each)
        return None

    def _whole_lane(self, job: Job, usable: list[str]) -> Lane:
        """The lane that would finish an unsplit job first."""
        now = self._clock.now()
        return min(
            (self._lanes[node] for node in usable),
            key=lambda lane: (
                self.backlog_s(lane, now) + self._forecast.predict_s(lane.name, job.work)
            ),
        )

    def queued_images(self) -> int:
        """Client images queued or rendering on this process's lanes."""
        return sum(lane.queued_images for lane in self._lanes.values())

    def check_queue(self, request: GenerationRequest, usable: list[str], limit: int) -> None:
        """429 when ``request`` would take the queue of every replica past ``limit``
        (``[scheduler] max_queued_images``)."""
        queued = self.queued_images() + sum(self._state.others_load(n)[1] for n in self._lanes)
        if queued and queued + request.total_images > limit:
            now = self._clock.now()
            soonest = min(self.backlog_s(self._lanes[name], now) for name in usable)
            raise QueueFull(
                f"{queued} images are queued; sdproxy takes at most {limit} "
                f"(scheduler.max_queued_images)",
                retry_after_s=min(max(math.ceil(soonest), 1), 600),
            )

    def backlog_s(self, lane: Lane, now: float) -> float:
        """Seconds of work ahead on the lane's node: ours and other processes'."""
        return lane.backlog_s(now) + self._state.others_load(lane.name)[0]

    def _plan(self, run: Run, units: int, start: int, usable: list[str]) -> list[Share]:
        """Shares of ``units`` from ``start`` that end earliest given every node's backlog."""
        request = run.request
        now = self._clock.now()
        unit_work = run.work_per_image * request.unit_size
        loads = []
        for node in usable:
            limit = self._forecast.batch_limit(node, request)
            if limit == 0:
                continue
            estimate = self._forecast.estimate(node)
            seen = self._state.speed(node).single_work
            loads.append(
                NodeLoad(
                    node,
                    overhead_s=estimate.overhead_s,
                    per_unit_s=estimate.per_unit_s * unit_work,
                    backlog_s=self.backlog_s(self._lanes[node], now),
                    background_s=self._lanes[node].background_s(now),
                    batch_limit=limit,
                    seen_units=seen / unit_work if seen is not None else None,
                )
            )
        if not loads:
            return []
        traffic = Traffic(
            in_flight=sum(1 for other in self._runs if other is not run and not other.finished),
            finished_ago_s=tuple(now - at for at in self._finished_at),
        )
        return vary_for_learning(plan_under_load(units, loads, start, traffic=traffic), loads)

    def jobs_for(
        self, run: Run, share: Share, blame: tuple[str, NodeRaised] | None = None
    ) -> list[Job]:
        """The jobs (node requests) that render ``share`` of ``run`` on its node."""
        return [Job(run, chunk, blame=blame) for chunk in self._chunks(run, share)]

    def _chunks(self, run: Run, share: Share) -> list[Chunk]:
        """Cut a share of units into node requests: whole batches go as one request."""
        request = run.request
        if request.split_by_iteration:
            size = request.unit_size
            return [Chunk(share.start * size, size, share.count)]
        limit = self._forecast.batch_limit(share.node, request)
        return chunk_share(share, max(limit or 1, 1))
