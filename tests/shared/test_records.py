"""Shared records on a real redis-server: health, speed, benchmarks, claims, catch-up, options."""

from __future__ import annotations

import asyncio

import orjson
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio import Redis

from sdproxy.core.health import NodeHealth
from sdproxy.shared.nodestate import (
    SPEED_LOG_LEN,
    health_from_record,
    health_to_record,
    shareable_options,
)
from tests.shared.conftest import OpenStore
from tests.support import wait_until


class TestVersioned:
    """Compare-and-set records: no lost update, every replica's cache follows."""

    async def test_versioned_stale_write_refused(self, open_stores: OpenStore) -> None:
        """A write expecting an old version is refused and returns the newer record."""
        a, b = await open_stores("a"), await open_stores("b")
        written, first = await a.records.write("cluster:x", {"n": 1}, expected=0)
        assert written
        assert first.version == 1
        written, now = await b.records.write("cluster:x", {"n": 2}, expected=0)
        assert not written
        assert now.version == 1
        assert now.data == {"n": 1}

    async def test_versioned_cache_follows_broadcast(self, open_stores: OpenStore) -> None:
        """A record written by one replica reaches the other's cache without a read."""
        a, b = await open_stores("a"), await open_stores("b")
        await a.records.write("cluster:x", {"n": 1}, expected=None)
        reads = b.link.calls["record read"]
        await wait_until(lambda: b.records.cached("cluster:x").data == {"n": 1}, what="b's cache")
        assert b.link.calls["record read"] == reads

    async def test_versioned_concurrent_health_failures_all_counted(
        self, open_stores: OpenStore
    ) -> None:
        """Three replicas recording failures at once: every one counts, none is lost."""
        stores = [await open_stores(name) for name in ("a", "b", "c")]

        async def fail(index: int) -> None:
            store = stores[index % 3]
            await store.nodes.update_health(
                "gpu-a", lambda h: h.record_failure(f"boom {index}", 1000.0 + index, probe=False)
            )

        async with asyncio.TaskGroup() as group:
            for index in range(12):
                group.create_task(fail(index))
        health = await stores[0].nodes.read_health("gpu-a")
        assert health is not None
        assert health.consecutive_failures == 12
        assert health.state == "down"

    async def test_versioned_health_shared_with_others(self, open_stores: OpenStore) -> None:
        """A node found down by one replica is down in the others' caches."""
        a, b = await open_stores("a"), await open_stores("b")
        start = NodeHealth(up=True, reason="answered")
        await a.nodes.update_health(
            "gpu-a", lambda h: h.record_failure("refused", 50.0, probe=True), start=start
        )

        def down_for_b() -> bool:
            health = b.nodes.cached_health("gpu-a")
            return health is not None and health.state == "down"

        await wait_until(down_for_b, what="b to see gpu-a down")
        health = b.nodes.cached_health("gpu-a")
        assert health is not None
        assert health.last_error == "refused"
        assert health.next_probe_at == 51.0  # base 1 s after the first failure

    async def test_versioned_malformed_record_ignored(
        self, open_stores: OpenStore, raw_redis: Redis
    ) -> None:
        """A health record that is not sdproxy's counts as none."""
        store = await open_stores("a")
        key = store.records.key(store.nodes.health_name("gpu-a"))
        await raw_redis.hset(key, mapping={"v": "3", "d": '{"up": "yes"}'})
        assert await store.nodes.read_health("gpu-a") is None
        await raw_redis.hset(key, mapping={"v": "x", "d": "not json"})
        assert await store.nodes.read_health("gpu-a") is None


