"""What replicas share (issue 13): node health and its probes, interrupts, the checkpoint and
benchmarks.

Real redis-server, sdproxy replicas as subprocesses, fake webui nodes (in this process, so the
test reads their counters, or as subprocesses when one must die).
"""

from __future__ import annotations

import asyncio
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sdproxy.fakewebui import FakeNodeSettings
from tests.support import (
    SMALL,
    RedisServer,
    ReplicaProcess,
    assert_no_tracebacks,
    cluster_status,
    fake_nodes,
    info_of,
    node_entry,
    node_processes,
    pixels,
    post_json,
    render_complete,
    replica_config,
    replicas,
    wait_for_status,
    wait_until,
)

pytestmark = pytest.mark.slow

BODY = dict(SMALL, prompt="cow", batch_size=4)
V15 = "v1-5-pruned-emaonly.safetensors [6ce0161689]"
DREAM = "dreamshaper_8.safetensors [879db523c3]"
TINY_BENCHMARK = {"on_start": True, "width": 64, "height": 64, "warmup_runs": 0, "timed_runs": 1}


def state_of(status: dict[str, Any], node: str) -> str:
    return str(node_entry(status, node)["state"])


async def generate(session: aiohttp.ClientSession, replica: ReplicaProcess) -> dict[str, Any]:
    return await render_complete(session, replica.url, BODY)


class TestHealth:
    """Node health is the cluster's: one replica's finding is every replica's."""

    async def test_health_found_by_one_replica_holds_for_all(
        self, tmp_path: Path, redis_server: RedisServer
    ) -> None:
        """A node killed is seen down, then back, by a replica that never probes it itself."""
        async with (
            fake_nodes(FakeNodeSettings(name="live")) as (live,),
            node_processes(["--per-image-s", "0", "--overhead-s", "0"]) as (dying,),
            aiohttp.ClientSession() as session,
        ):
            config = replica_config(tmp_path / "sdproxy.toml", [live, dying], redis_server.url)
            # "trusting" probes every 30 s: within this test, only at its start.
            slow = {"SDPROXY_SCHEDULER__HEALTH_INTERVAL_S": "30"}
            async with (
                replicas(config, "watching") as (watching,),
                replicas(config, "trusting", **slow) as (trusting,),
            ):
                status = await cluster_status(session, trusting.url)
                assert state_of(status, dying.name) == "up"
                sent_before = node_entry(status, dying.name)["requests_sent"]
                dying.kill()
                await dying.wait()
                await wait_for_status(
                    session, watching.url, lambda s: state_of(s, dying.name) == "down", 10
                )
                await wait_for_status(
                    session, trusting.url, lambda s: state_of(s, dying.name) == "down", 5
                )
                # Down for "trusting" too: it sends the node no work.
                await generate(session, trusting)
                status = await cluster_status(session, trusting.url)
                assert node_entry(status, dying.name)["requests_sent"] == sent_before
                await dying.start()
                await wait_for_status(
                    session, trusting.url, lambda s: state_of(s, dying.name) == "up", 10
                )
        assert_no_tracebacks(watching, trusting)

    async def test_probes_not_multiplied_by_the_replicas(
        self, tmp_path: Path, redis_server: RedisServer
    ) -> None:
        """Three replicas probing every 0.2 s probe a node as often as one: 16 probes take at
        least 15 claim periods (0.18 s each; three independent replicas: about 1 s). A slow
        machine only makes them take longer."""
        async with fake_nodes(FakeNodeSettings(name="n0")) as (node,):
            config = replica_config(tmp_path / "sdproxy.toml", [node], redis_server.url)
            async with replicas(config, "r0", "r1", "r2") as started:
                loop = asyncio.get_running_loop()

                def probes() -> int:
                    return node.node.requests["GET /sdapi/v1/progress"]

                counted = probes()  # the replicas' first probes, at start, are not claimed
                await wait_until(lambda: probes() > counted, what="a probe")
                # No await between the last look and these: the next probe comes after now.
                started_at, counted = loop.time(), probes()
                await wait_until(lambda: probes() >= counted + 16, what="16 probes")
                elapsed_s = loop.time() - started_at
        assert elapsed_s >= 2.0, f"16 probes in {elapsed_s:.2f} s"
        assert_no_tracebacks(*started)


class TestInterrupt:
    """An interrupt posted to any replica reaches the requests of every replica."""

    async def test_interrupt_on_one_replica_stops_a_request_on_another(
        self, tmp_path: Path, redis_server: RedisServer
    ) -> None:
        """A long request on A, interrupted through B: A answers early with the images done,
        each beside its own seed."""
        slow = 256.0  # a 64x64 image takes 4 s
        async with (
            fake_nodes(
                FakeNodeSettings(name="a", per_image_s=slow),
                FakeNodeSettings(name="b", per_image_s=slow),
                FakeNodeSettings(name="reference"),
            ) as (a, b, reference),
            aiohttp.ClientSession() as session,
        ):
            config = replica_config(tmp_path / "sdproxy.toml", [a, b], redis_server.url)
            async with replicas(config, "A", "B") as (first, second):
                body = dict(SMALL, prompt="cow", batch_size=1, n_iter=6, seed=100)
                url = f"{first.url}/sdapi/v1/txt2img"
                async with asyncio.TaskGroup() as group:
                    task = group.create_task(post_json(session, url, body))
                    await wait_until(
                        lambda: all(n.node.state.sampling_step >= 1 for n in (a, b)),
                        what="both nodes to render",
                    )
                    # B renders nothing itself, yet shows A's request as one webui would.
                    seen: dict[str, Any] = {}

                    async def b_shows_a_busy() -> bool:
                        async with session.get(f"{second.url}/sdapi/v1/progress") as resp:
                            seen.update(await resp.json())
                        return bool(seen["state"]["job_count"] > 0)

                    await wait_until(b_shows_a_busy, what="B to show A's request")
                    assert seen["state"]["job_count"] == 6  # the client's n_iter
                    assert 0 < seen["progress"] < 1
                    status, answer, _ = await post_json(
                        session, f"{second.url}/sdapi/v1/interrupt", None
                    )
                    assert (status, answer) == (200, {})
                status, result, _ = task.result()
            assert status == 200, result
            info = info_of(result)
            assert 0 < len(result["images"]) < 6
            assert sorted(info["all_seeds"]) == list(range(100, 106))
            # images[i] is all_seeds[i]'s: the reference node renders that seed alone the same.
            for image, seed in zip(result["images"], info["all_seeds"], strict=False):
                alone = dict(SMALL, prompt="cow", seed=seed)
                _, single, _ = await post_json(session, f"{reference.url}/sdapi/v1/txt2img", alone)
                assert pixels(image) == pixels(single["images"][0])
        # A told the nodes its jobs were on (the only ones running).
        assert [n.node.requests["POST /sdapi/v1/interrupt"] for n in (a, b)] == [1, 1]
        assert_no_tracebacks(first, second)


