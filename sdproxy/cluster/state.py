"""ClusterState: the one owner of what the cluster knows and every replica must agree on.

Node health, each node's speed model and counters, the cluster's checkpoint, the work other
sdproxy processes have queued on a node, and the right to run a job on a node (its *turn*) live
behind this interface. The scheduler's pieces read it and change it only through it, so a shared
store (several replicas, issue 13) can stand in for :class:`MemoryState` without the scheduler
noticing. What a process keeps for itself (its lanes' queues, the requests it is answering)
stays in the scheduler.

Reads are synchronous: a shared store answers them from a local copy it keeps fresh. Writes are
synchronous too and a shared store sends them on in the background; only taking a node's turn
waits, because across replicas it must.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from sdproxy.cluster.clock import Clock
from sdproxy.config import NodeSettings, SchedulerSettings
from sdproxy.core.health import NodeHealth
from sdproxy.core.speed import ObservationSource, SpeedEstimate, SpeedModel

HealthListener = Callable[[str], None]  # called with a node's name when its health changes
BenchmarkListener = Callable[[str, dict[str, Any]], None]  # (node, result) from another replica
Signal = Callable[[], None]  # an "every replica, now" message from another replica


@dataclass
class NodeCounters:
    """What a node has done for sdproxy, for /cluster/status and /metrics."""

    images_rendered: int = 0
    requests_sent: int = 0


@dataclass(frozen=True)
class Backlog:
    """This process's work on one node: predicted seconds, client images, and the seconds
    left of what the node is rendering now (the part that runs down by itself)."""

    seconds: float = 0.0
    images: int = 0
    running_s: float = 0.0


class LocalWork(Protocol):
    """What this process runs, as the other replicas see it."""

    def backlog(self, node: str) -> Backlog:
        """This process's work queued or running on ``node``."""
        ...

    def in_flight(self) -> int:
        """Requests this process is answering."""
        ...

    def progress(self) -> dict[str, Any] | None:
        """The oldest request rendering now, for another replica's /progress (progress.py)."""
        ...


class ClusterState(Protocol):
    """Health, speed, counters, turns and the checkpoint of every configured node."""

    @property
    def nodes(self) -> Sequence[str]:
        """Every configured node, in configuration order."""
        ...

    async def start(self) -> None:
        """Join the other replicas (a shared store); before the cluster's first probe."""
        ...

    async def aclose(self) -> None:
        """Leave: give back the turns held, say goodbye."""
        ...

    def admit(self) -> None:
        """Raise a 503 if new generations are refused (shared state gone, ``refuse``)."""
        ...

    def status(self) -> dict[str, Any]:
        """For /cluster/status: ``mode`` (single, shared, local) and the replicas."""
        ...

    # --- health ----------------------------------------------------------------------------

    def health(self, node: str) -> NodeHealth:
        """The node's health; read it, change it only through the methods below."""
        ...

    def usable(self, node: str) -> bool:
        """The node may be given work: up and not disabled."""
        ...

    def record_ok(self, node: str) -> bool:
        """A call to the node succeeded; True if it was down and is back."""
        ...

    def record_failure(self, node: str, reason: str, *, probe: bool = False) -> bool:
        """A call failed: the node is down at once. True if it was up."""
        ...

    def note_error(self, node: str, reason: str) -> None:
        """The node answered but a job raised: shown in the status, the node stays up."""
        ...

    def set_disabled(self, node: str, disabled: bool) -> None: ...

    def on_health_change(self, listener: HealthListener) -> None:
        """Call ``listener(node)`` whenever a node's health changes, wherever it was changed."""
        ...

    async def claim_probe(self, node: str) -> bool:
        """This process probes the node now (with replicas, one of them per interval)."""
        ...

    # --- speed -----------------------------------------------------------------------------

    def speed(self, node: str) -> SpeedModel:
        """The node's speed model; read it, teach it through :meth:`observe`."""
        ...

    def observe(
        self, node: str, work: float, seconds: float, source: ObservationSource = "job"
    ) -> None:
        """A job (or a benchmark run) of ``work`` units took ``seconds`` on the node."""
        ...

    def set_benchmark(
        self, node: str, estimate: SpeedEstimate, works: tuple[float, float]
    ) -> None: ...

    async def claim_benchmark(self, node: str) -> bool:
        """This process benchmarks the node (with replicas, one of them does)."""
        ...

    def release_benchmark(self, node: str) -> None:
        """This process's benchmark of the node is over (measured or failed)."""
        ...

    def share_benchmark(self, node: str, result: dict[str, Any]) -> None:
        """A benchmark this process finished, for the others (no node URL in it)."""
        ...

    async def shared_benchmark(self, node: str) -> dict[str, Any] | None:
        """The node's latest benchmark from any replica, if shared."""
        ...

    def on_benchmark(self, listener: BenchmarkListener) -> None:
        """Call ``listener(node, result)`` for benchmarks other replicas finish."""
        ...

    # --- counters and others' work ---------------------------------------------------------

    def counters(self, node: str) -> NodeCounters: ...

    def count(self, node: str, *, images: int = 0, requests: int = 0) -> None: ...

    def others_load(self, node: str) -> tuple[float, int]:
        """(seconds, images) of work other sdproxy processes have queued or running on it."""
        ...

    def track(self, work: LocalWork) -> None:
        """Where to read what this process runs, for the others to plan with and show."""
        ...

    def others_progress(self) -> list[dict[str, Any]]:
        """What the other replicas render now, each as :meth:`LocalWork.progress` gave it."""
        ...

    def backlog_changed(self, node: str) -> None:
        """This process's queue on ``node`` changed (a shared store publishes it, coalesced)."""
        ...

    # --- turns and the checkpoint ----------------------------------------------------------

    def turn(self, node: str, priority: float) -> AbstractAsyncContextManager[None]:
        """Hold the node's turn: no other job, of any process, runs on it meanwhile. Turns
        across processes go to the lowest ``priority`` first (the Unix time the work's request
        started)."""
        ...

    @property
    def checkpoint(self) -> str | None:
        """The cluster's checkpoint (set through POST /options), or None."""
        ...

    def set_checkpoint(self, name: str | None) -> None: ...

    def on_checkpoint(self, listener: Signal) -> None:
        """Call ``listener()`` when another replica changes the cluster's checkpoint."""
        ...

    # --- signals to every replica ----------------------------------------------------------

    def broadcast(self, kind: str) -> None:
        """Tell the other replicas ``kind`` (interrupt, skip) now; this one acts itself."""
        ...

    def on_broadcast(self, kind: str, listener: Signal) -> None:
        """Call ``listener()`` when another replica broadcasts ``kind``."""
        ...