class TestHealthRecord:
    """NodeHealth survives its trip through the shared record."""

    @given(
        up=st.booleans(),
        disabled=st.booleans(),
        failures=st.integers(0, 100),
        error=st.none() | st.text(max_size=50),
        times=st.lists(st.none() | st.floats(0, 2e9), min_size=4, max_size=4),
    )
    def test_health_record_round_trip(
        self,
        up: bool,
        disabled: bool,
        failures: int,
        error: str | None,
        times: list[float | None],
    ) -> None:
        """health_from_record(health_to_record(h)) == h, through JSON."""
        health = NodeHealth(
            2.0,
            60.0,
            up=up,
            disabled=disabled,
            consecutive_failures=failures,
            last_error=error,
            last_error_at=times[0],
            last_down_at=times[1],
            last_ok_at=times[2],
            next_probe_at=times[3],
        )
        data = orjson.loads(orjson.dumps(health_to_record(health)))
        assert health_from_record(data, 2.0, 60.0) == health

    def test_health_record_rejects_bad_types(self) -> None:
        """Wrong types (a bool as a count, a string as a time) make the record invalid."""
        good = health_to_record(NodeHealth())
        for key, bad in [
            ("up", 1),
            ("consecutive_failures", True),
            ("consecutive_failures", -1),
            ("last_ok_at", "now"),
            ("last_ok_at", float("inf")),
            ("reason", None),
        ]:
            assert health_from_record({**good, key: bad}, 2.0, 60.0) is None, key


class TestLogs:
    """Speed observations and benchmark results: bounded, numbered, heard by the others."""

    async def test_logs_speed_bounded_and_counted(self, open_stores: OpenStore) -> None:
        """The speed log keeps the newest entries only; counters count every job."""
        store = await open_stores("a")
        for index in range(SPEED_LOG_LEN + 10):
            await store.nodes.observe_job("gpu-a", 1.0, 1.0 + index, images=2)
        log = await store.nodes.speed_log("gpu-a")
        assert len(log) == SPEED_LOG_LEN
        assert log[-1] == (1.0, float(SPEED_LOG_LEN + 10))
        counters = await store.records.counters("gpu-a")
        assert counters == {"jobs": SPEED_LOG_LEN + 10, "images": 2 * (SPEED_LOG_LEN + 10)}

    async def test_logs_observation_heard_by_others_only(self, open_stores: OpenStore) -> None:
        """Another replica hears each observation once; the one that made it does not."""
        a, b = await open_stores("a"), await open_stores("b")
        heard_a: list[dict[str, object]] = []
        heard_b: list[dict[str, object]] = []
        a.records.on_entry("speed", lambda node, entry: heard_a.append(entry))
        b.records.on_entry("speed", lambda node, entry: heard_b.append(entry))
        await a.nodes.observe_job("gpu-a", 2.0, 3.0, images=4)
        await wait_until(lambda: len(heard_b) == 1, what="b to hear the observation")
        assert heard_b[0]["work"] == 2.0
        assert heard_b[0]["seq"] == 1
        assert heard_a == []

    async def test_logs_interrupted_job_counts_without_speed(self, open_stores: OpenStore) -> None:
        """A job that says nothing of the speed still counts."""
        store = await open_stores("a")
        await store.nodes.observe_job("gpu-a", 2.0, 0.1, images=1, observed=False)
        assert await store.nodes.speed_log("gpu-a") == []
        assert (await store.records.counters("gpu-a"))["jobs"] == 1

    async def test_logs_benchmark_without_url(self, open_stores: OpenStore) -> None:
        """A benchmark result is shared without the node's URL."""
        store = await open_stores("a")
        result = {"node": "gpu-a", "url": "http://10.0.0.5:7861", "overhead_s": 0.5}
        await store.nodes.add_benchmark("gpu-a", result)
        (stored,) = await store.nodes.benchmarks("gpu-a")
        assert "url" not in stored
        assert stored["overhead_s"] == 0.5

    async def test_logs_foreign_entries_skipped(
        self, open_stores: OpenStore, raw_redis: Redis
    ) -> None:
        """Entries that are not observations are skipped when read."""
        store = await open_stores("a")
        key = store.records.key("node:gpu-a:speed")
        await raw_redis.rpush(key, "garbage", '{"work": -1, "seconds": 1}', '{"work": 1}')
        await store.nodes.observe_job("gpu-a", 1.0, 2.0, images=1)
        assert await store.nodes.speed_log("gpu-a") == [(1.0, 2.0)]


