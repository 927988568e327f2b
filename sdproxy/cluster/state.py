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
from typing import Protocol

from sdproxy.cluster.clock import Clock
from sdproxy.config import NodeSettings, SchedulerSettings
from sdproxy.core.health import NodeHealth
from sdproxy.core.speed import ObservationSource, SpeedEstimate, SpeedModel

HealthListener = Callable[[str], None]  # called with a node's name when its health changes
BacklogView = Callable[[str], tuple[float, int]]  # node -> (backlog seconds, queued images)


@dataclass
class NodeCounters:
    """What a node has done for sdproxy, for /cluster/status and /metrics."""

    images_rendered: int = 0
    requests_sent: int = 0


class ClusterState(Protocol):
    """Health, speed, counters, turns and the checkpoint of every configured node."""

    @property
    def nodes(self) -> Sequence[str]:
        """Every configured node, in configuration order."""
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

    # --- counters and others' work ---------------------------------------------------------

    def counters(self, node: str) -> NodeCounters: ...

    def count(self, node: str, *, images: int = 0, requests: int = 0) -> None: ...

    def others_backlog_s(self, node: str) -> float:
        """Seconds of work other sdproxy processes have queued or running on the node."""
        ...

    def track_backlog(self, view: BacklogView) -> None:
        """Where to read what this process has queued on a node, for the others to plan with."""
        ...

    def backlog_changed(self, node: str) -> None:
        """This process's queue on ``node`` changed (a shared store publishes it, debounced)."""
        ...

    # --- turns and the checkpoint ----------------------------------------------------------

    def turn(self, node: str) -> AbstractAsyncContextManager[None]:
        """Hold the node's turn: no other job, of any process, runs on it meanwhile."""
        ...

    @property
    def checkpoint(self) -> str | None:
        """The cluster's checkpoint (set through POST /options), or None."""
        ...

    def set_checkpoint(self, name: str | None) -> None: ...


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

    def health(self, node: str) -> NodeHealth:
        return self._health[node]

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

    def counters(self, node: str) -> NodeCounters:
        return self._counters[node]

    def count(self, node: str, *, images: int = 0, requests: int = 0) -> None:
        counters = self._counters[node]
        counters.images_rendered += images
        counters.requests_sent += requests

    def others_backlog_s(self, node: str) -> float:
        return 0.0  # no other process shares these nodes

    def track_backlog(self, view: BacklogView) -> None:
        return  # nobody to tell

    def backlog_changed(self, node: str) -> None:
        return

    def turn(self, node: str) -> AbstractAsyncContextManager[None]:
        return self._hold(self._turns[node])

    @asynccontextmanager
    async def _hold(self, lock: asyncio.Lock) -> AsyncIterator[None]:
        async with lock:
            yield

    @property
    def checkpoint(self) -> str | None:
        return self._checkpoint

    def set_checkpoint(self, name: str | None) -> None:
        self._checkpoint = name
