"""SharedState: the ClusterState of a replica, shared with the others through Redis.

It keeps a :class:`MemoryState` as its local copy and a :class:`SharedStore` (sdproxy/shared)
for the rest. Reads are the local copy's, kept fresh by what the others broadcast. Writes apply
to the local copy at once and go on to Redis from one background writer, in order, never on
the request path. Only a node's turn waits: its lease, so that a node runs one job at a time
across every replica. Redis that goes away leaves the replica scheduling on its own (local
locks, local health) with one warning, until it is back (docs/replicas.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, TypeGuard

from sdproxy.cluster.clock import Clock
from sdproxy.cluster.state import (
    BenchmarkListener,
    HealthListener,
    LocalWork,
    MemoryState,
    NodeCounters,
    Signal,
)
from sdproxy.config import NodeSettings, SchedulerSettings
from sdproxy.core.health import NodeHealth
from sdproxy.core.speed import ObservationSource, SpeedEstimate, SpeedModel
from sdproxy.shared.broadcast import Message
from sdproxy.shared.leases import Lease
from sdproxy.shared.link import SharedUnavailable
from sdproxy.shared.nodestate import BENCHMARK_LOG_LEN, SPEED_LOG_LEN, health_from_record
from sdproxy.shared.records import Versioned
from sdproxy.shared.replicas import NodeLoad
from sdproxy.shared.store import SharedStore

log = logging.getLogger(__name__)

Write = Callable[[], Awaitable[Any]]
BENCHMARK_CLAIM_S = 1800.0  # as long as a benchmark may take: a dead benchmarker frees it then


class SharedState:
    """ClusterState over a local copy and Redis."""

    def __init__(
        self,
        nodes: Iterable[NodeSettings],
        scheduler: SchedulerSettings,
        clock: Clock,
        store: SharedStore,
    ) -> None:
        nodes = list(nodes)
        self.store = store
        self._local = MemoryState(nodes, scheduler, clock)
        self._clock = clock
        self._probe_every_s = scheduler.health_interval_s
        self._locks = {node.name: asyncio.Lock() for node in nodes}
        self._writes: deque[tuple[str, Write]] = deque()
        self._written = asyncio.Event()
        self._wake_writer = asyncio.Event()
        self._last_ok_written: dict[str, float] = {}
        self._work: LocalWork | None = None
        self._checkpoint_listeners: list[Signal] = []
        self._benchmark_listeners: list[BenchmarkListener] = []
        self._signals: dict[str, list[Signal]] = {}
        store.records.on_record(self._heard_record)
        store.records.on_entry("speed", self._observe_entry)
        store.records.on_entry("benchmarks", self._heard_benchmark)
        store.broadcast.on_subscribed(self._catch_up)

    @property
    def nodes(self) -> Sequence[str]:
        return self._local.nodes

    # --- joining and leaving ---------------------------------------------------------------

    async def start(self) -> None:
        self.store.supervisor.loop("state-writer", self._write_forever)
        await self.store.start()

    async def _catch_up(self) -> None:
        """(Re)subscribed: read what the others wrote meanwhile (pub/sub may have lost it)."""
        for node in self.nodes:
            health = await self.store.nodes.read_health(node)
            if health is not None:
                self._local.adopt_health(node, health)
        await self.store.cluster.read_checkpoint()
        absent = self.store.records.cached(self.store.cluster.CHECKPOINT).version == 0
        if absent and self._local.checkpoint is not None:
            # A Redis that restarted empty forgot it: what this replica knows is the truth.
            await self.store.cluster.set_checkpoint(self._local.checkpoint)
        else:
            self._heard_checkpoint()
        if self.store.broadcast.subscriptions == 1:  # the first time: learn the past
            for node in self.nodes:
                for entry in await self.store.records.entries("speed", node):
                    self._observe_entry(node, entry)

    async def aclose(self) -> None:
        await self.flush()
        await self.store.aclose()

    async def flush(self) -> None:
        """Wait until every write queued so far went to Redis (or was dropped), a few call
        timeouts at most."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.store.link.timeout_s * 3):
                while self._writes:
                    self._written.clear()
                    await self._written.wait()

    def admit(self) -> None:
        self.store.require()

    def status(self) -> dict[str, Any]:
        return self.store.status()

    # --- the writer ------------------------------------------------------------------------

    def _send(self, what: str, write: Write) -> None:
        self._writes.append((what, write))
        self._wake_writer.set()

    async def _write_forever(self) -> None:
        while True:
            await self._wake_writer.wait()
            self._wake_writer.clear()
            while self._writes:
                what, write = self._writes[0]
                if self.store.link.up:  # down: local mode; the copy is re-read on rejoin
                    try:
                        await write()
                    except SharedUnavailable:
                        pass  # the link logged it once and is in local mode now
                    except Exception:
                        log.exception("shared state: writing %s failed", what)
                self._writes.popleft()
            self._written.set()

    # --- health ----------------------------------------------------------------------------

    def health(self, node: str) -> NodeHealth:
        return self._local.health(node)

    def usable(self, node: str) -> bool:
        return self._local.usable(node)

    def record_ok(self, node: str) -> bool:
        before = copy.copy(self._local.health(node))
        came_back = self._local.record_ok(node)
        now = self._clock.wall()
        last = self._last_ok_written.get(node)
        if came_back or last is None or now - last >= self._probe_every_s:
            self._last_ok_written[node] = now
            self._share_health(node, before, lambda health: health.record_ok(now))
        return came_back

    def record_failure(self, node: str, reason: str, *, probe: bool = False) -> bool:
        before = copy.copy(self._local.health(node))
        went_down = self._local.record_failure(node, reason, probe=probe)
        now = self._clock.wall()
        change = lambda health: health.record_failure(reason, now, probe=probe)  # noqa: E731
        self._share_health(node, before, change)
        return went_down

    def note_error(self, node: str, reason: str) -> None:
        before = copy.copy(self._local.health(node))
        self._local.note_error(node, reason)
        now = self._clock.wall()
        self._share_health(node, before, lambda health: health.note_error(reason, now))

    def set_disabled(self, node: str, disabled: bool) -> None:
        before = copy.copy(self._local.health(node))
        self._local.set_disabled(node, disabled)
        now = self._clock.wall()

        def change(health: NodeHealth) -> None:
            if disabled:
                health.disable()
            else:
                health.enable(now)

        self._share_health(node, before, change)

    def _share_health(
        self, node: str, before: NodeHealth, change: Callable[[NodeHealth], object]
    ) -> None:
        """Apply ``change`` to the newest shared record; ``before`` (the local health as it
        was) is where it starts when no replica has written one yet."""
        self._send(
            f"the health of {node}",
            lambda: self.store.nodes.update_health(node, change, start=before),
        )

    def on_health_change(self, listener: HealthListener) -> None:
        self._local.on_health_change(listener)

    def _heard_record(self, name: str, record: Versioned) -> None:
        """A record changed in Redis (ours or another replica's write): take it as the truth."""
        if name == self.store.cluster.CHECKPOINT:
            self._heard_checkpoint()
            return
        for node in self.nodes:
            if name == self.store.nodes.health_name(node):
                health = health_from_record(record.data, *self.store.nodes.cooldown)
                if health is not None:
                    self._local.adopt_health(node, health)
                return

    async def claim_probe(self, node: str) -> bool:
        if not self.store.link.up:
            return True  # alone for now: probe as one process does
        try:
            return await self.store.nodes.claim_probe(node, self._probe_every_s)
        except SharedUnavailable:
            return True

    # --- speed -----------------------------------------------------------------------------

    def speed(self, node: str) -> SpeedModel:
        return self._local.speed(node)

    def observe(
        self, node: str, work: float, seconds: float, source: ObservationSource = "job"
    ) -> None:
        self._local.observe(node, work, seconds, source)
        entry = {
            "work": work,
            "seconds": seconds,
            "source": source,
            "at": self._clock.wall(),
            "replica": self.store.replica_id,
        }
        self._send(
            f"a speed observation of {node}",
            lambda: self.store.records.append("speed", node, entry, max_len=SPEED_LOG_LEN),
        )

    def _observe_entry(self, node: str, entry: dict[str, Any]) -> None:
        if node not in self._locks or entry.get("replica") == self.store.replica_id:
            return
        work, seconds = entry.get("work"), entry.get("seconds")
        if not _number(work) or not _number(seconds):
            return
        source: ObservationSource = "benchmark" if entry.get("source") == "benchmark" else "job"
        self._local.observe(node, float(work), float(seconds), source)

    def set_benchmark(self, node: str, estimate: SpeedEstimate, works: tuple[float, float]) -> None:
        self._local.set_benchmark(node, estimate, works)

    async def claim_benchmark(self, node: str) -> bool:
        if not self.store.link.up:
            return True
        try:
            return await self.store.nodes.claim_benchmark(node, BENCHMARK_CLAIM_S)
        except SharedUnavailable:
            return True

    def release_benchmark(self, node: str) -> None:
        # After the result's own write (one writer, in order): whoever claims next sees it.
        self._send(
            f"the benchmark claim of {node}", lambda: self.store.nodes.release_benchmark(node)
        )

    def share_benchmark(self, node: str, result: dict[str, Any]) -> None:
        shared = {key: value for key, value in result.items() if key != "url"}
        self._send(
            f"the benchmark of {node}",
            lambda: self.store.records.append(
                "benchmarks", node, shared, max_len=BENCHMARK_LOG_LEN
            ),
        )

    async def shared_benchmark(self, node: str) -> dict[str, Any] | None:
        if not self.store.link.up:
            return None
        try:
            entries = await self.store.nodes.benchmarks(node)
        except SharedUnavailable:
            return None
        return _without_seq(entries[-1]) if entries else None

    def on_benchmark(self, listener: BenchmarkListener) -> None:
        self._benchmark_listeners.append(listener)

    def _heard_benchmark(self, node: str, entry: dict[str, Any]) -> None:
        if node in self._locks:
            for listener in self._benchmark_listeners:
                listener(node, _without_seq(entry))

    # --- counters and others' work ---------------------------------------------------------

    def counters(self, node: str) -> NodeCounters:
        return self._local.counters(node)

    def count(self, node: str, *, images: int = 0, requests: int = 0) -> None:
        self._local.count(node, images=images, requests=requests)

    def others_load(self, node: str) -> tuple[float, int]:
        load = self.store.replicas.others_load(node)
        return load.backlog_s, load.queued_images

    def track(self, work: LocalWork) -> None:
        self._work = work

    def backlog_changed(self, node: str) -> None:
        work = self._work
        if work is None:
            return
        loads = {}
        for name in self.nodes:
            backlog = work.backlog(name)
            if backlog.seconds or backlog.images:
                seconds, running_s = round(backlog.seconds, 3), round(backlog.running_s, 3)
                loads[name] = NodeLoad(seconds, backlog.images, running_s)
        self.store.replicas.publish(
            in_flight=work.in_flight(), nodes=loads, progress=work.progress()
        )

    def others_progress(self) -> list[dict[str, Any]]:
        others = self.store.replicas.others()
        return [state.progress for state in others if state.progress is not None]

    # --- turns and the checkpoint ----------------------------------------------------------

    def turn(self, node: str, priority: float) -> AbstractAsyncContextManager[None]:
        return self._turn(node, priority)

    @asynccontextmanager
    async def _turn(self, node: str, priority: float) -> AsyncIterator[None]:
        """The local lock first (a lane and a benchmark of this process never ask Redis
        against each other), then the node's lease; local alone while Redis is gone."""
        async with self._locks[node]:
            lease: Lease | None = None
            if self.store.link.up:
                try:
                    lease = await self.store.leases.acquire(node, priority=priority)
                except SharedUnavailable:
                    lease = None  # local mode: the node's own queue lock serialises the rest
            try:
                yield
            finally:
                if lease is not None:
                    await self.store.leases.release(lease)

    @property
    def checkpoint(self) -> str | None:
        return self._local.checkpoint

    def set_checkpoint(self, name: str | None) -> None:
        self._local.set_checkpoint(name)
        self._send("the cluster checkpoint", lambda: self.store.cluster.set_checkpoint(name))

    def on_checkpoint(self, listener: Signal) -> None:
        self._checkpoint_listeners.append(listener)

    def _heard_checkpoint(self) -> None:
        if self.store.records.cached(self.store.cluster.CHECKPOINT).version == 0:
            return  # no replica set one, or Redis forgot it: keep what this one knows
        title = self.store.cluster.cached_checkpoint()
        if title != self._local.checkpoint:
            self._local.set_checkpoint(title)
            for listener in self._checkpoint_listeners:
                listener()

    # --- signals ---------------------------------------------------------------------------

    def broadcast(self, kind: str) -> None:
        self._send(f"a {kind} broadcast", lambda: self.store.broadcast.publish(kind))

    def on_broadcast(self, kind: str, listener: Signal) -> None:
        if kind not in self._signals:
            self._signals[kind] = []
            self.store.broadcast.on(kind, self._heard_signal)
        self._signals[kind].append(listener)

    def _heard_signal(self, message: Message) -> None:
        if message.origin == self.store.replica_id:
            return  # this replica acted when it sent it
        for listener in self._signals.get(message.kind, ()):
            listener()


def _number(value: Any) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0


def _without_seq(entry: dict[str, Any]) -> dict[str, Any]:
    """A log entry as it was appended (the log numbers each entry with ``seq``)."""
    return {key: value for key, value in entry.items() if key != "seq"}
