"""Runs generation requests on the cluster: one queue per node, dispatch, failover, merge.

A webui renders one job at a time, so each node has a lane (lanes.py): a FIFO of jobs (one
HTTP request each) run one after the other. A request is planned into shares, each share
cut into jobs, and the jobs queued on their nodes' lanes. When a job fails on a node, the node
is marked down and the job, with every job still waiting on that lane, is planned again onto
the usable nodes: seeds were fixed up front, so any image renders the same anywhere. Work that
finds no usable node is parked until a node comes back or ``wait_for_node_s`` passes. One
watcher task per node probes it (every interval while up, after a growing cooldown while down).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp

from sdproxy import images
from sdproxy.checkpoints import ModelCatalog
from sdproxy.config import Settings
from sdproxy.errors import (
    GenerationFailed,
    NodeBadResponse,
    NodeError,
    NoNodeAvailable,
    NotFound,
    RepeatedWebuiError,
    RequestTimeout,
    SdproxyError,
)
from sdproxy.lanes import Job, Lane, Run
from sdproxy.merge import Merged, merge_parts, with_grid
from sdproxy.metrics import Metrics
from sdproxy.nodes import NodeClient, check_node, probe_all
from sdproxy.planner import Chunk, NodeCapacity, Share, chunk_share, plan_split
from sdproxy.request import GenerationRequest, resolve_seeds

log = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    """What a handler sends back: the webui's JSON envelope and who rendered what."""

    body: dict[str, Any]
    shares: list[tuple[str, int, int]]  # (node, first image, last image)


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
        self._wakes = {client.name: asyncio.Event() for client in self.clients}
        self._parked: list[Job] = []
        self._timers: set[asyncio.TimerHandle] = set()

    async def start(self) -> None:
        """Probe every node once, then start the lanes and one health watcher per node."""
        await probe_all(self.clients, self.settings.scheduler.health_timeout_s)
        async with asyncio.TaskGroup() as group:
            for client in self.healthy_clients():
                group.create_task(self.models.sync(client))
        for lane in self.lanes.values():
            self._tasks.append(asyncio.create_task(lane.run_forever(), name=lane.client.name))
        for client in self.clients:
            self._tasks.append(asyncio.create_task(self._watch(client), name=f"{client.name}-h"))

    async def aclose(self) -> None:
        """Stop the lanes and the watchers; requests still waiting fail with 503."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)  # all cancelled on purpose
        self._tasks.clear()
        await self.models.aclose()
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        waiting = [job for lane in self.lanes.values() for job in lane.take_pending()]
        for job in [*waiting, *self._parked]:
            job.run.fail(NoNodeAvailable("sdproxy is shutting down"))
        self._parked.clear()

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
        return sum(job.chunk.images for job in self._parked if not job.run.finished)

    def predict_job_s(self, node: str, request: GenerationRequest, images: int) -> float | None:
        """Seconds ``node`` should take for ``images`` of ``request``; None when unknown.

        Issue 3's speed model fills this in; until then there is no prediction.
        """
        return None

    def share_deadline_s(self, node: str, request: GenerationRequest, images: int) -> float:
        """How long one node request may take before the node counts as failed."""
        scheduler = self.settings.scheduler
        predicted = self.predict_job_s(node, request, images)
        if predicted is None:
            return scheduler.share_timeout_floor_s
        return max(scheduler.share_timeout_floor_s, scheduler.share_timeout_factor * predicted)

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Render ``request`` on the usable nodes and merge the answers into one."""
        seeds = resolve_seeds(request, self._rng)
        run = Run(request, seeds, remaining=request.total_images)
        usable = self.healthy_clients()
        if usable:
            await self.models.prepare(request, usable)
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
        if not usable:
            self._park(job)
            return
        job.parked_at = None
        if job.whole:
            node = min(usable, key=lambda c: self.lanes[c.name].queued_images / _weight(c))
            self.lanes[node.name].submit(job)
            return
        unit = run.request.unit_size
        shares = plan_split(
            job.chunk.images // unit, self._capacities(usable), job.chunk.start // unit
        )
        self._queue(run, shares)

    def failover(self, lane: Lane, failed: Job, error: NodeError) -> None:
        """Plan a failed job, and every job waiting behind it, onto the usable nodes."""
        run, client = failed.run, lane.client
        if not run.finished and self._same_webui_error(run, error):
            # The request is at fault, not this node: it stays up.
            client.record_success()
            return
        self.metrics.observe_failover(error.node)
        if client.record_failure(error):
            log.warning("node %s is down: %s", client.name, error.reason)
        self._wakes[client.name].set()  # its watcher now waits for the cooldown, not the interval
        if not run.finished:
            run.failures[error.node] = error.reason
            run.redispatches += 1
            if run.redispatches > self.settings.scheduler.max_redispatches:
                failures = dict(run.failures)
                run.fail(GenerationFailed("generation failed: too many failed attempts", failures))
            else:
                self.dispatch(failed)
        self._drain(lane)

    def disable(self, name: str) -> NodeClient:
        """Take a node out of service by hand; its waiting jobs move to other nodes."""
        client = self.client(name)
        client.health.disable()
        self._drain(self.lanes[name])
        return client

    def enable(self, name: str) -> NodeClient:
        """Put a node back into service; it is probed at once."""
        client = self.client(name)
        client.health.enable(time.time())
        self._wakes[name].set()
        if client.usable:
            self.resume_parked()
        return client

    def retry_after_s(self) -> int:
        """When a client should try again: the next probe of a down node, at least 1 s."""
        now = time.time()
        due = [
            c.health.next_probe_at
            for c in self.clients
            if not c.health.disabled and c.health.next_probe_at is not None
        ]
        wait = min(due) - now if due else self.settings.scheduler.health_interval_s
        return max(1, math.ceil(wait))

    def _same_webui_error(self, run: Run, error: NodeError) -> bool:
        """Fail ``run`` with the error if a node already answered this webui error for it."""
        if not isinstance(error, NodeBadResponse) or error.webui_error is None:
            return False
        # The same node counts too: it passed a probe since, so it is up and means it.
        same = [node for node, body in run.webui_errors.items() if body == error.webui_error]
        if not same:
            run.webui_errors[error.node] = error.webui_error
            return False
        status = error.answered or 500
        run.fail(RepeatedWebuiError(status, error.webui_error, [*same, error.node]))
        for name in same:  # marked down for the request's fault: look again now
            if name != error.node:
                self.client(name).health.next_probe_at = time.time()
                self._wakes[name].set()
        return True

    def _drain(self, lane: Lane) -> None:
        for job in lane.take_pending():
            self.dispatch(job)

    def _park(self, job: Job) -> None:
        loop = asyncio.get_running_loop()
        if job.parked_at is None:
            job.parked_at = loop.time()
        self._parked.append(job)
        wait_s = self.settings.scheduler.wait_for_node_s
        timer = loop.call_at(job.parked_at + wait_s, self._expire_parked)
        self._timers.add(timer)

    def _expire_parked(self) -> None:
        loop = asyncio.get_running_loop()
        now, wait_s = loop.time(), self.settings.scheduler.wait_for_node_s
        self._timers = {t for t in self._timers if t.when() > now}
        keep: list[Job] = []
        for job in self._parked:
            run = job.run
            if run.finished:
                continue
            if job.parked_at is not None and job.parked_at + wait_s > now + 1e-3:
                keep.append(job)
            elif run.failures:
                why = f"no usable node came back within {wait_s:g} s"
                run.fail(GenerationFailed(f"generation failed: {why}", dict(run.failures)))
            else:
                message = "no healthy node: every node is down, unreachable or disabled"
                run.fail(NoNodeAvailable(message, retry_after_s=self.retry_after_s()))
        self._parked = keep

    def resume_parked(self) -> None:
        """Dispatch the work that waits for a usable node."""
        parked, self._parked = self._parked, []
        for job in parked:
            self.dispatch(job)

    async def _watch(self, client: NodeClient) -> None:
        """Probe one node: every interval while up, after its cooldown while down."""
        scheduler = self.settings.scheduler
        wake = self._wakes[client.name]
        polls = 0
        while True:
            wake.clear()
            delay = scheduler.health_interval_s
            health = client.health
            if not health.up and health.next_probe_at is not None:
                delay = max(0.0, health.next_probe_at - time.time())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await wake.wait()
            if not health.up and not health.probe_due(time.time()):
                continue  # woken early: wait for the (new) cooldown
            polls += 1
            was_up = health.up
            came_back = await check_node(client, scheduler.health_timeout_s)
            if not health.up:
                if was_up:
                    log.warning("node %s is down: %s", client.name, health.last_error)
                    self._drain(self.lanes[client.name])
                continue
            if came_back:
                log.info("node %s is back", client.name)
            # A returning node gets its lists read and the cluster's checkpoint before work;
            # every few polls the lists are read again (a webui's lists change on refresh).
            if came_back or not self.models.in_sync(client):
                await self.models.sync(client)
            elif polls % scheduler.inventory_every_polls == 0:
                await self.models.refresh_all([client])
            if client.usable and self._parked:
                self.resume_parked()

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
        for job in self._parked:
            if job.run in runs and not job.whole:
                job.run.drop(job.chunk.images)
        self._parked = [job for job in self._parked if job.run not in runs or job.whole]
        return [lane.client for lane, _ in running]

    def _queue(self, run: Run, shares: Iterable[Share]) -> None:
        for share in shares:
            for chunk in self._chunks(run.request, share):
                self.lanes[share.node].submit(Job(run, chunk))

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
        rendered = merged.images[: request.total_images]  # not the extra images after them
        grid = await asyncio.to_thread(images.build_grid, rendered, infotexts[0])
        return with_grid(merged, grid)


def _weight(client: NodeClient) -> float:
    return client.settings.weight
