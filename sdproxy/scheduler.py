"""Runs generation requests on the cluster: one queue per node, dispatch, failover, merge.

A webui renders one job at a time, so each node has a lane: a FIFO of jobs (one HTTP request
each) run one after the other by the lane's task. A request is planned into shares that end it
as early as each node's speed model and backlog (predicted seconds of work queued or running on
it) allow, each share cut into jobs, and the jobs queued on their nodes' lanes, first come
first served. Every finished job teaches its node's model. When a lane runs dry while jobs of a
request still wait on another lane, the idle node takes over the part of the waiting work it
finishes earlier (work stealing). When a job fails on a node, the node is marked down and the
job, with every job still waiting on that lane, is planned again onto the healthy nodes: seeds
were fixed up front, so any image renders the same anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import statistics
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from sdproxy import images, stealing
from sdproxy.checkpoints import ModelCatalog
from sdproxy.config import Settings
from sdproxy.errors import (
    GenerationFailed,
    NodeBadResponse,
    NodeError,
    NodeRaised,
    NodeRejected,
    NoNodeAvailable,
    QueueFull,
    RequestTimeout,
    SdproxyError,
)
from sdproxy.logs import request_id_var
from sdproxy.merge import BadNodeResult, Merged, Part, merge_parts, read_part, with_grid
from sdproxy.metrics import Metrics
from sdproxy.nodes import NodeClient, probe_all
from sdproxy.planner import Chunk, NodeLoad, Share, chunk_share, plan_makespan
from sdproxy.request import GenerationRequest, Seeds, node_body, resolve_seeds
from sdproxy.speed import NOMINAL_PER_UNIT_S, SpeedEstimate, SpeedModel, work_per_image

log = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    """What a handler sends back: the webui's JSON envelope and who rendered what."""

    body: dict[str, Any]
    shares: list[tuple[str, int, int]]  # (node, first image, last image)


@dataclass(eq=False)
class Run:
    """One client request in flight: collects parts until every image is in."""

    request: GenerationRequest
    seeds: Seeds
    parts: list[Part] = field(default_factory=list)
    whole: Any = None  # the raw answer of an unsplit (script) request
    remaining: int = 0
    redispatches: int = 0
    failures: dict[str, str] = field(default_factory=dict)
    raised: set[str] = field(default_factory=set)  # nodes on which a job of this run raised
    error: SdproxyError | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    request_id: str | None = field(default_factory=request_id_var.get)
    started_at: float = field(default_factory=time.time)  # Unix time, for the dashboard
    # Interrupted by the client: short answers are the images finished so far, not failures.
    interrupted: bool = False
    work_per_image: float = 1.0

    @property
    def finished(self) -> bool:
        return self.done.is_set()

    def add(self, part: Part, covered: int) -> None:
        """A node's answer for ``covered`` images (``part`` may hold fewer when interrupted)."""
        if self.finished:
            return
        self.parts.append(part)
        self.drop(covered)

    def drop(self, images: int) -> None:
        """Stop waiting for ``images`` images (rendered, or given up after an interrupt)."""
        self.remaining -= images
        if self.remaining <= 0:
            self.done.set()

    def complete_whole(self, response: Any) -> None:
        if not self.finished:
            self.whole = response
            self.done.set()

    def fail(self, error: SdproxyError) -> None:
        if not self.finished:
            self.error = error
            self.done.set()


@dataclass(eq=False)
class Job:
    """One request to one node: a chunk of a run's images, or the whole unsplit request."""

    run: Run
    chunk: Chunk
    whole: bool = False
    # The node this job's images raised on before (NodeRaised): if they render here, that
    # node, not the request, was at fault, and it is taken out.
    blame: tuple[NodeClient, NodeRaised] | None = None

    @property
    def work(self) -> float:
        """Units of work (images of 20 steps at 512x512) the job renders."""
        return self.chunk.images * self.run.work_per_image


