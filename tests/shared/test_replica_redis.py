"""Replicas and Redis itself (issue 13): Redis gone (on_redis_down), and nothing secret in it.

Real redis-server (one with a password here), sdproxy replicas as subprocesses, fake webui nodes
in this process.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from sdproxy.cli import free_port
from sdproxy.fakewebui import FakeNodeSettings
from tests.support import (
    SMALL,
    NodeProcess,
    RedisServer,
    ReplicaProcess,
    assert_no_tracebacks,
    cluster_status,
    fake_nodes,
    find_redis_server,
    node_entry,
    post_json,
    render_complete,
    replica_config,
    replicas,
    wait_for_status,
    wait_until,
)

pytestmark = pytest.mark.slow

BODY = dict(SMALL, prompt="cow", batch_size=4)
CHECKPOINTS = (
    "v1-5-pruned-emaonly.safetensors [6ce0161689]",
    "dreamshaper_8.safetensors [879db523c3]",
)
TINY_BENCHMARK = {"on_start": True, "width": 64, "height": 64, "warmup_runs": 0, "timed_runs": 1}


def state_dir(path: Path) -> dict[str, str]:
    return {"SDPROXY_BENCHMARK__STATE_DIR": str(path)}


def measured_here(replica: ReplicaProcess, node: str) -> int:
    """How many benchmarks of ``node`` ``replica`` ran itself (benchmark.py logs each)."""
    lines = replica.log_text().splitlines()
    return sum(f"node {node}: " in line and " s overhead, " in line for line in lines)


async def generate(session: aiohttp.ClientSession, replica: ReplicaProcess) -> dict[str, Any]:
    return await render_complete(session, replica.url, BODY)


class TestRedisDown:
    """Without Redis, on_redis_down decides: refuse new generations, or schedule locally."""

    async def test_redis_down_refuse_answers_503_and_local_renders(
        self, tmp_path: Path, redis_server: RedisServer
    ) -> None:
        """Redis stopped: the "refuse" replica answers a webui-shaped 503 with Retry-After,
        the "local" one renders; Redis back, both render."""
        async with fake_nodes(FakeNodeSettings(name="n0")) as nodes, aiohttp.ClientSession() as s:
            config = replica_config(tmp_path / "sdproxy.toml", nodes, redis_server.url)
            refuse = {"SDPROXY_CLUSTER__ON_REDIS_DOWN": "refuse"}
            async with (
                replicas(config, "refusing", **refuse) as (refusing,),
                replicas(config, "local") as (local,),
            ):
                await generate(s, refusing)
                await redis_server.stop()
                for replica in (refusing, local):
                    await wait_for_status(
                        s, replica.url, lambda st: st["shared"]["mode"] == "local"
                    )
                url = f"{refusing.url}/sdapi/v1/txt2img"
                status, answer, headers = await post_json(s, url, BODY)
                assert status == 503
                assert int(headers["Retry-After"]) >= 1
                assert set(answer) == {"error", "detail", "body", "errors"}
                assert answer["error"] == "SharedUnavailable"
                assert "shared state" in answer["detail"]
                await generate(s, local)
                await redis_server.start()
                await wait_for_status(s, refusing.url, lambda st: st["shared"]["mode"] == "shared")
                await generate(s, refusing)
        assert_no_tracebacks(refusing, local)


class TestNothingSecretInRedis:
    """Redis holds names, health, timings and titles: no node URL, no credential."""

    async def test_redis_holds_no_url_or_credential_and_only_prefixed_keys(
        self, tmp_path: Path
    ) -> None:
        """After traffic through two replicas (renders, a benchmark, a node down, options, an
        interrupt, a disabled node), no key, value or message in Redis holds a secret."""
        binary = find_redis_server()
        if binary is None:
            pytest.skip("redis-server not found")
        redis_password, user, node_password = "redis-pw-Qv81", "sd-user-Tm42", "node-pw-Xk29"
        redis = RedisServer(binary, tmp_path / "redis", "--requirepass", redis_password)
        await redis.start()
        url = f"redis://:{redis_password}@127.0.0.1:{redis.port}/0"
        gone = NodeProcess("gone", free_port())  # nothing listens there: found down
        guarded_settings = FakeNodeSettings(
            name="guarded", api_auth=f"{user}:{node_password}", models=CHECKPOINTS
        )
        prefix = "secretcheck"
        try:
            async with (
                fake_nodes(guarded_settings) as (guarded,),
                aiohttp.ClientSession() as session,
                contextlib.aclosing(Redis.from_url(url, decode_responses=True)) as raw,
            ):
                config = replica_config(
                    tmp_path / "sdproxy.toml",
                    [guarded, gone],
                    url,
                    node_fields={"guarded": {"username": user, "password": node_password}},
                    cluster={"redis_prefix": prefix},
                    benchmark=TINY_BENCHMARK,
                )
                messages: list[tuple[str, str]] = []
                async with asyncio.TaskGroup() as group:
                    listener = group.create_task(listen(raw, messages))
                    # Each its own benchmark state file: results go through Redis only.
                    async with (
                        replicas(config, "r0", **state_dir(tmp_path / "r0")) as (r0,),
                        replicas(config, "r1", **state_dir(tmp_path / "r1")) as (r1,),
                    ):
                        await traffic(session, r0, r1)
                        keys, text = await everything_in(raw)  # the replicas' own keys too
                    listener.cancel()
        finally:
            await redis.stop()
        for what in ("node:guarded:health", "node:guarded:benchmarks", "node:gone:health"):
            assert f"{prefix}:{what}" in keys
        assert f"{prefix}:replica:r0" in keys
        assert messages
        assert all(key.startswith(f"{prefix}:") for key in keys), keys
        assert all(channel.startswith(f"{prefix}:") for channel, _ in messages)
        basic = base64.b64encode(f"{user}:{node_password}".encode()).decode()
        held = text + "\n".join(data for _, data in messages)
        logs = r0.log_text() + r1.log_text()
        for secret in (user, node_password, basic, redis_password, url):
            assert secret not in held
        for port in (guarded.url.rsplit(":", 1)[1], gone.port):
            # 127.0.0.1:port, or ('127.0.0.1', port) as the OS tells a refused connection
            assert not re.search(rf"127\.0\.0\.1\W{{1,4}}{port}\b", held), port
        assert redis_password not in logs
        assert node_password not in logs
        # The benchmark at start was run by one replica (its claim), and shared.
        measured = [measured_here(replica, "guarded") for replica in (r0, r1)]
        assert sorted(measured) == [0, 1]
        assert_no_tracebacks(r0, r1)


async def traffic(session: aiohttp.ClientSession, r0: ReplicaProcess, r1: ReplicaProcess) -> None:
    """Renders, a benchmark, a checkpoint, an interrupt and a node disabled and enabled, over
    two replicas."""

    async def benchmarked() -> bool:
        statuses = [await cluster_status(session, replica.url) for replica in (r0, r1)]
        first, second = [node_entry(st, "guarded")["benchmark"]["measured_at"] for st in statuses]
        # The same result (Redis's Lua cjson keeps 14 digits: the times agree to 0.1 ms).
        return first is not None and second is not None and abs(first - second) < 0.01

    await wait_until(benchmarked, what="the benchmark of guarded on both replicas")
    for replica in (r0, r1, r0):
        await generate(session, replica)
    status, answer, _ = await post_json(
        session, f"{r0.url}/sdapi/v1/options", {"sd_model_checkpoint": CHECKPOINTS[1]}
    )
    assert status == 200, answer
    status, _, _ = await post_json(session, f"{r1.url}/sdapi/v1/interrupt", None)
    assert status == 200
    for action in ("disable", "enable"):
        status, _, _ = await post_json(session, f"{r1.url}/cluster/nodes/guarded/{action}", None)
        assert status == 200
    await wait_for_status(session, r0.url, lambda s: node_entry(s, "guarded")["state"] == "up")
    await generate(session, r1)


async def listen(raw: Redis, messages: list[tuple[str, str]]) -> None:
    """Every pub/sub message on any channel, until cancelled."""
    async with raw.pubsub() as pubsub:
        await pubsub.psubscribe("*")
        # Appended as they come (not collected at the end): the task is cancelled mid-loop.
        async for message in pubsub.listen():
            if message["type"] != "pmessage":
                continue  # the subscription's own confirmation
            messages.append((message["channel"], message["data"]))


async def everything_in(raw: Redis) -> tuple[list[str], str]:
    """Every key in Redis, and every key and value as one text."""
    keys = [key async for key in raw.scan_iter(count=1000)]
    parts: list[Any] = list(keys)
    for key in keys:
        kind = str(await raw.type(key))  # decoded: the client decodes responses
        if kind == "string":
            parts.append(await raw.get(key))
        elif kind == "hash":
            parts.append(await raw.hgetall(key))
        elif kind == "list":
            parts.append(await raw.lrange(key, 0, -1))
        elif kind == "set":
            parts.append(sorted(await raw.smembers(key)))
        elif kind == "zset":
            parts.append(await raw.zrange(key, 0, -1, withscores=True))
        else:
            raise AssertionError(f"{key} is a {kind}: read it here too")
    return keys, json.dumps(parts)
