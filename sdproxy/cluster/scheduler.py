"""Runs generation requests on the cluster: one queue per node, dispatch, failover, merge.

A webui renders one job at a time, so each node has a lane: a FIFO of jobs (one HTTP request
each) run one after the other by the lane's task. A request is planned into shares that end it
as early as each node's speed model and backlog (predicted seconds of work queued or running on
it) allow, each share cut into jobs, and the jobs queued on their nodes' lanes, first come
first served. Every finished job teaches its node's model. When a lane runs dry while jobs of a
request still wait on another lane, the idle node takes over the part of the waiting work it
finishes earlier (work stealing). When a job fails on a node, the node is marked down and the
job, with every job still waiting on that lane, is planned again onto the usable nodes: seeds
were fixed up front, so any image renders the same anywhere. Work that finds no usable node is
parked until a node comes back or ``wait_for_node_s`` passes (parking.py). One watcher task per
node probes it (every interval while up, after a growing cooldown while down; watcher.py). Run,
Job and Lane are in lanes.py.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import statistics
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp

from sdproxy.cluster import stealing, watcher
from sdproxy.cluster.checkpoints import ModelCatalog
from sdproxy.cluster.lanes import Job, Lane, Run
from sdproxy.cluster.parking import Parking
from sdproxy.config import Settings
from sdproxy.core import images
from sdproxy.core.merge import Merged, merge_parts, with_grid
from sdproxy.core.planner import Chunk, NodeLoad, Share, chunk_share, plan_under_load
from sdproxy.core.request import GenerationRequest, resolve_seeds
from sdproxy.core.speed import NOMINAL_PER_UNIT_S, SpeedEstimate, work_per_image
from sdproxy.errors import (
    GenerationFailed,
    NodeError,
    NodeRaised,
    NoNodeAvailable,
    NotFound,
    QueueFull,
    RequestTimeout,
    SdproxyError,
)
from sdproxy.nodes.client import NodeClient, probe_all
from sdproxy.ops.metrics import Metrics

log = logging.getLogger(__name__)

Blame = tuple[NodeClient, NodeRaised]  # a node whose job raised, and what it raised


@dataclass
class GenerationResult:
    """What a handler sends back: the webui's JSON envelope and who rendered what."""

    body: dict[str, Any]
    shares: list[tuple[str, int, int]]  # (node, first image, last image)


