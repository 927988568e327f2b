"""The replica registry and the broadcast channel, on a real redis-server."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest
from redis.asyncio import Redis

from sdproxy.shared.broadcast import Message, decode, encode
from sdproxy.shared.keys import Keys
from sdproxy.shared.replicas import NodeLoad, ReplicaRegistry, ReplicaState
from tests.shared.conftest import OpenStore
from tests.support import wait_until


class TestRegistry:
    """Every replica is listed while alive, with what it publishes."""

    async def test_registry_lists_live_replicas(self, open_stores: OpenStore) -> None:
        """Two started replicas are both live, and each knows the other."""
        a, b = await open_stores("a"), await open_stores("b")
        assert {state.replica for state in await a.replicas.live()} == {"a", "b"}
        await wait_until(lambda: [s.replica for s in a.replicas.others()] == ["b"], what="a")
        await wait_until(lambda: [s.replica for s in b.replicas.others()] == ["a"], what="b")
        listed = [entry["id"] for entry in a.status()["replicas"]]
        assert listed == ["a", "b"]

    async def test_registry_backlogs_reach_planners(self, open_stores: OpenStore) -> None:
        """Backlog published by two replicas adds up in a third's view of the node."""
        a, b, c = [await open_stores(name) for name in ("a", "b", "c")]
        a.replicas.publish(in_flight=2, nodes={"gpu-a": NodeLoad(10.0, 4)})
        b.replicas.publish(in_flight=1, nodes={"gpu-a": NodeLoad(5.0, 2), "gpu-b": NodeLoad(1, 1)})

        def heard() -> bool:
            return c.replicas.others_load("gpu-a").queued_images == 6

        await wait_until(heard, what="c to hear both backlogs")
        load = c.replicas.others_load("gpu-a")
        assert 14.0 < load.backlog_s <= 15.0  # decayed by the time since heard
        assert c.replicas.others_load("gpu-b").queued_images == 1
        assert a.replicas.others_load("gpu-a").queued_images == 2  # its own is not "other"
        in_flight = {entry["id"]: entry["in_flight"] for entry in c.status()["replicas"]}
        assert in_flight == {"c": 0, "a": 2, "b": 1}

    async def test_registry_publish_coalesced(self, open_stores: OpenStore) -> None:
        """A burst of 100 changes costs a few writes, not 100."""
        store = await open_stores("a")
        writes = store.replicas.writes
        for index in range(100):
            store.replicas.publish(in_flight=index, nodes={"gpu-a": NodeLoad(index, index)})
            await asyncio.sleep(0)
        await wait_until(lambda: store.replicas.writes > writes, what="a write")
        assert store.replicas.writes - writes < 10

    async def test_registry_clean_shutdown_forgotten_at_once(self, open_stores: OpenStore) -> None:
        """A replica that stops says goodbye: the others drop it before its TTL."""
        a, b = await open_stores("a", lease_ttl_s=30), await open_stores("b", lease_ttl_s=30)
        await wait_until(lambda: len(a.replicas.others()) == 1, what="a to hear b")
        await b.aclose()
        await wait_until(lambda: a.replicas.others() == [], what="a to forget b")
        assert [state.replica for state in await a.replicas.live()] == ["a"]

    async def test_registry_dead_replica_expires(self, open_stores: OpenStore) -> None:
        """A replica killed without goodbye leaves the list within its TTL."""
        a, b = await open_stores("a", lease_ttl_s=1), await open_stores("b", lease_ttl_s=1)
        await wait_until(lambda: len(a.replicas.others()) == 1, what="a to hear b")
        await b.supervisor.aclose()  # no more heartbeats, no goodbye
        await b.link.client.aclose()
        b.link.mark_down("test: killed")

        async def gone() -> bool:
            live = [state.replica for state in await a.replicas.live()]
            return live == ["a"] and a.replicas.others() == []

        await wait_until(gone, what="b's heartbeat to expire, and a to forget b")

    async def test_registry_duplicate_id_logged(
        self, open_stores: OpenStore, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Two processes with one replica id: an error in the log names it."""
        caplog.set_level(logging.ERROR, logger="sdproxy.shared")
        a, twin = await open_stores("same"), await open_stores("same")
        await a.replicas.write()
        await twin.replicas.write()
        await a.replicas.write()
        assert a.replicas.clashes + twin.replicas.clashes >= 2
        assert any("'same'" in record.getMessage() for record in caplog.records)

    def test_registry_decay_with_fake_clock(self) -> None:
        """Another replica's backlog runs down as time passes, to zero, then it is dropped."""
        now = [100.0]
        registry = _registry_at(now)
        state = ReplicaState("other", "i", nodes={"gpu-a": NodeLoad(4.0, 3)})
        registry._on_state(Message("replica", "other", {"state": state.to_json()}))
        assert registry.others_load("gpu-a") == NodeLoad(4.0, 3)
        now[0] += 1.5
        assert registry.others_load("gpu-a") == NodeLoad(2.5, 3)
        now[0] += 3
        assert registry.others_load("gpu-a") == NodeLoad(0.0, 3)
        now[0] += 2  # 6.5 s silent: past the TTL
        assert registry.others_load("gpu-a") == NodeLoad(0.0, 0)
        assert registry.others() == []

    def test_only_what_runs_runs_down(self) -> None:
        """Of 10 s queued with 1 s rendering, 9 s are still ahead however long it is quiet."""
        now = [100.0]
        registry = _registry_at(now)
        state = ReplicaState("other", "i", nodes={"gpu-a": NodeLoad(10.0, 5, running_s=1.0)})
        registry._on_state(Message("replica", "other", {"state": state.to_json()}))
        now[0] += 0.5
        assert registry.others_load("gpu-a").backlog_s == pytest.approx(9.5)
        now[0] += 3
        assert registry.others_load("gpu-a").backlog_s == pytest.approx(9.0)


class TestStateJson:
    """Replica states from Redis are checked before use."""

    def test_state_json_round_trip(self) -> None:
        """to_json and from_json agree."""
        state = ReplicaState("r", "i", host="h", pid=7, in_flight=3, nodes={"n": NodeLoad(1.5, 2)})
        assert ReplicaState.from_json(state.to_json()) == state

    @pytest.mark.parametrize(
        "text",
        [
            "[]",
            "not json",
            '{"replica": "r", "instance": "i", "in_flight": -1, "nodes": {}}',
            '{"replica": "r", "instance": "i", "in_flight": 1, "nodes": {"n": 5}}',
            '{"replica": "r", "instance": "i", "in_flight": 1,'
            ' "nodes": {"n": {"backlog_s": "x", "queued_images": 1}}}',
            '{"replica": 3, "instance": "i", "in_flight": 1, "nodes": {}}',
        ],
    )
    def test_state_json_rejects_malformed(self, text: str) -> None:
        """Malformed states are None."""
        assert ReplicaState.from_json(text) is None


class TestBroadcast:
    """Messages reach every replica; foreign ones are dropped; a bad handler harms no other."""

    async def test_broadcast_reaches_every_replica(self, open_stores: OpenStore) -> None:
        """An interrupt published by one replica is heard by all, itself included."""
        stores = [await open_stores(name) for name in ("a", "b", "c")]
        heard: list[tuple[str, str]] = []

        def hearer(me: str) -> Callable[[Message], None]:
            return lambda message: heard.append((me, message.origin))

        for store in stores:
            store.broadcast.on("interrupt", hearer(store.replica_id))
        assert await stores[1].broadcast.publish("interrupt") == 3
        await wait_until(lambda: len(heard) == 3, what="three replicas to hear it")
        assert sorted(heard) == [("a", "b"), ("b", "b"), ("c", "b")]

    async def test_broadcast_foreign_messages_dropped(
        self, open_stores: OpenStore, raw_redis: Redis
    ) -> None:
        """Garbage on the channel is counted and dropped; the next message still arrives."""
        store = await open_stores("a")
        heard: list[Message] = []
        store.broadcast.on("skip", heard.append)
        channel = store.link.keys.events
        for garbage in ("not json", "[1]", '{"kind": 1}', '{"kind": "skip"}'):
            await raw_redis.publish(channel, garbage)
        await store.broadcast.publish("skip", node="gpu-a")
        await wait_until(lambda: len(heard) == 1, what="the real message")
        assert heard[0].fields == {"node": "gpu-a"}
        assert store.broadcast.dropped == 4

    async def test_broadcast_failing_handler_isolated(
        self, open_stores: OpenStore, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A handler that raises is logged; the other handlers and the reader go on."""
        store = await open_stores("a")
        heard: list[str] = []

        def broken(message: Message) -> None:
            raise RuntimeError("handler bug")

        store.broadcast.on("skip", broken)
        store.broadcast.on("skip", lambda message: heard.append(message.kind))
        await store.broadcast.publish("skip")
        await store.broadcast.publish("skip")
        await wait_until(lambda: len(heard) == 2, what="both messages")
        assert any("handler bug" in (record.exc_text or "") for record in caplog.records)
        assert store.broadcast.subscribed

    def test_broadcast_codec(self) -> None:
        """encode and decode agree; kind and origin are required strings."""
        message = decode(encode("interrupt", "r1", {"request": "abc"}))
        assert message == Message("interrupt", "r1", {"request": "abc"})
        assert decode(b'{"kind": "x"}') is None
        assert decode(None) is None


class _Scripts:
    def register_script(self, source: str) -> object:
        return object()


class _Broadcast:
    def on(self, kind: str, handler: object) -> None:
        pass

    def on_subscribed(self, callback: object) -> None:
        pass


def _registry_at(now: list[float]) -> ReplicaRegistry:
    """A registry with no Redis behind it, on the monotonic clock ``now[0]``."""

    class _Link:
        replica_id = "me"
        client = _Scripts()
        keys = Keys("p")

    return ReplicaRegistry(
        _Link(),  # type: ignore[arg-type]
        _Broadcast(),  # type: ignore[arg-type]
        ttl_s=6,
        monotonic=lambda: now[0],
    )
