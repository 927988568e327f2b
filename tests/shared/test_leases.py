"""Node leases on a real redis-server: exclusive, fenced, fair, renewed, and freed by death."""

from __future__ import annotations

import asyncio
import functools

import pytest
from redis.asyncio import Redis

from sdproxy.shared.leases import Lease
from sdproxy.shared.link import SharedUnavailable
from sdproxy.shared.store import SharedStore
from tests.shared.conftest import OpenStore
from tests.support import RedisServer, wait_until


class TestAcquire:
    """An uncontended lease costs one round trip and carries a growing fencing token."""

    async def test_acquire_uncontended_one_round_trip(self, open_stores: OpenStore) -> None:
        """Acquiring a free node's lease is a single call to Redis."""
        store = await open_stores("r1")
        before = store.link.round_trips
        lease = await store.leases.acquire("gpu-a")
        assert lease is not None
        assert store.link.round_trips - before == 1, store.link.calls
        assert lease.held

    async def test_acquire_tokens_grow(self, open_stores: OpenStore) -> None:
        """Every lease granted on a node has a larger token than the one before."""
        a, b = await open_stores("r1"), await open_stores("r2")
        tokens = []
        for store in (a, b, a, b):
            lease = await store.leases.acquire("gpu-a")
            assert lease is not None
            tokens.append(lease.token)
            assert await store.leases.release(lease)
        assert tokens == sorted(tokens)
        assert len(set(tokens)) == 4

    async def test_acquire_without_wait_busy_node(self, open_stores: OpenStore) -> None:
        """wait=False answers None at once when another replica holds the node."""
        a, b = await open_stores("r1"), await open_stores("r2")
        held = await a.leases.acquire("gpu-a")
        assert held is not None
        assert await b.leases.acquire("gpu-a", wait=False) is None
        other = await b.leases.acquire("gpu-b", wait=False)
        assert other is not None  # leases are per node

    async def test_acquire_redis_down_raises(
        self, open_stores: OpenStore, redis_server: RedisServer
    ) -> None:
        """With Redis gone, acquire raises SharedUnavailable instead of hanging."""
        store = await open_stores("r1")
        await redis_server.stop()
        with pytest.raises(SharedUnavailable):
            await store.leases.acquire("gpu-a")


class TestExclusive:
    """At most one holder per node, whatever the replicas do at once."""

    async def test_exclusive_many_replicas_contending(self, open_stores: OpenStore) -> None:
        """Four replicas taking turns 40 times on one node never overlap."""
        stores = [await open_stores(f"r{i}") for i in range(4)]
        holding: list[str] = []
        overlaps = 0

        async def worker(index: int) -> None:
            nonlocal overlaps
            store = stores[index % len(stores)]
            for _ in range(5):
                lease = await store.leases.acquire("gpu-a")
                assert lease is not None
                holding.append(lease.owner)
                overlaps += len(holding) > 1
                await asyncio.sleep(0.002)
                holding.remove(lease.owner)
                assert await store.leases.release(lease)

        async with asyncio.TaskGroup() as group:
            for index in range(8):
                group.create_task(worker(index))
        assert overlaps == 0
        assert sum(s.leases.acquired for s in stores) == 40


class TestFairness:
    """Waiting replicas are served first come first served, and woken, not polling."""

    async def test_fairness_first_come_first_served(
        self, open_stores: OpenStore, raw_redis: Redis
    ) -> None:
        """Replicas that queued in the order b, c, d get the node in that order."""
        a = await open_stores("a")
        others = [await open_stores(name) for name in ("b", "c", "d")]
        first = await a.leases.acquire("gpu-a")
        assert first is not None
        order: list[str] = []

        async def wait_turn(store_index: int) -> None:
            store = others[store_index]
            lease = await store.leases.acquire("gpu-a")
            assert lease is not None
            order.append(store.replica_id)
            await store.leases.release(lease)

        tickets = a.link.keys.node("gpu-a", "tickets")
        tasks = []
        for index in range(3):
            tasks.append(asyncio.create_task(wait_turn(index)))
            count = index + 1
            queued = functools.partial(_count_is, raw_redis, tickets, count)
            await wait_until(queued, what=f"{count} tickets")
        await a.leases.release(first)
        await asyncio.gather(*tasks)
        assert order == ["b", "c", "d"]

    async def test_fairness_release_hands_over_at_once(self, open_stores: OpenStore) -> None:
        """A release hands the lease to the waiter by message: it does not ask again."""
        a, b = await open_stores("a"), await open_stores("b")
        lease = await a.leases.acquire("gpu-a")
        assert lease is not None
        waiting = asyncio.create_task(b.leases.acquire("gpu-a"))
        await wait_until(lambda: b.leases.waited == 1, what="b to wait")
        trips = b.link.round_trips
        await a.leases.release(lease)
        got = await waiting
        assert got is not None
        assert b.leases.handed_over == 1
        assert b.link.round_trips == trips  # no poll was needed
        assert got.token == lease.token + 1

    async def test_fairness_waiting_polls_slowly(self, open_stores: OpenStore) -> None:
        """A waiter asks Redis about every third of the TTL, not in a tight loop."""
        a, b = await open_stores("a", lease_ttl_s=3), await open_stores("b", lease_ttl_s=3)
        lease = await a.leases.acquire("gpu-a")
        assert lease is not None
        trips = b.link.round_trips
        waiting = asyncio.create_task(b.leases.acquire("gpu-a"))
        await wait_until(lambda: lease.renewals >= 2, what="two renewals (2 s)")
        asked = b.link.round_trips - trips
        await a.leases.release(lease)
        assert await waiting is not None
        assert 1 <= asked <= 4  # the first ask, then one per second at most

    async def test_fairness_cancelled_wait_leaves_line(
        self, open_stores: OpenStore, raw_redis: Redis
    ) -> None:
        """A waiter that gives up leaves the line: the node is free after the release."""
        a, b, c = await open_stores("a"), await open_stores("b"), await open_stores("c")
        lease = await a.leases.acquire("gpu-a")
        assert lease is not None
        waiting = asyncio.create_task(b.leases.acquire("gpu-a"))
        tickets = a.link.keys.node("gpu-a", "tickets")
        await wait_until(lambda: _count_is(raw_redis, tickets, 1), what="b's ticket")
        waiting.cancel()
        await wait_until(lambda: _count_is(raw_redis, tickets, 0), what="b to leave the line")
        await a.leases.release(lease)
        assert await raw_redis.get(a.link.keys.node("gpu-a", "lease")) is None
        assert await c.leases.acquire("gpu-a", wait=False) is not None