class Cluster:
    """Every node behind sdproxy, their lanes, and the requests running on them."""

    steal_interval_s = 0.5  # how often an idle lane looks for late work elsewhere

    def __init__(
        self,
        settings: Settings,
        session: aiohttp.ClientSession,
        rng: random.Random | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.runs: set[Run] = set()  # requests in flight, for /cluster/status
        self.clients = [
            NodeClient(session, node, settings.scheduler, self.metrics.observe_node_failure)
            for node in settings.nodes
        ]
        self.lanes = {client.name: Lane(client, self) for client in self.clients}
        self.models = ModelCatalog(self.clients, settings.api)
        self._rng = rng or random.SystemRandom()
        self._tasks: list[asyncio.Task[None]] = []
        self._wakes = {client.name: asyncio.Event() for client in self.clients}
        self.parking = Parking(settings.scheduler.wait_for_node_s, self._no_node)

    async def start(self) -> None:
        """Probe every node once, then start the lanes and one health watcher per node."""
        await probe_all(self.clients, self.settings.scheduler.health_timeout_s)
        async with asyncio.TaskGroup() as group:
            for client in self.healthy_clients():
                group.create_task(self.models.sync(client))
        for lane in self.lanes.values():
            self._tasks.append(asyncio.create_task(lane.run_forever(), name=lane.client.name))
        for client in self.clients:
            watch = watcher.watch_node(self, client, self._wakes[client.name])
            self._tasks.append(asyncio.create_task(watch, name=f"{client.name}-h"))

    async def aclose(self) -> None:
        """Stop the lanes and the watchers; requests still waiting fail with 503."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)  # all cancelled on purpose
        self._tasks.clear()
        await self.models.aclose()
        self.parking.cancel_timers()
        waiting = [job for lane in self.lanes.values() for job in lane.take_pending()]
        for job in [*waiting, *self.parking.take_all()]:
            job.run.fail(NoNodeAvailable("sdproxy is shutting down"))

    def client(self, name: str) -> NodeClient:
        """The node called ``name``; NotFound (404) if there is none."""
        for client in self.clients:
            if client.name == name:
                return client
        raise NotFound(f"no node named {name!r}")

    def healthy_clients(self) -> list[NodeClient]:
        """Nodes that may be given work: up and not disabled."""
        return [client for client in self.clients if client.usable]

    @property
    def waiting_images(self) -> int:
        """Images of requests parked until a node comes back."""
        return self.parking.waiting_images

    # --- speed -----------------------------------------------------------------------------

    def estimate(self, lane: Lane) -> SpeedEstimate:
        """The lane's speed; an unmeasured node is scaled like the measured ones, by weight."""
        return lane.model.estimate(self._nominal_per_unit_s())

    def predict_s(self, lane: Lane, work: float, requests: int = 1) -> float:
        return self.estimate(lane).predict_s(work, requests)

    def predict_job_s(self, node: str, request: GenerationRequest, images: int) -> float | None:
        """Predicted seconds ``node`` takes to render ``images`` of ``request``.

        The share's own running time (as the one or two node requests it is cut into), not the
        wait for the work queued before it. None while nothing was measured on the node
        (neither a benchmark nor a finished job): then only the configured weight is known.
        """
        lane = self.lanes.get(node)
        if lane is None or not lane.model.measured or images <= 0:
            return None
        unit = request.unit_size
        limit = self.batch_limit(lane, request)
        requests = (
            1 if limit is None else max(1, len(chunk_share(Share(node, 0, images // unit), limit)))
        )
        return lane.model.estimate().predict_s(images * work_per_image(request), requests)

    def share_deadline_s(self, node: str, request: GenerationRequest, images: int) -> float:
        """How long one node request may take before the node counts as failed."""
        scheduler = self.settings.scheduler
        predicted = self.predict_job_s(node, request, images)
        if predicted is None:
            return scheduler.share_timeout_floor_s
        return max(scheduler.share_timeout_floor_s, scheduler.share_timeout_factor * predicted)

    def _nominal_per_unit_s(self) -> float:
        """Seconds per unit at weight 1, as the measured nodes show it (or a nominal guess)."""
        measured = [
            lane.model.estimate().per_unit_s * lane.model.weight
            for lane in self.lanes.values()
            if lane.model.measured
        ]
        return statistics.median(measured) if measured else NOMINAL_PER_UNIT_S

    # --- requests --------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Render ``request`` on the usable nodes and merge the answers into one."""
        eligible = self.healthy_clients()
        if eligible:
            self._check_queue(request, eligible)
        seeds = resolve_seeds(request, self._rng)
        run = Run(
            request,
            seeds,
            remaining=request.total_images,
            work_per_image=work_per_image(request),
        )
        if eligible:
            await self.models.prepare(request, eligible)
        if request.splittable:
            job = Job(run, Chunk(0, request.total_images, 1))
        else:
            job = Job(run, Chunk(0, request.batch_size, request.n_iter), whole=True)
        # A routing error (no node has the checkpoint) goes to the client; no usable node parks.
        self.dispatch(job, routing_errors=True)
        self.runs.add(run)
        try:
            async with asyncio.timeout(self.settings.scheduler.request_timeout_s):
                await run.done.wait()
        except TimeoutError:
            run.fail(RequestTimeout("the request took longer than request_timeout_s"))
        except asyncio.CancelledError:
            # The client disconnected (aiohttp cancels the handler): drop unstarted jobs.
            run.abandon()
            raise
        finally:
            self.runs.discard(run)
        if run.error is not None:
            raise run.error
        if not request.splittable:
            return GenerationResult(run.whole, [])
        if not run.parts:  # interrupted, and the nodes it was on failed
            why = "interrupted, and no node returned an image"
            raise GenerationFailed(f"generation failed: {why}", failures=dict(run.failures))
        merged = merge_parts(request, seeds, run.parts, partial=run.interrupted)
        if merged.grid_wanted:
            merged = await self._add_grid(merged, request)
        return GenerationResult(merged.to_json_dict(), merged.shares)

    def queued_images(self) -> int:
        return sum(lane.queued_images for lane in self.lanes.values())

    def _check_queue(self, request: GenerationRequest, healthy: list[NodeClient]) -> None:
        """429 when this request would take the queue past max_queued_images."""
        limit = self.settings.scheduler.max_queued_images
        queued = self.queued_images()
        if queued and queued + request.total_images > limit:
            now = asyncio.get_running_loop().time()
            soonest = min(self.lanes[c.name].backlog_s(now) for c in healthy)
            retry_after = min(max(math.ceil(soonest), 1), 600)
            raise QueueFull(
                f"{queued} images are queued; sdproxy takes at most {limit} "
                f"(scheduler.max_queued_images)",
                retry_after_s=retry_after,
            )

    def _whole_lane(self, job: Job, healthy: list[NodeClient]) -> Lane:
        """The lane that would finish an unsplit job first."""
        now = asyncio.get_running_loop().time()
        lanes = [self.lanes[c.name] for c in healthy]
        return min(lanes, key=lambda lane: lane.backlog_s(now) + self.predict_s(lane, job.work))

    def _plan(self, run: Run, units: int, start: int, healthy: list[NodeClient]) -> list[Share]:
        """Shares of ``units`` from ``start`` that end earliest given every node's backlog."""
        request = run.request
        now = asyncio.get_running_loop().time()
        unit_work = run.work_per_image * request.unit_size
        loads = []
        for client in healthy:
            lane = self.lanes[client.name]
            limit = self.batch_limit(lane, request)
            if limit == 0:
                continue
            estimate = self.estimate(lane)
            loads.append(
                NodeLoad(
                    client.name,
                    overhead_s=estimate.overhead_s,
                    per_unit_s=estimate.per_unit_s * unit_work,
                    backlog_s=lane.backlog_s(now),
                    batch_limit=limit,
                )
            )
        if not loads:
            raise NoNodeAvailable(
                f"no healthy node takes {request.width}x{request.height} images "
                "within its max_pixels"
            )
        # On a busy cluster each extra node request delays the work queued behind it on that
        # node by its overhead: penalty len(loads) counts every overhead second in full (the
        # planner divides by the node count). Measured in benchmarks/makespan.py against a
        # penalty of 1: concurrent makespans 1.37 -> 1.11, 3.07 -> 2.97, 0.92 -> 0.81 and
        # 2.27 -> 2.32 s; single requests on an idle cluster are planned as before.
        busy = any(load.backlog_s > 0 for load in loads) or any(
            other is not run and not other.finished for other in self.runs
        )
        return plan_under_load(units, loads, start, penalty=float(len(loads)) if busy else 0.0)

    def batch_limit(self, lane: Lane, request: GenerationRequest) -> int | None:
        """Units one node request of ``lane`` may carry: None for whole-batch units, 0 for none.

        Single images go in batches no larger than the client's batch_size (what the client
        knows fits in VRAM), the node's max_batch_size, nor its max_pixels.
        """
        if request.split_by_iteration:
            return None
        node = lane.client.settings
        limit = request.batch_size
        if node.max_batch_size is not None:
            limit = min(limit, node.max_batch_size)
        if node.max_pixels is not None:
            pixels = max(request.width * request.height, request.hr_width * request.hr_height)
            limit = min(limit, node.max_pixels // pixels)
        return limit

    def dispatch(self, job: Job, *, routing_errors: bool = False) -> None:
        """Queue a job's images on the usable nodes that may render it, or park it.

        With ``routing_errors``, a request no node may render (its checkpoint is nowhere)
        raises; otherwise that job waits like one with no usable node.
        """
        run = job.run
        if run.finished:
            return
        if run.interrupted and not job.whole:  # the client wants what is done, not the rest
            run.drop(job.chunk.images)
            return
        usable = self.healthy_clients()
        if usable:
            try:
                usable = self.models.select(run.request, usable)
            except SdproxyError:
                if routing_errors:
                    raise
                usable = []
        # Work that raised on a node (a webui 500) is retried on the others, if there are any.
        usable = [c for c in usable if c.name not in run.raised] or usable
        if not usable:
            self.parking.park(job)
            return
        job.parked_at = None
        if job.whole:
            self._whole_lane(job, usable).submit(job)
            return
        unit = run.request.unit_size
        try:
            shares = self._plan(run, job.chunk.images // unit, job.chunk.start // unit, usable)
        except NoNodeAvailable as exc:  # no usable node takes images this large (max_pixels)
            if routing_errors:
                raise
            run.fail(exc)
            return
        self._queue(run, shares, blame=job.blame)

    def failover(self, lane: Lane, failed: Job, error: NodeError) -> None:
        """Plan a failed job, and every job waiting behind it, onto the usable nodes."""
        run, client = failed.run, lane.client
        self.metrics.observe_failover(error.node)
        self._take_out(client, error)
        if not run.finished:
            run.failures[error.node] = error.reason
            run.redispatches += 1
            if run.redispatches > self.settings.scheduler.max_redispatches:
                failures = dict(run.failures)
                run.fail(GenerationFailed("generation failed: too many failed attempts", failures))
            else:
                self.dispatch(failed)

    def retry_elsewhere(self, lane: Lane, failed: Job, error: NodeRaised) -> None:
        """A job raised on a node that is up (a webui 500): try its images elsewhere, once.

        The node stays up. If a second node raises too, or no other node may take the work,
        the request is at fault: the client gets the node's body (422) and no node is taken
        out. If another node renders the images, the first node was at fault (see blame()).
        """
        run, client = failed.run, lane.client
        client.record_raised(error)
        run.raised.add(client.name)
        if run.finished:
            return
        others = [c for c in self._routable(run) if c.name not in run.raised]
        if len(run.raised) >= 2 or not others:
            run.fail(error)
            return
        self.metrics.observe_failover(client.name)
        failed.blame = (client, error)
        self.dispatch(failed)

    def blame(self, job: Job) -> None:
        """Images that raised on one node rendered on another: take the first node out."""
        if job.blame is None:
            return
        client, error = job.blame
        if client.usable:
            log.warning("node %s raised on work another node rendered", client.name)
            self._take_out(client, error)

    def _take_out(self, client: NodeClient, error: NodeError) -> None:
        """Mark a node down after a failure and move the work waiting on it elsewhere."""
        if client.record_failure(error):
            log.warning("node %s is down: %s", client.name, error.reason)
        self._wakes[client.name].set()  # its watcher now waits for the cooldown, not the interval
        self.drain(self.lanes[client.name])

    def _routable(self, run: Run) -> list[NodeClient]:
        """The usable nodes that may render ``run`` (its checkpoint is there)."""
        try:
            return self.models.select(run.request, self.healthy_clients())
        except SdproxyError:
            return []

    def disable(self, name: str) -> NodeClient:
        """Take a node out of service by hand; its waiting jobs move to other nodes."""
        client = self.client(name)
        client.health.disable()
        self.drain(self.lanes[name])
        return client

    def enable(self, name: str) -> NodeClient:
        """Put a node back into service; it is probed at once."""
        client = self.client(name)
        client.health.enable(time.time())
        self._wakes[name].set()
        if client.usable:
            self.resume_parked()
        return client

    def _no_node(self) -> NoNodeAvailable:
        """The 503 for parked work that met no node failure: why, and when to retry."""
        retry_after_s = watcher.retry_after_s(
            self.clients, self.settings.scheduler.health_interval_s
        )
        return NoNodeAvailable(watcher.why_none(self.clients), retry_after_s=retry_after_s)

    def drain(self, lane: Lane) -> None:
        """Dispatch the jobs waiting on ``lane`` again (its node is down or disabled)."""
        for job in lane.take_pending():
            self.dispatch(job)

    def resume_parked(self) -> None:
        """Dispatch the work that waits for a usable node."""
        for job in self.parking.take_all():
            self.dispatch(job)

    def running_jobs(self) -> list[tuple[Lane, Job]]:
        """Every job a node is rendering right now for a request still in flight."""
        return [
            (lane, lane.current)
            for lane in self.lanes.values()
            if lane.current is not None and not lane.current.run.finished
        ]

    def interrupt_running(self) -> list[NodeClient]:
        """Mark the running requests interrupted and drop their waiting jobs.

        Returns the nodes to send the interrupt to. Requests only queued (not rendering
        anywhere yet) go on, as requests waiting on a webui's queue lock do.
        """
        running = self.running_jobs()
        runs = {job.run for _, job in running}
        for run in runs:
            run.interrupted = True
        for lane in self.lanes.values():
            kept = [job for job in lane.pending if job.run not in runs]
            for job in lane.pending:
                if job.run in runs:
                    job.run.drop(job.chunk.images)
            lane.pending = deque(kept)
        self.parking.drop_interrupted(runs)
        return [lane.client for lane, _ in running]

    def _queue(self, run: Run, shares: Iterable[Share], blame: Blame | None = None) -> None:
        for share in shares:
            for job in self.jobs_for(run, share, blame):
                self.lanes[share.node].submit(job)

    def jobs_for(self, run: Run, share: Share, blame: Blame | None = None) -> list[Job]:
        """The jobs (node requests) that render ``share`` of ``run`` on its node."""
        return [Job(run, chunk, blame=blame) for chunk in self._chunks(run.request, share)]

    def _chunks(self, request: GenerationRequest, share: Share) -> list[Chunk]:
        """Cut a share of units into node requests: whole batches go as one request."""
        if request.split_by_iteration:
            size = request.unit_size
            return [Chunk(share.start * size, size, share.count)]
        limit = self.batch_limit(self.lanes[share.node], request)
        return chunk_share(share, max(limit or 1, 1))

    def rebalance(self) -> bool:
        """Let idle healthy lanes take over waiting work they finish earlier; True if any did."""
        return stealing.rebalance(self)

    async def _add_grid(self, merged: Merged, request: GenerationRequest) -> Merged:
        if not request.send_images:
            return with_grid(merged, None)
        infotexts = merged.info.get("infotexts") or [None]
        rendered = merged.images[: merged.rendered]  # not the extra images after them
        grid = await asyncio.to_thread(images.build_grid, rendered, infotexts[0])
        return with_grid(merged, grid)
