"""SharedState: what one replica's state says, the others' say too (real redis-server).

Each test opens two or three SharedStates (one per simulated replica, each with its own
SharedStore and replica id) on the test's redis-server, in one process.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from sdproxy.cluster.clock import LoopClock
from sdproxy.cluster.sharedstate import SharedState
from sdproxy.cluster.state import Backlog
from sdproxy.config import ClusterSettings, NodeSettings, SchedulerSettings
from sdproxy.core.speed import SpeedEstimate
from sdproxy.shared.connect import open_store
from sdproxy.shared.link import SharedUnavailable
from tests.support import RedisServer, wait_until

NODES = [
    NodeSettings.model_validate({"name": name, "url": f"http://127.0.0.1:9/{name}"})
    for name in ("a", "b")
]
SCHEDULER = SchedulerSettings(health_interval_s=2, cooldown_base_s=1, cooldown_max_s=8)

OpenState = Callable[..., Awaitable[SharedState]]


class Work:
    """A LocalWork with set figures."""

    def __init__(self) -> None:
        self.loads: dict[str, Backlog] = {}
        self.requests = 0
        self.rendering: dict[str, Any] | None = None

    def backlog(self, node: str) -> Backlog:
        return self.loads.get(node, Backlog())

    def in_flight(self) -> int:
        return self.requests

    def progress(self) -> dict[str, Any] | None:
        return self.rendering


@pytest.fixture
async def open_state(redis_server: RedisServer) -> AsyncIterator[OpenState]:
    """``await open_state("r1")``: a started SharedState, closed at the end."""
    opened: list[SharedState] = []

    async def open_one(replica_id: str, **cluster: Any) -> SharedState:
        settings = ClusterSettings.model_validate(
            {
                "redis_url": redis_server.url,
                "replica_id": replica_id,
                "lease_ttl_s": 3,
                "redis_timeout_s": 0.5,
                **cluster,
            }
        )
        state = SharedState(NODES, SCHEDULER, LoopClock(), open_store(settings, SCHEDULER))
        opened.append(state)
        await state.start()
        return state

    yield open_one
    for state in opened:
        await state.aclose()


class TestHealth:
    async def test_a_node_down_on_one_replica_is_down_on_all(self, open_state: OpenState) -> None:
        one, two = await open_state("r1"), await open_state("r2")
        one.record_ok("a")
        await wait_until(lambda: two.usable("a"), "r2 to see node a up")
        heard: list[str] = []
        two.on_health_change(heard.append)
        assert one.record_failure("a", "connection refused")
        await wait_until(lambda: not two.usable("a"), "r2 to see node a down")
        assert heard == ["a"]
        assert two.health("a").last_error == "connection refused"
        assert two.health("b").last_error is None  # only node a

    async def test_failures_from_two_replicas_add_up(self, open_state: OpenState) -> None:
        one, two = await open_state("r1"), await open_state("r2")
        one.record_failure("a", "timeout", probe=True)
        await one.flush()
        await wait_until(lambda: not two.usable("a"), "r2 to see node a down")
        two.record_failure("a", "timeout", probe=True)
        await two.flush()
        await wait_until(
            lambda: one.health("a").consecutive_failures == 2, "both failures to count"
        )

    async def test_enabled_by_hand_on_one_is_enabled_on_all(self, open_state: OpenState) -> None:
        one, two = await open_state("r1"), await open_state("r2")
        one.set_disabled("b", True)
        await wait_until(lambda: two.health("b").disabled, "r2 to see b disabled")
        two.set_disabled("b", False)
        await wait_until(lambda: not one.health("b").disabled, "r1 to see b enabled")

    async def test_a_replica_that_starts_later_reads_the_health(
        self, open_state: OpenState
    ) -> None:
        one = await open_state("r1")
        one.record_failure("a", "connection refused")
        await one.flush()
        late = await open_state("r2")
        assert not late.usable("a")

    async def test_one_replica_probes_a_node_per_interval(self, open_state: OpenState) -> None:
        states = [await open_state(f"r{i}") for i in range(3)]
        claims = await asyncio.gather(*(state.claim_probe("a") for state in states))
        assert sorted(claims) == [False, False, True]
        assert await states[0].claim_probe("b") or await states[1].claim_probe("b")


class TestSpeedAndBenchmarks:
    async def test_an_observation_teaches_every_replica(self, open_state: OpenState) -> None:
        one, two = await open_state("r1"), await open_state("r2")
        before = two.speed("a").estimate().samples
        one.observe("a", 4.0, 2.5)
        await wait_until(lambda: two.speed("a").estimate().samples == before + 1, "r2 to learn")
        await asyncio.sleep(0.05)  # r1's own entry came back by now, and was left alone
        assert one.speed("a").estimate().samples == before + 1

    async def test_a_replica_that_starts_later_replays_the_speed_log(
        self, open_state: OpenState
    ) -> None:
        one = await open_state("r1")
        for work in (1.0, 2.0, 4.0):
            one.observe("a", work, 0.3 + 0.5 * work)
        await one.flush()
        late = await open_state("r2")
        assert late.speed("a").estimate() == one.speed("a").estimate()
        assert late.speed("a").estimate().samples == 3

    async def test_one_replica_benchmarks_a_node(self, open_state: OpenState) -> None:
        one, two = await open_state("r1"), await open_state("r2")
        assert await one.claim_benchmark("a")
        assert not await two.claim_benchmark("a")
        heard: list[tuple[str, dict[str, Any]]] = []
        two.on_benchmark(lambda node, result: heard.append((node, result)))
        one.share_benchmark("a", {"node": "a", "url": "http://secret.example/", "overhead_s": 1})
        await wait_until(lambda: bool(heard), "r2 to hear the benchmark")
        assert heard == [("a", {"node": "a", "overhead_s": 1})]  # never the node's URL
        assert await two.shared_benchmark("a") == {"node": "a", "overhead_s": 1}

    async def test_set_benchmark_stays_local(self, open_state: OpenState) -> None:
        one = await open_state("r1")
        one.set_benchmark("a", SpeedEstimate(0.5, 0.2, 4, "benchmark"), (1.0, 4.0))
        assert one.speed("a").estimate().overhead_s == pytest.approx(0.5)


class TestWork:
    async def test_turns_exclude_across_replicas(self, open_state: OpenState) -> None:
        one, two = await open_state("r1"), await open_state("r2")
        order: list[str] = []
        entered = asyncio.Event()

        async def hold() -> None:
            async with one.turn("a", 1.0):
                entered.set()
                order.append("r1 in")
                await asyncio.sleep(0.2)
                order.append("r1 out")

        async def wait() -> None:
            await entered.wait()
            async with two.turn("a", 2.0):
                order.append("r2 in")

        await asyncio.gather(hold(), wait())
        assert order == ["r1 in", "r1 out", "r2 in"]

    async def test_the_oldest_work_gets_the_node_first(self, open_state: OpenState) -> None:
        """Waiting for a busy node, a replica with an older request goes before one that
        queued earlier with a newer request."""
        holder, newer, older = [await open_state(f"r{i}") for i in range(3)]
        order: list[str] = []
        release = asyncio.Event()

        async def take(state: SharedState, priority: float, name: str) -> None:
            async with state.turn("a", priority):
                order.append(name)
                if name == "holder":
                    await release.wait()

        tasks = [asyncio.create_task(take(holder, 5.0, "holder"))]
        await wait_until(lambda: order == ["holder"], "the holder to have the node")
        tasks.append(asyncio.create_task(take(newer, 200.0, "newer")))
        await wait_until(lambda: newer.store.leases.waited == 1, "the newer to wait")
        tasks.append(asyncio.create_task(take(older, 100.0, "older")))
        await wait_until(lambda: older.store.leases.waited == 1, "the older to wait")
        release.set()
        await asyncio.gather(*tasks)
        assert order == ["holder", "older", "newer"]

    async def test_backlog_and_progress_reach_the_planners(self, open_state: OpenState) -> None:
        one, two = await open_state("r1"), await open_state("r2")
        work = Work()
        one.track(work)
        work.loads = {"a": Backlog(12.0, 6, running_s=2.0)}
        work.requests = 2
        work.rendering = {"kind": "txt2img", "nodes": {"a": 6}}
        one.backlog_changed("a")
        await wait_until(lambda: two.others_load("a")[1] == 6, "r2 to hear r1's backlog")
        seconds, _ = two.others_load("a")
        assert 10.0 <= seconds <= 12.0  # only what runs runs down, by the time since heard
        assert two.others_load("b") == (0.0, 0)
        assert two.others_progress() == [work.rendering]
        assert one.others_progress() == []
        shown = {r["id"]: r["in_flight"] for r in two.status()["replicas"]}
        assert shown == {"r1": 2, "r2": 0}

    async def test_signals_reach_the_others_not_the_sender(self, open_state: OpenState) -> None:
        one, two = await open_state("r1"), await open_state("r2")
        heard: list[str] = []
        one.on_broadcast("interrupt", lambda: heard.append("r1"))
        two.on_broadcast("interrupt", lambda: heard.append("r2"))
        one.broadcast("interrupt")
        await wait_until(lambda: heard == ["r2"], "r2 to hear the interrupt")
        await one.flush()
        await asyncio.sleep(0.05)  # r1's own message came back by now, and was left alone
        assert heard == ["r2"]


class TestCheckpoint:
    async def test_the_checkpoint_is_shared_and_outlives_replicas(
        self, open_state: OpenState
    ) -> None:
        one, two = await open_state("r1"), await open_state("r2")
        moved: list[str] = []
        two.on_checkpoint(lambda: moved.append(str(two.checkpoint)))
        one.set_checkpoint("v1-5-pruned.safetensors [6ce0161689]")
        await wait_until(lambda: bool(moved), "r2 to hear the checkpoint")
        assert moved == ["v1-5-pruned.safetensors [6ce0161689]"]
        await one.flush()
        late = await open_state("r3")
        assert late.checkpoint == "v1-5-pruned.safetensors [6ce0161689]"

    async def test_a_redis_that_restarted_empty_is_told_the_checkpoint(
        self, open_state: OpenState, redis_server: RedisServer
    ) -> None:
        one = await open_state("r1")
        one.set_checkpoint("sdxl.safetensors [31e35c80fc]")
        await one.flush()
        await redis_server.restart()  # no persistence: everything is gone
        await wait_until(
            lambda: one.status()["mode"] == "shared" and one.store.broadcast.subscriptions >= 2,
            "r1 to rejoin",
        )
        assert one.checkpoint == "sdxl.safetensors [31e35c80fc]"
        late = await open_state("r2")
        assert late.checkpoint == "sdxl.safetensors [31e35c80fc]"


class TestRedisGone:
    async def test_local_mode_keeps_scheduling(
        self, open_state: OpenState, redis_server: RedisServer
    ) -> None:
        one = await open_state("r1")
        await redis_server.stop()
        one.record_failure("a", "refused")  # the write fails: local mode, one warning
        await wait_until(lambda: one.status()["mode"] == "local", "local mode")
        one.admit()  # "local": generations go on
        async with asyncio.timeout(2):
            async with one.turn("b", 1.0):  # the local lock alone
                pass
        assert not one.usable("a")
        assert await one.claim_probe("a")  # alone: it probes every node itself

    async def test_refuse_mode_answers_503(
        self, open_state: OpenState, redis_server: RedisServer
    ) -> None:
        one = await open_state("r1", on_redis_down="refuse")
        one.admit()
        await redis_server.stop()
        one.record_failure("a", "refused")
        await wait_until(lambda: one.status()["mode"] == "local", "local mode")
        with pytest.raises(SharedUnavailable) as raised:
            one.admit()
        assert raised.value.status == 503
        assert int(raised.value.headers()["Retry-After"]) >= 1
