"""A request in flight (Run), one node request (Job), and each node's queue of them (Lane).

A webui renders one job at a time, so each node has a lane: a FIFO of jobs run one after the
other by the lane's task, which also teaches the node's speed model from every finished job.
What to do with a failed job is the cluster's business (``Cluster.failover`` in scheduler.py);
a lane only reports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sdproxy.core.answers import answer_budget, asked_of
from sdproxy.core.merge import Part
from sdproxy.core.planner import Chunk
from sdproxy.core.request import GenerationRequest, Seeds, node_body
from sdproxy.core.speed import SpeedModel
from sdproxy.errors import NodeError, NodeRaised, NodeRejected, SdproxyError
from sdproxy.logs import request_id_var
from sdproxy.nodes.client import NodeClient

if TYPE_CHECKING:
    from sdproxy.cluster.scheduler import Cluster

log = logging.getLogger(__name__)


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
    abandoned: bool = False  # the client went away
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

    def abandon(self) -> None:
        """The client disconnected: jobs not yet started are dropped."""
        if not self.finished:
            self.abandoned = True
            self.done.set()


@dataclass(eq=False)
class Job:
    """One request to one node: a chunk of a run's images, or the whole unsplit request."""

    run: Run
    chunk: Chunk
    whole: bool = False
    parked_at: float | None = None  # loop time it started waiting for a usable node
    # The node these images raised on before (a webui 500): if they render elsewhere, that
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
                if not self.client.usable:  # went down or was disabled after it was queued
                    self._cluster.dispatch(job)
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
        timeout_s = self._cluster.share_deadline_s(client.name, request, chunk.images)
        metrics, started = self._cluster.metrics, time.perf_counter()
        try:
            budget = answer_budget(request, chunk.images, script=job.whole)
            response = await client.generate(request.kind, body, timeout_s, budget)
            if not run.interrupted:  # a short, interrupted answer says nothing of the speed
                self.model.observe(job.work, time.perf_counter() - started)
            if job.whole:
                await client.check_script_answer(response, request.send_images)
                run.complete_whole(response)
                self._succeeded()
                metrics.observe_job(client.name, "ok", time.perf_counter() - started)
                self._cluster.blame(job)
                return
            asked = asked_of(request, body)
            part = await client.read_part(chunk.start, response, asked, allow_short=run.interrupted)
        except NodeRejected as exc:
            # The node is fine; the request is not. Every node would say the same.
            self._succeeded()
            metrics.observe_job(client.name, "rejected", time.perf_counter() - started)
            run.fail(exc)
        except NodeRaised as exc:
            log.info("node %s raised on images %s..: %s", client.name, chunk.start, exc.reason)
            metrics.observe_job(client.name, "error", time.perf_counter() - started)
            self._cluster.retry_elsewhere(self, job, exc)
        except NodeError as exc:
            log.warning("node %s failed images %s..: %s", client.name, chunk.start, exc.reason)
            metrics.observe_job(client.name, "error", time.perf_counter() - started)
            self._cluster.failover(self, job, exc)
        else:
            self._succeeded(part.count)
            metrics.observe_job(client.name, "ok", time.perf_counter() - started, part.count)
            run.add(part, chunk.images)
            self._cluster.blame(job)

    def _succeeded(self, images: int = 0) -> None:
        if self.client.record_success(images) and self.client.usable:
            # A probe had marked it down meanwhile: work parked for a node can use it now.
            self._cluster.resume_parked()
