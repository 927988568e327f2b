"""Runs generation requests on the cluster: one queue per node, dispatch, failover, merge.

A webui renders one job at a time, so each node has a lane: a FIFO of jobs (one HTTP request
each) run one after the other by the lane's task. A request is planned into shares, each share
cut into jobs, and the jobs queued on their nodes' lanes. When a job fails on a node, the node
is marked down and the job, with every job still waiting on that lane, is planned again onto
the healthy nodes: seeds were fixed up front, so any image renders the same anywhere.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from sdproxy import images
from sdproxy.checkpoints import ModelCatalog
from sdproxy.config import Settings
from sdproxy.errors import (
    GenerationFailed,
    NodeBadResponse,
    NodeError,
    NodeRaised,
    NodeRejected,
    NoNodeAvailable,
    RequestTimeout,
    SdproxyError,
)
from sdproxy.logs import request_id_var
from sdproxy.merge import BadNodeResult, Merged, Part, merge_parts, read_part, with_grid
from sdproxy.metrics import Metrics
from sdproxy.nodes import NodeClient, probe_all
from sdproxy.planner import Chunk, NodeCapacity, Share, chunk_share, plan_split
from sdproxy.request import GenerationRequest, Seeds, node_body, resolve_seeds

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


class Lane:
    """One node's queue of jobs, run one at a time like the webui's own queue lock."""

    def __init__(self, client: NodeClient, cluster: Cluster) -> None:
        self.client = client
        self.pending: deque[Job] = deque()
        self.current: Job | None = None
        self._cluster = cluster
        self._wake = asyncio.Event()

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

    async def run_forever(self) -> None:
        while True:
            while not self.pending:
                self._wake.clear()
                await self._wake.wait()
            job = self.pending.popleft()
            if job.run.finished:
                continue
            self.current = job
            try:
                await self._execute(job)
            finally:
                self.current = None

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

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Render ``request`` on the healthy nodes and merge the answers into one."""
        seeds = resolve_seeds(request, self._rng)
        run = Run(request, seeds, remaining=request.total_images)
        healthy = await self._eligible(request)
        if request.splittable:
            shares = plan_split(request.units, self._capacities(healthy))
            self._queue(run, shares)
        else:
            node = min(healthy, key=lambda c: self.lanes[c.name].queued_images / _weight(c))
            full = Chunk(0, request.batch_size, request.n_iter)
            self.lanes[node.name].submit(Job(run, full, whole=True))
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
                self.lanes[healthy[0].name].submit(job)
            elif run.redispatches > self.settings.scheduler.max_redispatches or not healthy:
                why = "no healthy node left" if not healthy else "too many failed attempts"
                run.fail(GenerationFailed(f"generation failed: {why}", failures=dict(run.failures)))
            else:
                unit = run.request.unit_size
                shares = plan_split(
                    job.chunk.images // unit, self._capacities(healthy), job.chunk.start // unit
                )
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
            shares = plan_split(
                failed.chunk.images // unit, self._capacities(others), failed.chunk.start // unit
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
            for chunk in self._chunks(run.request, share):
                self.lanes[share.node].submit(Job(run, chunk, blame=blame))

    def _chunks(self, request: GenerationRequest, share: Share) -> list[Chunk]:
        """Cut a share of units into node requests.

        Single images go in batches no larger than the client's batch_size (what the client
        knows fits in VRAM) nor the node's max_batch_size; whole batches go as one request.
        """
        if request.split_by_iteration:
            size = request.unit_size
            return [Chunk(share.start * size, size, share.count)]
        limit = request.batch_size
        node_limit = self.lanes[share.node].client.settings.max_batch_size
        if node_limit is not None:
            limit = min(limit, node_limit)
        return chunk_share(share, limit)

    def _capacities(self, clients: list[NodeClient]) -> list[NodeCapacity]:
        return [NodeCapacity(client.name, _weight(client)) for client in clients]

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


def _weight(client: NodeClient) -> float:
    return client.settings.weight