class MemoryState:
    """ClusterState for one sdproxy process: everything in memory, turns are local locks."""

    def __init__(
        self, nodes: Iterable[NodeSettings], scheduler: SchedulerSettings, clock: Clock
    ) -> None:
        self._clock = clock
        self._names = tuple(node.name for node in nodes)
        self._health = {
            name: NodeHealth(scheduler.cooldown_base_s, scheduler.cooldown_max_s)
            for name in self._names
        }
        self._speed = {node.name: SpeedModel(node.weight) for node in nodes}
        self._counters = {name: NodeCounters() for name in self._names}
        self._turns = {name: asyncio.Lock() for name in self._names}
        self._listeners: list[HealthListener] = []
        self._checkpoint: str | None = None

    @property
    def nodes(self) -> Sequence[str]:
        return self._names

    async def start(self) -> None:
        return  # nobody to join

    async def aclose(self) -> None:
        return

    def admit(self) -> None:
        return  # nothing shared to lose

    def status(self) -> dict[str, Any]:
        return {"mode": "single"}

    def health(self, node: str) -> NodeHealth:
        return self._health[node]

    def adopt_health(self, node: str, health: NodeHealth) -> None:
        """Take ``health`` as the node's (heard from another replica); listeners hear of a
        change of state."""
        before = self._health[node]
        self._health[node] = health
        if (before.up, before.disabled) != (health.up, health.disabled):
            self._changed(node)

    def usable(self, node: str) -> bool:
        return self._health[node].usable

    def record_ok(self, node: str) -> bool:
        came_back = self._health[node].record_ok(self._clock.wall())
        if came_back:
            self._changed(node)
        return came_back

    def record_failure(self, node: str, reason: str, *, probe: bool = False) -> bool:
        went_down = self._health[node].record_failure(reason, self._clock.wall(), probe=probe)
        self._changed(node)
        return went_down

    def note_error(self, node: str, reason: str) -> None:
        self._health[node].note_error(reason, self._clock.wall())

    def set_disabled(self, node: str, disabled: bool) -> None:
        health = self._health[node]
        if disabled:
            health.disable()
        else:
            health.enable(self._clock.wall())
        self._changed(node)

    def on_health_change(self, listener: HealthListener) -> None:
        self._listeners.append(listener)

    async def claim_probe(self, node: str) -> bool:
        return True

    def _changed(self, node: str) -> None:
        for listener in self._listeners:
            listener(node)

    def speed(self, node: str) -> SpeedModel:
        return self._speed[node]

    def observe(
        self, node: str, work: float, seconds: float, source: ObservationSource = "job"
    ) -> None:
        self._speed[node].observe(work, seconds, source)

    def set_benchmark(self, node: str, estimate: SpeedEstimate, works: tuple[float, float]) -> None:
        self._speed[node].set_benchmark(estimate, works)

    async def claim_benchmark(self, node: str) -> bool:
        return True

    def release_benchmark(self, node: str) -> None:
        return

    def share_benchmark(self, node: str, result: dict[str, Any]) -> None:
        return  # the state file keeps it

    async def shared_benchmark(self, node: str) -> dict[str, Any] | None:
        return None

    def on_benchmark(self, listener: BenchmarkListener) -> None:
        return  # nobody else benchmarks

    def counters(self, node: str) -> NodeCounters:
        return self._counters[node]

    def count(self, node: str, *, images: int = 0, requests: int = 0) -> None:
        counters = self._counters[node]
        counters.images_rendered += images
        counters.requests_sent += requests

    def others_load(self, node: str) -> tuple[float, int]:
        return 0.0, 0  # no other process shares these nodes

    def track(self, work: LocalWork) -> None:
        return  # nobody to tell

    def others_progress(self) -> list[dict[str, Any]]:
        return []

    def backlog_changed(self, node: str) -> None:
        return

    def turn(self, node: str, priority: float) -> AbstractAsyncContextManager[None]:
        return self._hold(self._turns[node])  # one lane per node here: nobody to order

    @asynccontextmanager
    async def _hold(self, lock: asyncio.Lock) -> AsyncIterator[None]:
        async with lock:
            yield

    @property
    def checkpoint(self) -> str | None:
        return self._checkpoint

    def set_checkpoint(self, name: str | None) -> None:
        self._checkpoint = name

    def on_checkpoint(self, listener: Signal) -> None:
        return  # only this process sets it

    def broadcast(self, kind: str) -> None:
        return  # no other replica

    def on_broadcast(self, kind: str, listener: Signal) -> None:
        return
