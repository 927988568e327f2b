"""The replica registry: who is alive, and what each replica publishes for the others' planners.

Each replica has an id (``[cluster] replica_id``, default host name and pid) and a heartbeat
key with a TTL of ``lease_ttl_s``, rewritten every third of it and whenever what it publishes
changes (at most every ``min_interval_s``: a burst of submits costs one write). What it
publishes: requests in flight, and per node the predicted seconds of work it has queued or
running there (``backlog_s``) and the images that stand for. Each write is broadcast too, so
every replica keeps the others' states in memory (:meth:`ReplicaRegistry.others_load`, a sync
read for the planner) and decays each backlog by the time since it was heard, as the work runs
down. A replica not heard from within the TTL is gone: its entry is dropped, and Redis drops its
heartbeat key. A clean shutdown says goodbye at once.

Two live processes with one id (a copied configuration) are told apart by a random instance
string; the clash is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import orjson

from sdproxy import __version__
from sdproxy.shared import scripts
from sdproxy.shared.broadcast import Broadcast, Message
from sdproxy.shared.link import Link, SharedUnavailable
from sdproxy.shared.records import parse_object

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeLoad:
    """Work a replica has on one node: predicted seconds, and images.

    ``running_s`` is the part of ``backlog_s`` the node is rendering now: only that part runs
    down while nothing new is heard (a job waiting for the node's lease does not). Unknown
    (infinite): all of it.
    """

    backlog_s: float = 0.0
    queued_images: int = 0
    running_s: float = math.inf


@dataclass(frozen=True)
class ReplicaState:
    """What one replica publishes."""

    replica: str
    instance: str
    host: str = ""
    pid: int = 0
    version: str = ""
    started_at: float = 0.0  # Unix time
    in_flight: int = 0
    nodes: dict[str, NodeLoad] = field(default_factory=dict)
    progress: dict[str, Any] | None = None  # its oldest rendering request, for /progress

    def to_json(self) -> str:
        nodes: dict[str, dict[str, float]] = {}
        for name, load in self.nodes.items():
            nodes[name] = {"backlog_s": load.backlog_s, "queued_images": load.queued_images}
            if math.isfinite(load.running_s):
                nodes[name]["running_s"] = load.running_s
        return orjson.dumps({**self.__dict__, "nodes": nodes}).decode()

    @classmethod
    def from_json(cls, text: Any) -> ReplicaState | None:
        """The state in ``text``; None if it is not a valid one."""
        data = parse_object(text)
        if data is None:
            return None
        replica, instance = data.get("replica"), data.get("instance")
        in_flight, nodes = data.get("in_flight"), data.get("nodes")
        if not isinstance(replica, str) or not isinstance(instance, str):
            return None
        if not _count(in_flight) or not isinstance(nodes, dict):
            return None
        loads = {}
        for name, entry in nodes.items():
            if not isinstance(entry, dict):
                return None
            backlog_s, images = entry.get("backlog_s"), entry.get("queued_images")
            running_s = entry.get("running_s", math.inf)
            if not _seconds(backlog_s) or not _count(images):
                return None
            if running_s != math.inf and not _seconds(running_s):
                return None
            loads[str(name)] = NodeLoad(float(backlog_s), int(images), float(running_s))
        host, pid = data.get("host"), data.get("pid")
        version, started_at = data.get("version"), data.get("started_at")
        return cls(
            replica,
            instance,
            host=host if isinstance(host, str) else "",
            pid=pid if _count(pid) else 0,
            version=version if isinstance(version, str) else "",
            started_at=float(started_at) if _seconds(started_at) else 0.0,
            in_flight=in_flight,
            nodes=loads,
            progress=progress if isinstance(progress := data.get("progress"), dict) else None,
        )


@dataclass
class _Heard:
    state: ReplicaState
    heard_at: float  # monotonic time the state arrived


class ReplicaRegistry:
    """This replica's heartbeat and published state; the other replicas' as last heard."""

    def __init__(
        self,
        link: Link,
        broadcast: Broadcast,
        *,
        ttl_s: float,
        min_interval_s: float = 0.05,
        monotonic: Callable[[], float] = time.monotonic,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.link = link
        self.ttl_s = ttl_s
        self.heartbeat_s = ttl_s / 3
        self.min_interval_s = min_interval_s
        self._monotonic = monotonic
        self.state = ReplicaState(
            link.replica_id,
            secrets.token_hex(8),
            host=socket.gethostname(),
            pid=os.getpid(),
            version=__version__,
            started_at=clock(),
        )
        self.writes = 0
        self.clashes = 0
        self._others: dict[str, _Heard] = {}
        self._dirty = asyncio.Event()
        self._heartbeat = link.client.register_script(scripts.HEARTBEAT)
        self._live = link.client.register_script(scripts.LIVE_REPLICAS)
        self._depart = link.client.register_script(scripts.DEPART)
        broadcast.on("replica", self._on_state)
        broadcast.on("replica-gone", self._on_gone)
        broadcast.on_subscribed(self.rejoin)

    # --- what this replica publishes -----------------------------------------------------------

    def publish(
        self,
        *,
        in_flight: int,
        nodes: dict[str, NodeLoad],
        progress: dict[str, Any] | None = None,
    ) -> None:
        """Change what this replica publishes; written soon (coalesced), never blocking."""
        changes = {"in_flight": in_flight, "nodes": nodes, "progress": progress}
        state = ReplicaState(**{**self.state.__dict__, **changes})
        if state != self.state:
            self.state = state
            self._dirty.set()

    async def run(self) -> None:
        """Forever: write the state when it changed (at most every min_interval_s), and at
        least every third of the TTL as the heartbeat."""
        while True:
            try:
                async with asyncio.timeout(self.heartbeat_s):
                    await self._dirty.wait()
            except TimeoutError:
                pass
            self._dirty.clear()
            if self.link.up:
                # On failure the link is in local mode now; rejoin() writes again.
                with contextlib.suppress(SharedUnavailable):
                    await self.write()
            await asyncio.sleep(self.min_interval_s)

    async def write(self) -> None:
        """Write the heartbeat and state now, and broadcast it."""
        keys = [self.link.keys.replica(self.state.replica), self.link.keys.replicas]
        ttl_ms = max(1, round(self.ttl_s * 1000))
        args: list[str | int] = [
            self.state.to_json(),
            ttl_ms,
            self.state.instance,
            self.link.keys.events,
            self.state.replica,
            "1",
        ]
        clash = await self.link.call("heartbeat", lambda _: self._heartbeat(keys=keys, args=args))
        self.writes += 1
        if int(clash) == 1:
            self.clashes += 1
            if self.clashes == 1:
                log.error(
                    "another live sdproxy process uses replica id %r: give each replica its "
                    "own [cluster] replica_id",
                    self.state.replica,
                )

    async def rejoin(self) -> None:
        """(Re)subscribed: write our state at once and re-read everyone else's."""
        await self.write()
        now = self._monotonic()
        for state in await self.live():
            if state.replica != self.state.replica:
                self._others[state.replica] = _Heard(state, now)

    async def depart(self) -> None:
        """A clean shutdown: the others forget this replica at once."""
        keys = [self.link.keys.replica(self.state.replica), self.link.keys.replicas]
        args = [self.state.instance, self.link.keys.events, self.state.replica]
        await self.link.call("depart", lambda _: self._depart(keys=keys, args=args))

    # --- the others ------------------------------------------------------------------------------

    async def live(self) -> list[ReplicaState]:
        """Every replica with a live heartbeat, this one included, from Redis."""
        keys = [self.link.keys.replicas]
        args: list[str | int] = [self.link.keys.replica(""), max(1, round(self.ttl_s * 1000))]
        flat = await self.link.call("replicas read", lambda _: self._live(keys=keys, args=args))
        states = []
        for index in range(0, len(flat) - 1, 2):
            state = ReplicaState.from_json(flat[index + 1])
            if state is not None and state.replica == flat[index]:
                states.append(state)
        return states

    def others(self) -> list[ReplicaState]:
        """The other replicas heard from within the TTL (sync, from memory)."""
        now = self._monotonic()
        for replica, heard in list(self._others.items()):
            if now - heard.heard_at > self.ttl_s:
                del self._others[replica]
        return [heard.state for heard in self._others.values()]

    def others_load(self, node: str) -> NodeLoad:
        """The work the other replicas have on ``node`` now, as far as last heard (sync)."""
        self.others()  # drop the silent ones
        now = self._monotonic()
        backlog_s, images = 0.0, 0
        for heard in self._others.values():
            load = heard.state.nodes.get(node)
            if load is not None:
                ran_s = min(now - heard.heard_at, load.running_s)
                backlog_s += max(load.backlog_s - ran_s, 0.0)
                images += load.queued_images
        return NodeLoad(backlog_s, images)

    def _on_state(self, message: Message) -> None:
        state = ReplicaState.from_json(message.fields.get("state"))
        if state is None or state.replica != message.origin:
            return
        if state.replica == self.state.replica:
            if state.instance != self.state.instance:
                self.clashes += 1
            return
        self._others[state.replica] = _Heard(state, self._monotonic())

    def _on_gone(self, message: Message) -> None:
        if message.origin != self.state.replica:
            self._others.pop(message.origin, None)


def _count(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _seconds(value: Any) -> TypeGuard[float]:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return number and math.isfinite(value) and value >= 0