class TestClaims:
    """One replica probes a node per interval; one catches a returning node up, once."""

    async def test_claims_probe_once_per_interval(self, open_stores: OpenStore) -> None:
        """Of three replicas asking at once, exactly one probes; after the interval, one again."""
        stores = [await open_stores(name) for name in ("a", "b", "c")]
        claims = await asyncio.gather(*(s.nodes.claim_probe("gpu-a", 0.3) for s in stores))
        assert sorted(claims) == [False, False, True]

        async def one_may_probe() -> bool:
            return await stores[1].nodes.claim_probe("gpu-a", 0.3)

        await wait_until(one_may_probe, what="the probe claim to expire")

    async def test_claims_benchmark_released_by_its_holder_only(
        self, open_stores: OpenStore
    ) -> None:
        """A benchmark claim lasts until its holder gives it back, which only the holder can."""
        a, b = await open_stores("a"), await open_stores("b")
        assert await a.nodes.claim_benchmark("gpu-a", 60)
        assert not await b.nodes.claim_benchmark("gpu-a", 60)
        assert not await b.nodes.release_benchmark("gpu-a")  # not b's to give back
        assert not await b.nodes.claim_benchmark("gpu-a", 60)
        assert await a.nodes.release_benchmark("gpu-a")
        assert await b.nodes.claim_benchmark("gpu-a", 60)

    async def test_claims_catch_up_once(self, open_stores: OpenStore) -> None:
        """Concurrent catch-ups of one return: one does it, the others see it done."""
        a, b = await open_stores("a"), await open_stores("b")
        first, second = await asyncio.gather(
            a.nodes.begin_catch_up("gpu-a", "epoch-1", 10),
            b.nodes.begin_catch_up("gpu-a", "epoch-1", 10),
        )
        assert sorted([first, second]) == ["busy", "mine"]
        doer = a if first == "mine" else b
        assert await doer.nodes.end_catch_up("gpu-a", "epoch-1", succeeded=True)
        assert await a.nodes.begin_catch_up("gpu-a", "epoch-1", 10) == "done"
        assert await b.nodes.begin_catch_up("gpu-a", "epoch-2", 10) == "mine"  # a new return

    async def test_claims_failed_catch_up_retried(self, open_stores: OpenStore) -> None:
        """A catch-up that failed, or whose replica died, is done by another."""
        a, b = await open_stores("a"), await open_stores("b")
        assert await a.nodes.begin_catch_up("gpu-a", "e", 10) == "mine"
        assert await a.nodes.end_catch_up("gpu-a", "e", succeeded=False)
        assert await b.nodes.begin_catch_up("gpu-a", "e", 0.2) == "mine"  # b dies holding it

        async def a_may() -> bool:
            return await a.nodes.begin_catch_up("gpu-a", "e", 10) == "mine"

        await wait_until(a_may, what="b's catch-up lock to expire")
        assert not await b.nodes.end_catch_up("gpu-a", "e", succeeded=True)  # not b's any more


class TestClusterRecords:
    """The cluster checkpoint and the options broadcast, shared and persisted in Redis."""

    async def test_cluster_checkpoint_seen_by_all(self, open_stores: OpenStore) -> None:
        """A checkpoint set through one replica is every replica's, and a new one reads it."""
        a, b = await open_stores("a"), await open_stores("b")
        await a.cluster.set_checkpoint("sdxl.safetensors [abc]")
        await wait_until(
            lambda: b.cluster.cached_checkpoint() == "sdxl.safetensors [abc]", what="b"
        )
        late = await open_stores("late")
        assert await late.cluster.read_checkpoint() == "sdxl.safetensors [abc]"

    async def test_cluster_options_merge(self, open_stores: OpenStore) -> None:
        """Options posted through two replicas add up; none is lost."""
        a, b = await open_stores("a"), await open_stores("b")
        await asyncio.gather(
            a.cluster.merge_options({"CLIP_stop_at_last_layers": 2}),
            b.cluster.merge_options({"eta_noise_seed_delta": 31337}),
        )
        await a.records.read(a.cluster.OPTIONS)
        assert a.cluster.cached_options() == {
            "CLIP_stop_at_last_layers": 2,
            "eta_noise_seed_delta": 31337,
        }

    def test_cluster_options_secrets_kept_out(self) -> None:
        """Options whose names look secret are not stored in Redis."""
        options = {"sd_model_checkpoint": "x", "civitai_api_key": "k", "ldsr_token": "t"}
        assert shareable_options(options) == {"sd_model_checkpoint": "x"}
