"""What replicas share about each node and about the cluster, in the shapes sdproxy uses.

Per node: its health (core/health.py's NodeHealth, times in Unix seconds), its speed
observations and benchmark results (bounded logs), counters, the probe claim (one replica
probes a node per interval) and the once-only catch-up of a returning node. For the cluster:
its checkpoint and the options broadcast to every node. Node URLs and credentials never go to
Redis; option values whose names look secret (passwords, tokens, keys) are not shared either.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from typing import Any, Literal, TypeGuard, TypeVar

from sdproxy.core.health import NodeHealth
from sdproxy.shared import scripts
from sdproxy.shared.link import Link, SharedUnavailable
from sdproxy.shared.records import Records, Versioned

T = TypeVar("T")

SPEED_LOG_LEN = 64  # twice the speed model's window: a replica that starts replays enough
BENCHMARK_LOG_LEN = 8
MAX_TEXT = 500  # longest reason or error kept from a record
CAS_ATTEMPTS = 16  # each loss means another replica's write went in: progress is made
_SECRET_OPTION = re.compile(r"pass|secret|token|api_?key|auth|credential", re.IGNORECASE)

CatchUp = Literal["done", "mine", "busy"]

_TIMES = ("last_error_at", "last_down_at", "last_ok_at", "next_probe_at")


def health_to_record(health: NodeHealth) -> dict[str, Any]:
    """The shared form of a node's health (``state`` for people reading Redis)."""
    return {
        "state": health.state,
        "up": health.up,
        "disabled": health.disabled,
        "reason": health.reason,
        "consecutive_failures": health.consecutive_failures,
        "last_error": health.last_error,
        **{name: getattr(health, name) for name in _TIMES},
    }


def health_from_record(
    data: dict[str, Any] | None, cooldown_base_s: float, cooldown_max_s: float
) -> NodeHealth | None:
    """The NodeHealth in a shared record; None if the record is absent or malformed."""
    if data is None:
        return None
    up, disabled = data.get("up"), data.get("disabled")
    reason, error = data.get("reason"), data.get("last_error")
    failures = data.get("consecutive_failures")
    if not isinstance(up, bool) or not isinstance(disabled, bool) or not isinstance(reason, str):
        return None
    if not isinstance(failures, int) or isinstance(failures, bool) or failures < 0:
        return None
    if error is not None and not isinstance(error, str):
        return None
    times: dict[str, float | None] = {}
    for name in _TIMES:
        value = data.get(name)
        if value is not None and not (
            isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        ):
            return None
        times[name] = None if value is None else float(value)
    return NodeHealth(
        cooldown_base_s,
        cooldown_max_s,
        up=up,
        disabled=disabled,
        reason=reason[:MAX_TEXT],
        consecutive_failures=failures,
        last_error=None if error is None else error[:MAX_TEXT],
        **times,
    )


def shareable_options(options: dict[str, Any]) -> dict[str, Any]:
    """The options that may be stored in Redis: none whose name looks like a secret."""
    return {key: value for key, value in options.items() if not _SECRET_OPTION.search(key)}


