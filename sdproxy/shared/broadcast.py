"""What every replica must hear at once, over one Redis pub/sub channel.

Messages are JSON objects ``{"kind": ..., "origin": <replica id>, ...}`` on ``<prefix>:events``:
interrupt and skip, a lease handed to a waiting replica, health and checkpoint changes, replica
states, speed observations. Each replica keeps one subscription; handlers are plain functions
called on the reader task, one message at a time (they update caches and set events: nothing
that blocks).

Pub/sub delivers at most once: a replica that was disconnected misses what was said meanwhile.
So after every (re)subscription the ``on_subscribed`` callbacks run, and callers re-read from
Redis what they cache. The reader pings on its own connection every ``ping_s`` while idle and
starts over when no pong comes back (a connection a NAT silently dropped), and it starts over
when the link finds Redis gone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis import exceptions as redis_errors
from redis.asyncio.client import PubSub

from sdproxy.shared.link import Link, SharedUnavailable
from sdproxy.shared.tasks import cancelling

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Message:
    """One broadcast: its kind, the replica that sent it, and its fields."""

    kind: str
    origin: str
    fields: dict[str, Any] = field(default_factory=dict)


Handler = Callable[[Message], None]


def encode(kind: str, origin: str, fields: dict[str, Any]) -> str:
    return orjson.dumps({**fields, "kind": kind, "origin": origin}).decode()


def decode(data: Any) -> Message | None:
    """The message in ``data``, or None if it is not one (foreign publisher, other version)."""
    try:
        value = orjson.loads(data)
    except (orjson.JSONDecodeError, TypeError):
        return None
    if not isinstance(value, dict):
        return None
    kind, origin = value.pop("kind", None), value.pop("origin", None)
    if not isinstance(kind, str) or not isinstance(origin, str):
        return None
    return Message(kind, origin, value)


class Broadcast:
    """Publishes to and listens on the cluster's channel."""

    def __init__(self, link: Link, *, ping_s: float) -> None:
        self.link = link
        self.channel = link.keys.events
        self.ping_s = ping_s
        self.ready = asyncio.Event()  # set while subscribed and caught up
        self.received = 0
        self.dropped = 0  # messages that were not sdproxy's, or whose handler raised
        self.subscriptions = 0  # how often the reader (re)subscribed
        self._handlers: dict[str, list[Handler]] = {}
        self._on_subscribed: list[Callable[[], Awaitable[None]]] = []

    @property
    def subscribed(self) -> bool:
        return self.ready.is_set()

    def on(self, kind: str, handler: Handler) -> None:
        self._handlers.setdefault(kind, []).append(handler)

    def on_subscribed(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run ``callback`` after each (re)subscription: what was missed must be re-read."""
        self._on_subscribed.append(callback)

    def encode(self, kind: str, **fields: Any) -> str:
        return encode(kind, self.link.replica_id, fields)

    async def publish(self, kind: str, **fields: Any) -> int:
        """Send a message to every replica (this one too); how many subscribers got it."""
        data = self.encode(kind, **fields)
        receivers: int = await self.link.call(
            "publish", lambda client: client.publish(self.channel, data), kind
        )
        return receivers

    def dispatch(self, message: Message) -> None:
        for handler in self._handlers.get(message.kind, ()):
            try:
                handler(message)
            except Exception:
                self.dropped += 1
                log.exception("a %r broadcast from %s failed", message.kind, message.origin)

    async def run(self) -> None:
        """Forever: subscribe whenever Redis is up, read and dispatch until it is not."""
        while True:
            await self.link.wait_up()
            pubsub = self.link.client.pubsub(ignore_subscribe_messages=True)
            try:
                await self._listen(pubsub)
            except (redis_errors.RedisError, OSError, TimeoutError) as exc:
                if cancelling():
                    raise asyncio.CancelledError from exc
                self.link.mark_down(f"pub/sub: {type(exc).__name__}: {exc}")
            finally:
                self.ready.clear()
                await self._close(pubsub)

    async def _listen(self, pubsub: PubSub) -> None:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.link.timeout_s):
            await pubsub.subscribe(self.channel)
        self.subscriptions += 1
        for callback in self._on_subscribed:
            try:
                await callback()
            except SharedUnavailable:
                return
        self.ready.set()
        pinged_at = last_heard = loop.time()
        while self.link.up:
            message = await pubsub.get_message(timeout=min(self.ping_s, 1.0))
            now = loop.time()
            if message is not None:
                last_heard = now
                if message.get("type") == "message":
                    self._receive(message.get("data"))
            if now - last_heard > self.ping_s + self.link.timeout_s:
                log.info("redis pub/sub connection silent: subscribing again")
                return
            if now - pinged_at >= self.ping_s:
                await pubsub.ping()
                pinged_at = now

    def _receive(self, data: Any) -> None:
        self.received += 1
        message = decode(data)
        if message is None:
            self.dropped += 1
            return
        self.dispatch(message)

    async def _close(self, pubsub: PubSub) -> None:
        try:
            async with asyncio.timeout(self.link.timeout_s):
                await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py: untyped
        except (redis_errors.RedisError, OSError, TimeoutError):
            pass  # the connection is gone already; nothing left to close cleanly