class TestExpiry:
    """A lease lives while renewed; an expired one cannot be used, and its node is free again."""

    async def test_expiry_renewed_while_held(self, open_stores: OpenStore) -> None:
        """Held past twice its TTL, the lease is still ours and the node still busy."""
        a, b = await open_stores("a", lease_ttl_s=1), await open_stores("b", lease_ttl_s=1)
        lease = await a.leases.acquire("gpu-a")
        assert lease is not None
        await wait_until(lambda: lease.renewals >= 6, what="six renewals (2 s)")
        assert lease.held
        assert not lease.lost.is_set()
        assert await b.leases.acquire("gpu-a", wait=False) is None

    async def test_expiry_stale_token_fails(self, open_stores: OpenStore, raw_redis: Redis) -> None:
        """A lease that expired and went to another replica can be neither renewed nor released."""
        a, b = await open_stores("a"), await open_stores("b")
        old = await a.leases.acquire("gpu-a")
        assert old is not None
        await raw_redis.pexpire(a.link.keys.node("gpu-a", "lease"), 1)  # as if a stalled
        new = await _acquire_soon(b, "gpu-a")
        assert new.token > old.token
        assert not await a.leases.release(old)
        assert old.lost.is_set()
        assert await raw_redis.get(a.link.keys.node("gpu-a", "lease")) == new.value
        assert new.held

    async def test_expiry_holder_learns_loss_on_renewal(
        self, open_stores: OpenStore, raw_redis: Redis
    ) -> None:
        """The holder's next renewal finds the lease gone and sets ``lost``."""
        a, b = await open_stores("a", lease_ttl_s=1), await open_stores("b", lease_ttl_s=1)
        old = await a.leases.acquire("gpu-a")
        assert old is not None
        await raw_redis.pexpire(a.link.keys.node("gpu-a", "lease"), 1)
        await _acquire_soon(b, "gpu-a")
        await asyncio.wait_for(old.lost.wait(), timeout=10)
        assert not old.held
        assert old.lost_reason is not None

    async def test_expiry_dead_holder_frees_node(self, open_stores: OpenStore) -> None:
        """A replica that dies holding a lease (no renewals) frees the node within the TTL."""
        a, b = await open_stores("a", lease_ttl_s=1), await open_stores("b", lease_ttl_s=1)
        lease = await a.leases.acquire("gpu-a")
        assert lease is not None
        await _die(a)
        loop = asyncio.get_running_loop()
        started = loop.time()
        got = await asyncio.wait_for(b.leases.acquire("gpu-a"), timeout=10)
        assert got is not None
        assert loop.time() - started < 1.0 + 3.0  # the TTL, and a margin for a loaded machine
        assert got.token > lease.token

    async def test_expiry_dead_waiter_ticket_expires(
        self, open_stores: OpenStore, raw_redis: Redis
    ) -> None:
        """A replica that dies waiting in line does not hold up the ones behind it."""
        ttl = {"lease_ttl_s": 1}
        a, b, c = [await open_stores(name, **ttl) for name in ("a", "b", "c")]
        lease = await a.leases.acquire("gpu-a")
        assert lease is not None
        tickets = a.link.keys.node("gpu-a", "tickets")
        b_waits = asyncio.create_task(b.leases.acquire("gpu-a"))
        await wait_until(lambda: _count_is(raw_redis, tickets, 1), what="b's ticket")
        c_waits = asyncio.create_task(c.leases.acquire("gpu-a"))
        await wait_until(lambda: _count_is(raw_redis, tickets, 2), what="c's ticket")
        await _die(b)  # dies in line: its ticket is never taken back
        await a.leases.release(lease)  # hands the node to b's ticket, which nobody renews
        got = await asyncio.wait_for(c_waits, timeout=10)
        assert got is not None
        with pytest.raises(SharedUnavailable):
            await b_waits


async def _count_is(client: Redis, key: str, count: int) -> bool:
    return int(await client.zcard(key)) == count


async def _acquire_soon(store: SharedStore, node: str) -> Lease:
    lease = await asyncio.wait_for(store.leases.acquire(node), timeout=10)
    assert lease is not None
    return lease


async def _die(store: SharedStore) -> None:
    """Stop a store the way a killed process stops: no release, no goodbye, no renewals."""
    await store.supervisor.aclose()
    await store.link.client.aclose()
    store.link.mark_down("test: the process died")