class NodeRecords:
    """The shared records of the nodes."""

    def __init__(
        self,
        records: Records,
        link: Link,
        *,
        cooldown_base_s: float,
        cooldown_max_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.records = records
        self.link = link
        self.cooldown = (cooldown_base_s, cooldown_max_s)
        self._clock = clock
        self._begin = link.client.register_script(scripts.CATCH_UP_BEGIN)
        self._end = link.client.register_script(scripts.CATCH_UP_END)

    # --- health ------------------------------------------------------------------------------

    @staticmethod
    def health_name(node: str) -> str:
        return f"node:{node}:health"

    def cached_health(self, node: str) -> NodeHealth | None:
        """The node's shared health as last heard (sync); None if unknown."""
        return health_from_record(self.records.cached(self.health_name(node)).data, *self.cooldown)

    async def read_health(self, node: str) -> NodeHealth | None:
        record = await self.records.read(self.health_name(node))
        return health_from_record(record.data, *self.cooldown)

    async def update_health(
        self, node: str, change: Callable[[NodeHealth], T], start: NodeHealth | None = None
    ) -> tuple[NodeHealth, T]:
        """Apply ``change`` to the node's shared health, atomically against other replicas.

        ``change`` is a pure transition (``lambda h: h.record_failure(...)``); it may run more
        than once, each time on the newest record. ``start`` is the health to begin from when
        no replica has written one yet. Returns the health written and what ``change`` returned.
        """
        name = self.health_name(node)
        async with self.records.lock(name):
            record = self.records.cached(name)
            for _ in range(CAS_ATTEMPTS):
                health = health_from_record(record.data, *self.cooldown)
                if health is None and start is not None:
                    health = health_from_record(health_to_record(start), *self.cooldown)
                health = health or NodeHealth(*self.cooldown)
                result = change(health)
                written, record = await self.records.write(
                    name, health_to_record(health), expected=record.version
                )
                if written:
                    return health, result
        raise SharedUnavailable(f"node {node}: its health changed too often to update")

    # --- probes, speed, benchmarks -------------------------------------------------------------

    async def claim_probe(self, node: str, interval_s: float) -> bool:
        """True if this replica probes ``node`` now (no other did within ``interval_s``)."""
        return await self.records.claim(f"node:{node}:probe", interval_s)

    async def claim_benchmark(self, node: str, ttl_s: float) -> bool:
        """True if this replica benchmarks ``node`` (no other is doing it)."""
        return await self.records.claim(f"node:{node}:claim:benchmark", ttl_s)

    async def release_benchmark(self, node: str) -> bool:
        """This replica's benchmark of ``node`` is over: the next may be run by any replica."""
        return await self.records.release(f"node:{node}:claim:benchmark")

    async def observe_job(
        self, node: str, work: float, seconds: float, images: int, *, observed: bool = True
    ) -> None:
        """A finished job: its speed observation (if ``observed``) and the counters."""
        counters = {"jobs": 1, "images": images}
        if not observed:
            await self.records.add(node, **counters)
            return
        entry = {"work": work, "seconds": seconds, "at": self._clock()}
        await self.records.append(
            "speed", node, {**entry, "replica": self.link.replica_id},
            max_len=SPEED_LOG_LEN, counters=counters,
        )  # fmt: skip

    async def speed_log(self, node: str) -> list[tuple[float, float]]:
        """The node's recent (work, seconds) observations, oldest first, checked."""
        pairs = []
        for entry in await self.records.entries("speed", node):
            work, seconds = entry.get("work"), entry.get("seconds")
            if _positive(work) and _positive(seconds, zero=True):
                pairs.append((float(work), float(seconds)))
        return pairs

    async def add_benchmark(self, node: str, result: dict[str, Any]) -> None:
        """Keep a benchmark result (the cluster's JSON form, without node URL) for all."""
        result = {key: value for key, value in result.items() if key != "url"}
        await self.records.append("benchmarks", node, result, max_len=BENCHMARK_LOG_LEN)

    async def benchmarks(self, node: str) -> list[dict[str, Any]]:
        return await self.records.entries("benchmarks", node)

    # --- the catch-up of a returning node ------------------------------------------------------

    async def begin_catch_up(self, node: str, epoch: str, ttl_s: float) -> CatchUp:
        """Whether this replica catches ``node`` up for ``epoch`` (its return after a failure).

        "done": already caught up for this epoch; "busy": another replica is at it; "mine":
        do it now, then :meth:`end_catch_up`. A replica that dies meanwhile frees it in ttl_s.
        """
        keys = self._catch_up_keys(node)
        args: list[str | int] = [epoch, self.link.replica_id, max(1, round(ttl_s * 1000))]
        answer = await self.link.call("catch-up", lambda _: self._begin(keys=keys, args=args), node)
        if answer == "done":
            return "done"
        return "mine" if answer == "mine" else "busy"

    async def end_catch_up(self, node: str, epoch: str, *, succeeded: bool) -> bool:
        """Release the catch-up; with ``succeeded`` no replica does it again for ``epoch``."""
        keys = self._catch_up_keys(node)
        args = [
            epoch,
            self.link.replica_id,
            "1" if succeeded else "0",
            self.link.keys.events,
            node,
            self.link.replica_id,
        ]
        held = await self.link.call("catch-up end", lambda _: self._end(keys=keys, args=args), node)
        return int(held) == 1

    def _catch_up_keys(self, node: str) -> list[str]:
        return [self.link.keys.node(node, "catchup"), self.link.keys.node(node, "caughtup")]


class ClusterRecords:
    """The cluster's checkpoint and the options broadcast to every node."""

    CHECKPOINT = "cluster:checkpoint"
    OPTIONS = "cluster:options"

    def __init__(self, records: Records, clock: Callable[[], float] = time.time) -> None:
        self.records = records
        self._clock = clock

    def cached_checkpoint(self) -> str | None:
        data = self.records.cached(self.CHECKPOINT).data or {}
        title = data.get("title")
        return title if isinstance(title, str) and title else None

    async def read_checkpoint(self) -> str | None:
        await self.records.read(self.CHECKPOINT)
        return self.cached_checkpoint()

    async def set_checkpoint(self, title: str | None) -> Versioned:
        """The cluster renders with ``title`` from now on (the last writer wins)."""
        data = {"title": title, "set_at": self._clock(), "by": self.records.link.replica_id}
        _, record = await self.records.write(self.CHECKPOINT, data, expected=None)
        return record

    def cached_options(self) -> dict[str, Any]:
        data = self.records.cached(self.OPTIONS).data or {}
        options = data.get("options")
        return dict(options) if isinstance(options, dict) else {}

    async def merge_options(self, posted: dict[str, Any]) -> dict[str, Any]:
        """Add ``posted`` to the options every node is given; the options now shared."""
        posted = shareable_options(posted)
        async with self.records.lock(self.OPTIONS):
            record = self.records.cached(self.OPTIONS)
            for _ in range(CAS_ATTEMPTS):
                current = record.data.get("options") if record.data else None
                merged = {**(current if isinstance(current, dict) else {}), **posted}
                data = {"options": merged, "set_at": self._clock()}
                written, record = await self.records.write(
                    self.OPTIONS, data, expected=record.version
                )
                if written:
                    return merged
        raise SharedUnavailable("the shared options changed too often to update")


def _positive(value: Any, *, zero: bool = False) -> TypeGuard[float]:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        return False
    return value >= 0 if zero else value > 0