class TestCheckpoint:
    """The cluster's checkpoint lives in Redis: replicas started later, and the others, know it."""

    async def test_checkpoint_survives_a_replica_restart_and_is_shared(
        self, tmp_path: Path, redis_server: RedisServer
    ) -> None:
        """Set through r0, which then stops: r1 and r2, started after, load it on nodes that
        lost it; set again through r1, r2 renders with it."""
        settings = [FakeNodeSettings(name=f"n{i}", models=(V15, DREAM)) for i in range(2)]
        async with fake_nodes(*settings) as nodes, aiohttp.ClientSession() as session:
            config = replica_config(tmp_path / "sdproxy.toml", nodes, redis_server.url)
            async with replicas(config, "r0") as (setter,):
                url = f"{setter.url}/sdapi/v1/options"
                status, answer, _ = await post_json(session, url, {"sd_model_checkpoint": DREAM})
                assert status == 200, answer
            # Behind sdproxy's back (a webui restarted on its default model).
            for node in nodes:
                status, _, _ = await post_json(
                    session, f"{node.url}/sdapi/v1/options", {"sd_model_checkpoint": V15}
                )
                assert status == 200
            async with replicas(config, "r1", "r2") as (r1, r2):
                # r1 and r2 load the cluster's checkpoint before they serve.
                assert [n.node.options["sd_model_checkpoint"] for n in nodes] == [DREAM, DREAM]
                async with session.get(f"{r1.url}/sdapi/v1/options") as resp:
                    assert (await resp.json())["sd_model_checkpoint"] == DREAM
                assert info_of(await generate(session, r2))["sd_model_name"] == "dreamshaper_8"

                url = f"{r1.url}/sdapi/v1/options"
                status, answer, _ = await post_json(session, url, {"sd_model_checkpoint": V15})
                assert status == 200, answer
                # r2 hears it and reads the nodes again; without it, it would wait for DREAM.
                await wait_for_status(
                    session,
                    r2.url,
                    lambda s: [n["current_model"] for n in s["nodes"]] == [V15, V15],
                    10,
                )
                answer = await generate(session, r2)
                assert info_of(answer)["sd_model_name"] == "v1-5-pruned-emaonly"
        assert_no_tracebacks(setter, r1, r2)


class TestBenchmark:
    """A node is benchmarked by one replica at a time, and every replica takes the result."""

    async def test_benchmark_run_by_one_replica_shared_and_run_again_on_request(
        self, tmp_path: Path, redis_server: RedisServer
    ) -> None:
        """At start one replica benchmarks the node and both have the result; asked again
        (POST /cluster/benchmark), the node is benchmarked again, and both have the new one."""
        async with fake_nodes(FakeNodeSettings(name="n0")) as (node,), aiohttp.ClientSession() as s:
            config = replica_config(
                tmp_path / "sdproxy.toml", [node], redis_server.url, benchmark=TINY_BENCHMARK
            )
            runs = 2  # TINY_BENCHMARK: one timed run of each of the two batch sizes
            # Each its own state file: a result one replica has must have come through Redis.
            async with (
                replicas(config, "r0", SDPROXY_BENCHMARK__STATE_DIR=str(tmp_path / "r0")) as r0,
                replicas(config, "r1", SDPROXY_BENCHMARK__STATE_DIR=str(tmp_path / "r1")) as r1,
            ):
                started = r0 + r1

                async def measured_at() -> list[float | None]:
                    statuses = [await cluster_status(s, replica.url) for replica in started]
                    return [node_entry(st, "n0")["benchmark"]["measured_at"] for st in statuses]

                async def benchmarked_after(after: float) -> bool:
                    """Both have a result measured after ``after``, the same one (Redis's Lua
                    cjson keeps 14 digits of a number: the times agree to 0.1 ms)."""
                    first, second = await measured_at()
                    if first is None or second is None:
                        return False
                    return first > after and abs(first - second) < 0.01

                await wait_until(partial(benchmarked_after, 0.0), what="the first benchmark")
                assert node.node.requests["POST /sdapi/v1/txt2img"] == runs  # by one replica
                for replica in started:  # whichever ran the first one
                    (latest, _) = await measured_at()
                    assert latest is not None
                    async with s.post(f"{replica.url}/cluster/benchmark?node=n0") as resp:
                        assert resp.status == 202
                    await wait_until(partial(benchmarked_after, latest), what="a new benchmark")
        assert node.node.requests["POST /sdapi/v1/txt2img"] == 3 * runs
        assert_no_tracebacks(*started)
