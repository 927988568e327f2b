"""Shared records: versioned documents, bounded logs, counters and claims, cached locally.

- A **versioned record** (a node's health, the cluster checkpoint, the options broadcast) is a
  JSON object with a version that every write increments. Writers change it by compare-and-set
  (one round trip): a replica applies the pure state machine (core/health.py) to the record it
  has cached and writes the result if nobody wrote in between; otherwise it gets the newer
  record back and tries again. Every write is broadcast with its data, so each replica's cache
  (:meth:`Records.cached`, a sync read) is fresh within one message; after a resubscription the
  cache is re-read (:meth:`Records.refresh`).
- A **bounded log** (a node's speed observations, its benchmark results) keeps the last
  ``max_len`` JSON entries, each numbered (``seq``) so a replica that replays the log and hears
  the same entry broadcast counts it once. Appending also adds to the node's counters, all in
  one round trip.
- A **claim** (``SET NX PX``) is held by one replica for a while: the probe of a node in one
  health interval, the benchmark of a node.

What comes back from Redis is checked: an entry that is not a JSON object, or a record whose
version is not a number, counts as absent (another version of sdproxy, or a foreign writer).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from sdproxy.shared import scripts
from sdproxy.shared.broadcast import Broadcast, Message
from sdproxy.shared.link import Link

log = logging.getLogger(__name__)

RecordListener = Callable[[str, "Versioned"], None]
EntryListener = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class Versioned:
    """A record as stored: its version (0 = never written) and its data (None = none)."""

    version: int
    data: dict[str, Any] | None


ABSENT = Versioned(0, None)


def parse_object(text: Any) -> dict[str, Any] | None:
    """A JSON object from Redis, or None if ``text`` is not one."""
    try:
        value = orjson.loads(text) if isinstance(text, str | bytes) else None
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _version(raw: Any) -> int | None:
    try:
        version = int(raw)
    except (TypeError, ValueError):
        return None
    return version if version >= 0 else None


class Records:
    """Reads and writes the shared records; keeps the versioned ones cached."""

    def __init__(self, link: Link, broadcast: Broadcast) -> None:
        self.link = link
        self._broadcast = broadcast
        client = link.client
        self._cas = client.register_script(scripts.COMPARE_AND_SET)
        self._append = client.register_script(scripts.APPEND)
        self._release = client.register_script(scripts.RELEASE)
        self._cache: dict[str, Versioned] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._record_listeners: list[RecordListener] = []
        self._entry_listeners: dict[str, list[EntryListener]] = {}
        broadcast.on("record", self._on_record)
        broadcast.on_subscribed(self.refresh)

    def key(self, name: str) -> str:
        """Names are keys without the prefix: ``node:gpu-a:health``, ``cluster:checkpoint``."""
        return f"{self.link.keys.prefix}:{name}"

    # --- versioned records ---------------------------------------------------------------------

    def lock(self, name: str) -> asyncio.Lock:
        """Serialises this replica's read-modify-writes of ``name``: compare-and-set then only
        contends with the other replicas."""
        return self._locks.setdefault(name, asyncio.Lock())

    def cached(self, name: str) -> Versioned:
        """The record as this replica last saw it (sync; ABSENT if never seen)."""
        return self._cache.get(name, ABSENT)

    def on_record(self, listener: RecordListener) -> None:
        """Call ``listener(name, record)`` whenever a newer version of a record arrives."""
        self._record_listeners.append(listener)

    async def read(self, name: str) -> Versioned:
        """The record from Redis (and into the cache)."""
        raw = await self.link.call(
            "record read", lambda client: client.hmget(self.key(name), ["v", "d"]), name
        )
        version, data = _version(raw[0]) if raw[0] is not None else 0, parse_object(raw[1])
        record = ABSENT if version is None else Versioned(version, data)
        self._remember(name, record, force=True)
        return record

    async def write(
        self, name: str, data: dict[str, Any], *, expected: int | None
    ) -> tuple[bool, Versioned]:
        """Write ``data`` if the record is still at version ``expected`` (None: in any case).

        Returns whether it was written and the record now in Redis.
        """
        text = orjson.dumps(data).decode()
        args = [
            "" if expected is None else str(expected),
            text,
            self.link.keys.events,
            "record",
            name,
            self.link.replica_id,
        ]
        written, version, current = await self.link.call(
            "record write", lambda _: self._cas(keys=[self.key(name)], args=args), name
        )
        if int(written) == 1:
            record = Versioned(int(version), data)
        else:
            record = Versioned(int(version), parse_object(current))
        self._remember(name, record, force=True)
        return int(written) == 1, record

    async def refresh(self) -> None:
        """Re-read every cached record (messages may have been missed while unsubscribed)."""
        for name in list(self._cache):
            await self.read(name)

    def _on_record(self, message: Message) -> None:
        name, version = message.fields.get("name"), _version(message.fields.get("version"))
        if not isinstance(name, str) or version is None:
            return
        self._remember(name, Versioned(version, parse_object(message.fields.get("data"))))

    def _remember(self, name: str, record: Versioned, *, force: bool = False) -> None:
        known = self._cache.get(name)
        # After a Redis restart versions start again from 0: a read (force) is the truth.
        if known is not None and not force and record.version <= known.version:
            return
        if known == record:
            return
        self._cache[name] = record
        for listener in self._record_listeners:
            listener(name, record)

    # --- bounded logs and counters ---------------------------------------------------------------

    def on_entry(self, kind: str, listener: EntryListener) -> None:
        """Call ``listener(name, entry)`` for every entry another replica appends to ``kind``."""
        if kind not in self._entry_listeners:
            self._entry_listeners[kind] = []
            self._broadcast.on(kind, self._on_entry)
        self._entry_listeners[kind].append(listener)

    async def append(
        self,
        kind: str,
        node: str,
        entry: dict[str, Any],
        *,
        max_len: int,
        counters: dict[str, int] | None = None,
    ) -> int:
        """Add ``entry`` to the node's ``kind`` log (and ``counters``); its sequence number."""
        keys = [
            self.key(f"node:{node}:{kind}"),
            self.key(f"node:{node}:{kind}:seq"),
            self.key(f"node:{node}:counters"),
        ]
        args: list[Any] = [
            orjson.dumps(entry).decode(),
            max_len,
            self.link.keys.events,
            kind,
            node,
            self.link.replica_id,
        ]
        for field, amount in (counters or {}).items():
            args += [field, int(amount)]
        seq = await self.link.call(
            "log append", lambda _: self._append(keys=keys, args=args), f"{kind} {node}"
        )
        return int(seq)

    async def entries(self, kind: str, node: str) -> list[dict[str, Any]]:
        """The node's ``kind`` log, oldest first; entries that are not objects are skipped."""
        key = self.key(f"node:{node}:{kind}")
        raw = await self.link.call(
            "log read", lambda client: client.lrange(key, 0, -1), f"{kind} {node}"
        )
        return [entry for entry in map(parse_object, raw) if entry is not None]

    def _on_entry(self, message: Message) -> None:
        node, entry = message.fields.get("name"), parse_object(message.fields.get("entry"))
        if not isinstance(node, str) or entry is None or message.origin == self.link.replica_id:
            return
        for listener in self._entry_listeners.get(message.kind, ()):
            listener(node, entry)

    async def add(self, node: str, **amounts: int) -> None:
        """Add to the node's counters (one round trip)."""
        key = self.key(f"node:{node}:counters")

        async def increments(client: Any) -> None:
            async with client.pipeline(transaction=False) as pipe:
                for field, amount in amounts.items():
                    pipe.hincrby(key, field, int(amount))
                await pipe.execute()

        await self.link.call("counters add", increments, node)

    async def counters(self, node: str) -> dict[str, int]:
        key = self.key(f"node:{node}:counters")
        raw = await self.link.call("counters read", lambda client: client.hgetall(key), node)
        counts: dict[str, int] = {}
        for field, value in raw.items():
            try:
                counts[str(field)] = int(value)
            except (TypeError, ValueError):
                continue
        return counts

    # --- claims ----------------------------------------------------------------------------------

    async def claim(self, name: str, ttl_s: float) -> bool:
        """Hold ``name`` for ``ttl_s`` unless another replica holds it (one round trip)."""
        key, ttl_ms = self.key(name), max(1, round(ttl_s * 1000))
        owner = self.link.replica_id
        got = await self.link.call(
            "claim", lambda client: client.set(key, owner, nx=True, px=ttl_ms), name
        )
        return bool(got)

    async def release(self, name: str) -> bool:
        """Give ``name`` back if this replica still holds it; True if it did."""
        keys, args = [self.key(name)], [self.link.replica_id]
        released = await self.link.call(
            "claim release", lambda _: self._release(keys=keys, args=args), name
        )
        return int(released) == 1

    async def holder(self, name: str) -> str | None:
        """The replica holding claim ``name``, if any."""
        key = self.key(name)
        value = await self.link.call("claim read", lambda client: client.get(key), name)
        return value if isinstance(value, str) else None
