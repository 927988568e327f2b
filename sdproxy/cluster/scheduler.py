"""Runs generation requests on the cluster: the Cluster that ties the package together.

Each node has a lane (lanes.py) that runs its jobs one at a time. A request is planned into
shares that end it earliest (dispatch.py), cut into jobs queued on their nodes' lanes; each
outcome is acted on (settle.py: failover replans a failed node's images with the same seeds);
idle lanes take over late work (stealing.py); work with no usable node is parked (parking.py);
one watcher per node probes it (watcher.py); a finished run is merged (answers.py).

The Cluster holds what this process runs (lanes, requests in flight) and leaves what every
replica shares to the ClusterState (state.py). Its tasks are supervised: a job whose handling
raises is logged, tried once elsewhere, then answered with a 500 naming the request.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from typing import Any

import aiohttp

from sdproxy.cluster import interrupts, stealing
from sdproxy.cluster.answers import GenerationResult, LastRun, answer
from sdproxy.cluster.checkpoints import CheckpointRouter
from sdproxy.cluster.choose import open_state
from sdproxy.cluster.clock import Clock, LoopClock
from sdproxy.cluster.dispatch import Dispatcher
from sdproxy.cluster.execute import execute
from sdproxy.cluster.forecast import Forecast
from sdproxy.cluster.lanes import Lane
from sdproxy.cluster.parking import Parking
from sdproxy.cluster.published import Published
from sdproxy.cluster.settle import Settler
from sdproxy.cluster.state import ClusterState
from sdproxy.cluster.supervise import Supervisor
from sdproxy.cluster.watcher import probe_once, retry_after_s, watch_node, why_none
from sdproxy.cluster.work import Job, Run, ownership_problems
from sdproxy.config import Settings
from sdproxy.core.planner import Chunk, Share
from sdproxy.core.request import GenerationRequest, resolve_seeds
from sdproxy.core.speed import work_per_image
from sdproxy.errors import (
    NodeError,
    NodeRaised,
    NoNodeAvailable,
    NotFound,
    RequestTimeout,
    SdproxyError,
)
from sdproxy.logs import log_crash
from sdproxy.nodes.client import NodeClient
from sdproxy.nodes.fanout import call_each
from sdproxy.ops.metrics import Metrics

log = logging.getLogger(__name__)


class Cluster:
    """Every node behind sdproxy, their lanes, and the requests this process runs on them."""

    def __init__(
        self,
        settings: Settings,
        session: aiohttp.ClientSession,
        *,
        rng: random.Random | None = None,
        metrics: Metrics | None = None,
        clock: Clock | None = None,
        state: ClusterState | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.clock = clock or LoopClock()
        self.state = state or open_state(settings, self.clock)
        scheduler = settings.scheduler
        self.clients = {n.name: NodeClient(session, n, scheduler) for n in settings.nodes}
        self.runs: set[Run] = set()  # requests in flight, and left ones with jobs still running
        self.lanes = {name: Lane(name, self) for name in self.clients}
        self.forecast = Forecast(self.state, {n.name: n for n in settings.nodes}, scheduler)
        self.router = CheckpointRouter(
            self.clients, self.state, settings.api, self.note_failure, self.clock.wall
        )
        self.parking = Parking(self.clock, scheduler.wait_for_node_s, self._no_node)
        self.dispatcher = Dispatcher(
            self.lanes, self.forecast, self.router, self.parking, self.state, self.clock, self.runs
        )
        self.settler = Settler(
            self.state,
            self.dispatcher,
            self.metrics,
            scheduler.max_redispatches,
            lambda node: self._wakes[node].set(),
        )
        # Finished requests nobody received ("finish" on disconnect) go here: autosave.
        self.unseen_results: Callable[[GenerationResult], None] | None = None
        self._rng = rng or random.SystemRandom()
        self.last_run = LastRun()  # what an idle /progress still shows
        self._supervisor = Supervisor(self.clock)
        self._tasks: set[asyncio.Task[None]] = set()
        self._wakes = {name: asyncio.Event() for name in self.clients}
        self.state.on_health_change(self._health_changed)
        self.state.track(Published(self.lanes, self.runs, self.clock))
        self.state.on_broadcast(
            "interrupt", lambda: self._relay("interrupt", self.interrupt_running())
        )
        self.state.on_broadcast("skip", lambda: self._relay("skip", self.running_nodes()))
        self.state.on_checkpoint(
            lambda: self._spawn(self.router.refresh_all(list(self.clients)), "refresh")
        )

    async def start(self) -> None:
        """Join the replicas, probe every node once, sync the usable ones, start the lanes."""
        await self.state.start()
        timeout_s = self.settings.scheduler.health_timeout_s
        async with asyncio.TaskGroup() as group:
            for name in self.clients:
                group.create_task(probe_once(self, name, timeout_s))
        async with asyncio.TaskGroup() as group:
            for name in self.dispatcher.usable_nodes():
                group.create_task(self.router.sync(name))
        for name, lane in self.lanes.items():
            self._supervisor.start(f"lane {name}", lane.run_forever)
            self._supervisor.start(f"watcher {name}", self._watch(name))

    def _watch(self, node: str) -> Callable[[], Coroutine[Any, Any, None]]:
        return lambda: watch_node(self, node, self.settings.scheduler, self._wakes[node])

    async def aclose(self) -> None:
        """Stop the lanes and the watchers; requests still in flight fail with 503."""
        await self._supervisor.aclose()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)  # all cancelled on purpose
        self.parking.cancel_timers()
        interrupts.withdraw(set(self.runs), self.lanes, self.parking)
        for run in self.runs:
            run.fail(NoNodeAvailable("sdproxy is shutting down"))
        await self.state.aclose()

    def client(self, name: str) -> NodeClient:
        """The node called ``name``; NotFound (404) if there is none."""
        if name not in self.clients:
            raise NotFound(f"no node named {name!r}")
        return self.clients[name]

    def usable_clients(self) -> list[NodeClient]:
        """Nodes that may be given work: up and not disabled."""
        return [self.clients[name] for name in self.dispatcher.usable_nodes()]

    def queued_images(self) -> int:
        return self.dispatcher.queued_images()

    def backlog_s(self, node: str) -> float:
        return self.dispatcher.backlog_s(self.lanes[node], self.clock.now())

    def ownership_problems(self) -> list[str]:
        """Breaches of "every image in flight has exactly one owner" (tests check it is [])."""
        placed = [("parking", job) for job in self.parking.jobs]
        for lane in self.lanes.values():
            placed += [(f"node {lane.name}", job) for job in lane.pending]
            placed += [(f"node {lane.name} (running)", lane.running)] if lane.running else []
        return ownership_problems(self.runs, placed)

    # --- requests --------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Render ``request`` on the usable nodes and merge the answers into one."""
        self.state.admit()
        usable = self.dispatcher.usable_nodes()
        if usable:
            self.dispatcher.check_queue(request, usable, self.settings.scheduler.max_queued_images)
        run = Run(
            request,
            resolve_seeds(request, self._rng),
            remaining=request.total_images,
            work_per_image=work_per_image(request),
            started_at=self.clock.wall(),
        )
        warnings = []
        if usable:
            await self.router.prepare(request, usable)
            fallback = self.router.select(request, usable).fallback
            if fallback is not None:
                log.warning(
                    "no node has checkpoint %r: rendering with the loaded one", fallback[:100]
                )
                warnings.append("checkpoint not found on any node; rendered with the loaded one")
        whole = not request.splittable
        size = (request.batch_size, request.n_iter) if whole else (request.total_images, 1)
        problem = self.dispatcher.dispatch(Job(run, Chunk(0, *size), whole=whole), first=True)
        if problem is not None:  # no node may render it: the client hears why at once
            raise problem
        self.runs.add(run)
        try:
            async with asyncio.timeout(self.settings.scheduler.request_timeout_s):
                await run.done.wait()
        except TimeoutError:
            run.fail(RequestTimeout("the request took longer than request_timeout_s"))
        except asyncio.CancelledError:  # the client disconnected (aiohttp cancels the handler)
            self._client_left(run)
            raise
        finally:
            if run.finished:
                self._withdraw(run)
        result = await answer(run, self.last_run)
        result.warnings.extend(warnings)
        return result

    def _client_left(self, run: Run) -> None:
        """Nobody will read ``run``'s answer: interrupt it, or finish it for autosave."""
        mode = self.settings.scheduler.on_disconnect
        if mode is None:
            mode = "finish" if self.unseen_results is not None else "interrupt"
        if mode == "finish":
            self._spawn(self._finish_unseen(run), f"finish {run.request_id}")
            return
        run.interrupted = True  # short answers from the nodes are expected now
        run.abandon()
        self._withdraw(run)
        nodes = [name for name, job in self.running_jobs() if job.run is run]
        if nodes:
            self._spawn(self.tell(nodes, "interrupt"), f"interrupt {run.request_id}")

    async def _finish_unseen(self, run: Run) -> None:
        try:
            async with asyncio.timeout(self.settings.scheduler.request_timeout_s):
                await run.done.wait()
        except TimeoutError:
            run.fail(RequestTimeout("the request took longer than request_timeout_s"))
        self._withdraw(run)
        try:
            result = await answer(run, self.last_run)
        except SdproxyError as exc:
            log.info("request %s, whose client left, failed: %s", run.request_id, exc)
            return
        if self.unseen_results is not None:
            self.unseen_results(result)

    async def tell(
        self, nodes: list[str], path: str
    ) -> tuple[dict[str, Any], dict[str, NodeError]]:
        """POST ``path`` (interrupt, skip) to ``nodes`` at once: (answers, errors) by node."""
        timeout_s = self.settings.api.read_timeout_s
        return await call_each(
            [self.clients[name] for name in nodes],
            lambda c: c.request("POST", f"sdapi/v1/{path}", timeout_s=timeout_s),
            self.note_failure,
        )

    def _spawn(self, work: Coroutine[Any, Any, Any], name: str) -> None:
        task: asyncio.Task[None] = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(log_crash)

    def _withdraw(self, run: Run) -> None:
        """Take a finished run's unstarted jobs off the lanes and out of the parking."""
        interrupts.withdraw({run}, self.lanes, self.parking)
        self._forget_settled()

    def _forget_settled(self) -> None:
        for run in [run for run in self.runs if run.settled]:
            self.runs.discard(run)

    # --- the lanes' host -------------------------------------------------------------------

    def usable(self, node: str) -> bool:
        return self.state.usable(node)

    def predict_s(self, node: str, work: float, requests: int = 1) -> float:
        return self.forecast.predict_s(node, work, requests)

    def turn(self, node: str, priority: float) -> AbstractAsyncContextManager[None]:
        return self.state.turn(node, priority)

    def rebalance(self) -> bool:
        """Let idle usable lanes take over waiting work they finish earlier; True if any did."""
        if not self.settings.scheduler.work_stealing:
            return False
        return stealing.rebalance(self, self.clock.now())

    def may_render(self, node: str, job: Job) -> bool:
        return self.dispatcher.may_render(node, job)

    def jobs_for(
        self, run: Run, share: Share, blame: tuple[str, NodeRaised] | None = None
    ) -> list[Job]:
        return self.dispatcher.jobs_for(run, share, blame)

    def redispatch(self, job: Job) -> None:
        self.dispatcher.dispatch(job)

    def queue_changed(self, lane: Lane) -> None:
        self.state.backlog_changed(lane.name)

    async def run_job(self, lane: Lane, job: Job) -> None:
        """Render ``job`` on ``lane``'s node and act on the outcome."""
        node, run = lane.name, job.run
        timeout_s = self.forecast.share_deadline_s(node, run.request, job.images)
        self.state.count(node, requests=1)
        started = self.clock.now()
        outcome = await execute(self.clients[node], job, timeout_s)
        seconds = self.clock.now() - started
        self.settler.settle(node, job, outcome, seconds)
        self._forget_settled()

    def job_crashed(self, lane: Lane, job: Job, error: Exception) -> None:
        """A bug met ``job`` (logged by the lane): try its images once more, elsewhere."""
        self.settler.crashed(lane.name, job)
        self._forget_settled()

    def note_failure(self, error: NodeError) -> None:
        """A call to a node failed outside a job: take the node out if it was the node's fault."""
        self.settler.note_failure(error)

    def _health_changed(self, node: str) -> None:
        if self.state.usable(node):
            if not self.router.in_sync(node):  # back, as another replica found: read its lists
                self._wakes[node].set()
            self.resume_parked()
        else:
            self.drain(node)

    def _no_node(self) -> NoNodeAvailable:
        """The 503 for parked work that met no node failure: why, and when to retry."""
        interval = self.settings.scheduler.health_interval_s
        retry = retry_after_s(self.state, self.clock.wall(), interval)
        return NoNodeAvailable(why_none(self.state, list(self.clients)), retry_after_s=retry)

    def drain(self, node: str) -> None:
        """Dispatch the jobs waiting on ``node``'s lane again (it is down or disabled)."""
        for job in self.lanes[node].take_pending():
            self.dispatcher.dispatch(job)

    def resume_parked(self) -> None:
        """Dispatch the work that waits for a usable node."""
        for job in self.parking.take_all():
            self.dispatcher.dispatch(job)

    # --- controls --------------------------------------------------------------------------

    def disable(self, name: str) -> NodeClient:
        """Take a node out of service by hand; its waiting jobs move to other nodes."""
        client = self.client(name)
        self.state.set_disabled(name, True)
        return client

    def enable(self, name: str) -> NodeClient:
        """Put a node back into service; it is probed at once."""
        client = self.client(name)
        self.state.set_disabled(name, False)
        self._wakes[name].set()
        return client

    def _relay(self, path: str, nodes: list[str]) -> None:
        """Another replica was asked to interrupt or skip: so are this one's running jobs."""
        if nodes:
            self._spawn(self.tell(nodes, path), f"{path} (relayed)")

    def running_jobs(self) -> list[tuple[str, Job]]:
        """(node, job) for every job a node is rendering now (see interrupts.py)."""
        return interrupts.running_jobs(self.lanes)

    def running_nodes(self) -> list[str]:
        return [name for name, _ in self.running_jobs()]

    def interrupt_running(self) -> list[str]:
        """Interrupt the requests being rendered; the nodes to send the interrupt to.

        Requests only queued (not rendering anywhere yet) go on, as requests waiting on a
        webui's queue lock do.
        """
        running = self.running_jobs()
        interrupts.interrupt({job.run for _, job in running}, self.lanes, self.parking)
        return [name for name, _ in running]

    # --- the watchers' host ----------------------------------------------------------------

    async def probe(self, node: str, timeout_s: float) -> None:
        await self.clients[node].probe(timeout_s)

    def node_went_down(self, node: str) -> None:
        self.drain(node)

    async def catch_up(self, node: str, *, came_back: bool, poll: int) -> None:
        """A returning node gets its lists and the cluster's checkpoint before work; every few
        polls the lists are read again (a webui's lists change on refresh)."""
        if came_back or not self.router.in_sync(node):
            await self.router.sync(node)
        elif poll % self.settings.scheduler.inventory_every_polls == 0:
            await self.router.refresh_all([node])

    def node_usable(self, node: str) -> None:
        if self.parking:
            self.resume_parked()