class Lane:
    """One node's queue of jobs, run one at a time like the webui's own queue lock."""

    def __init__(self, client: NodeClient, cluster: Cluster) -> None:
        self.client = client
        self.pending: deque[Job] = deque()
        self.current: Job | None = None
        self.started_at = 0.0  # loop time the current job started
        self.model = SpeedModel(client.settings.weight)
        # Held while a job runs; a benchmark takes it between jobs, never during one.
        self.turn = asyncio.Lock()
        self._cluster = cluster
        self._wake = asyncio.Event()

    @property
    def name(self) -> str:
        return self.client.name

    @property
    def idle(self) -> bool:
        return self.current is None and not self.pending

    def submit(self, job: Job) -> None:
        self.pending.append(job)
        self._wake.set()

    def take_pending(self) -> list[Job]:
        """Remove and return every job not yet started."""
        jobs = list(self.pending)
        self.pending.clear()
        return jobs

    @property
    def queued_images(self) -> int:
        """Images waiting or rendering on this node."""
        jobs = [*self.pending, *([self.current] if self.current else [])]
        return sum(job.chunk.images for job in jobs if not job.run.finished)

    def backlog_s(self, now: float) -> float:
        """Predicted seconds until this node has finished everything queued on it."""
        cluster = self._cluster
        total = 0.0
        if self.current is not None and not self.current.run.finished:
            predicted = cluster.predict_s(self, self.current.work)
            total += max(predicted - (now - self.started_at), 0.0)
        for job in self.pending:
            if not job.run.finished:
                total += cluster.predict_s(self, job.work)
        return total

    async def run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.pending:
                self._wake.clear()
                if self._cluster.rebalance():
                    continue
                # Idle: look again now and then, in case work elsewhere runs late.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._cluster.steal_interval_s):
                        await self._wake.wait()
            async with self.turn:  # a benchmark run may hold it: the job stays visible meanwhile
                if not self.pending:
                    continue  # taken over by another lane while the benchmark ran
                job = self.pending.popleft()
                if job.run.finished:
                    continue
                self.current = job
                self.started_at = loop.time()
                try:
                    await self._execute(job)
                finally:
                    self.current = None
            self._cluster.rebalance()

    async def _execute(self, job: Job) -> None:
        run, chunk, client = job.run, job.chunk, self.client
        request = run.request
        if job.whole:
            body = request.body
        else:
            body = node_body(request, run.seeds, chunk.start, chunk.batch_size, chunk.n_iter)
        timeout_s = self._cluster.settings.scheduler.share_timeout_s
        metrics, started = self._cluster.metrics, time.perf_counter()
        try:
            response = await client.generate(request.kind, body, timeout_s)
            if not run.interrupted:  # a short, interrupted answer says nothing of the speed
                self.model.observe(job.work, time.perf_counter() - started)
            if job.whole:
                run.complete_whole(response)
                client.record_success()
                metrics.observe_job(client.name, "ok", time.perf_counter() - started)
                self._cluster.blame(job)
                return
            try:
                part = read_part(
                    client.name,
                    chunk.start,
                    chunk.images,
                    response,
                    request.send_images,
                    allow_short=run.interrupted,
                )
            except BadNodeResult as exc:
                raise NodeBadResponse(client.name, str(exc)) from exc
        except NodeRejected as exc:
            # The node is fine; the request is not. Every node would say the same.
            client.record_success()
            metrics.observe_job(client.name, "rejected", time.perf_counter() - started)
            run.fail(exc)
        except NodeRaised as exc:
            log.info("node %s raised on images %s..: %s", client.name, chunk.start, exc.reason)
            client.record_raised(exc)
            metrics.observe_job(client.name, "error", time.perf_counter() - started)
            self._cluster.retry_elsewhere(job, client, exc)
        except NodeError as exc:
            log.warning("node %s failed images %s..: %s", client.name, chunk.start, exc.reason)
            client.record_failure(exc)
            metrics.observe_job(client.name, "error", time.perf_counter() - started)
            self._cluster.failover(self, job, exc)
        else:
            client.record_success(part.count)
            metrics.observe_job(client.name, "ok", time.perf_counter() - started, part.count)
            run.add(part, chunk.images)
            self._cluster.blame(job)


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
        self.clients = [NodeClient(session, node, settings.scheduler) for node in settings.nodes]
        self.lanes = {client.name: Lane(client, self) for client in self.clients}
        self.models = ModelCatalog(self.clients, settings.api)
        self._rng = rng or random.SystemRandom()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Probe every node once, then start the lanes and the health poller."""
        await probe_all(self.clients, self.settings.scheduler.health_timeout_s)
        async with asyncio.TaskGroup() as group:
            for client in self.healthy_clients():
                group.create_task(self.models.sync(client))
        for lane in self.lanes.values():
            self._tasks.append(asyncio.create_task(lane.run_forever(), name=lane.client.name))
        self._tasks.append(asyncio.create_task(self._poll_health(), name="health"))

    async def aclose(self) -> None:
        """Stop the lanes and the poller; requests still waiting fail with 503."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)  # all cancelled on purpose
        self._tasks.clear()
        await self.models.aclose()
        for lane in self.lanes.values():
            for job in lane.take_pending():
                job.run.fail(NoNodeAvailable("sdproxy is shutting down"))

    def healthy_clients(self) -> list[NodeClient]:
        return [client for client in self.clients if client.stats.healthy]

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
        """Render ``request`` on the healthy nodes and merge the answers into one."""
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
        healthy = await self._eligible(request)
        if request.splittable:
            self._queue(run, self._plan(run, request.units, 0, healthy))
        else:
            job = Job(run, Chunk(0, request.batch_size, request.n_iter), whole=True)
            self._whole_lane(job, healthy).submit(job)
        self.runs.add(run)
        try:
            async with asyncio.timeout(self.settings.scheduler.request_timeout_s):
                await run.done.wait()
        except TimeoutError:
            run.fail(RequestTimeout("the request took longer than request_timeout_s"))
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
        return plan_makespan(units, loads, start)

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

    def failover(self, lane: Lane, failed: Job, error: NodeError) -> None:
        """Plan a failed job, and every job waiting behind it, onto the healthy nodes."""
        failed.run.failures[error.node] = error.reason
        self.metrics.observe_failover(error.node)
        for job in [failed, *lane.take_pending()]:
            run = job.run
            if run.finished:
                continue
            if run.interrupted and not job.whole:  # the client wants what is done, not the rest
                run.drop(job.chunk.images)
                continue
            if job is failed:
                run.redispatches += 1
            try:
                healthy = self.models.select(run.request, self.healthy_clients())
            except SdproxyError:
                healthy = []
            if job.whole and healthy:
                self._whole_lane(job, healthy).submit(job)
            elif run.redispatches > self.settings.scheduler.max_redispatches or not healthy:
                why = "no healthy node left" if not healthy else "too many failed attempts"
                run.fail(GenerationFailed(f"generation failed: {why}", failures=dict(run.failures)))
            else:
                unit = run.request.unit_size
                try:
                    shares = self._plan(
                        run, job.chunk.images // unit, job.chunk.start // unit, healthy
                    )
                except NoNodeAvailable as exc:
                    run.fail(exc)
                else:
                    self._queue(run, shares)

    async def _eligible(self, request: GenerationRequest) -> list[NodeClient]:
        """The healthy nodes that may render ``request`` (model-aware routing)."""
        healthy = self.healthy_clients()
        if healthy:
            await self.models.prepare(request, healthy)
            healthy = self.healthy_clients()
        if not healthy:
            why = "; ".join(f"{c.name}: {c.stats.last_error or 'down'}" for c in self.clients)
            raise NoNodeAvailable(f"no healthy node ({why})")
        return self.models.select(request, healthy)

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
        return [lane.client for lane, _ in running]

    def retry_elsewhere(self, failed: Job, client: NodeClient, error: NodeRaised) -> None:
        """A job raised on a node that is up: try a node it has not raised on, once.

        If a second node raises too, or no other node is healthy, the request is at fault
        (422 with the node's body) and no node is taken out for it. If another node renders
        the images, the first node is (see blame()).
        """
        run = failed.run
        run.raised.add(error.node)
        if run.finished:
            return
        if run.interrupted and not failed.whole:  # as in failover(): only what is done counts
            run.drop(failed.chunk.images)
            return
        try:
            eligible = self.models.select(run.request, self.healthy_clients())
        except SdproxyError:
            eligible = []
        others = [c for c in eligible if c.name not in run.raised]
        if len(run.raised) >= 2 or not others:
            run.fail(error)
            return
        self.metrics.observe_failover(error.node)
        if failed.whole:
            failed.blame = (client, error)
            self.lanes[others[0].name].submit(failed)
        else:
            unit = run.request.unit_size
            shares = self._plan(
                run, failed.chunk.images // unit, failed.chunk.start // unit, others
            )
            self._queue(run, shares, blame=(client, error))

    def blame(self, job: Job) -> None:
        """Images that raised on one node rendered on another: take the first node out."""
        if job.blame is None:
            return
        client, error = job.blame
        if client.stats.healthy:
            log.warning("node %s raised on work another node rendered: taken out", client.name)
            client.record_failure(error)

    def _queue(
        self, run: Run, shares: Iterable[Share], blame: tuple[NodeClient, NodeRaised] | None = None
    ) -> None:
        for share in shares:
            for job in self.jobs_for(run, share, blame):
                self.lanes[share.node].submit(job)

    def jobs_for(
        self, run: Run, share: Share, blame: tuple[NodeClient, NodeRaised] | None = None
    ) -> list[Job]:
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

    async def _poll_health(self) -> None:
        interval = self.settings.scheduler.health_interval_s
        while True:
            await asyncio.sleep(interval)
            await probe_all(self.clients, self.settings.scheduler.health_timeout_s)
            # A node back after a failure gets the cluster's checkpoint before any work on it.
            self.models.sync_stale(self.healthy_clients())
