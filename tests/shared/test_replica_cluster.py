"""Replicas under load (issue 13): one job per node at a time, a replica killed, Redis restarted.

Each test runs a real redis-server, sdproxy replicas as subprocesses and fake webui nodes in
this process, whose counters the test reads directly: ``max_concurrent_jobs`` goes above 1 as
soon as two jobs meet on a node, whichever replicas sent them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from sdproxy.fakewebui import FakeNodeSettings
from tests.support import (
    SMALL,
    RedisServer,
    ReplicaProcess,
    RunningNode,
    assert_complete,
    assert_no_tracebacks,
    cluster_status,
    fake_nodes,
    pixels,
    post_json,
    reference_answer,
    replica_config,
    replicas,
    wait_until,
)

pytestmark = pytest.mark.slow

TTL_S = 3.0  # replica_config's lease_ttl_s
REACHABLE_AGAIN = "reachable again: sharing state with the replicas"  # shared/link.py


def node_settings(count: int) -> list[FakeNodeSettings]:
    """``count`` nodes rendering a 64x64 image in 1/64 of 4 s (0.0625 s), and the reference
    node (instant, in no replica's configuration) that renders every answer again alone."""
    nodes = [FakeNodeSettings(name=f"n{i}", per_image_s=4.0, overhead_s=0.02) for i in range(count)]
    return [*nodes, FakeNodeSettings(name="reference")]


def body_for(index: int) -> dict[str, Any]:
    """Mixed sizes: 1 to 4 images a batch, one batch or two."""
    return dict(SMALL, prompt=f"cow {index}", batch_size=1 + index % 4, n_iter=1 + (index % 3 == 0))


@dataclass(frozen=True)
class Answer:
    """What one replica answered to one request."""

    replica: str
    body: dict[str, Any]
    status: int
    answer: Any


async def send(session: aiohttp.ClientSession, replica: ReplicaProcess, index: int) -> Answer:
    body = body_for(index)
    status, answer, _ = await post_json(session, f"{replica.url}/sdapi/v1/txt2img", body)
    return Answer(replica.replica_id, body, status, answer)


class Load:
    """Clients posting to replicas in a loop until stopped; every answer kept."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session
        self.answers: list[Answer] = []
        self.stopping = asyncio.Event()
        self._sent = 0

    async def client(self, replica: ReplicaProcess) -> None:
        while not self.stopping.is_set():
            self._sent += 1
            try:
                answer = await send(self.session, replica, self._sent)
            except aiohttp.ClientError:
                return  # the replica was killed: its clients' connections broke with it
            self.answers.append(answer)

    def start(
        self, group: asyncio.TaskGroup, targets: Sequence[ReplicaProcess], clients: int
    ) -> None:
        for replica in targets:
            for _ in range(clients):
                group.create_task(self.client(replica))

    def answered(self, replica: ReplicaProcess) -> int:
        return sum(answer.replica == replica.replica_id for answer in self.answers)

    async def under_way(
        self, group: asyncio.TaskGroup, targets: Sequence[ReplicaProcess], clients: int
    ) -> None:
        """Start ``clients`` per replica, and return once every replica has answered twice."""
        self.start(group, targets, clients)
        await wait_until(
            lambda: all(self.answered(replica) >= 2 for replica in targets),
            what="every replica to answer",
            timeout_s=30,
        )


async def assert_rendered_right(
    session: aiohttp.ClientSession, reference: RunningNode, answers: Sequence[Answer]
) -> None:
    """Every answer is complete, and pixel for pixel what one node renders for its seeds."""
    assert answers
    for each in answers:
        assert each.status == 200, (each.replica, each.answer)
        assert_complete(each.answer, each.body)
        single = await reference_answer(session, reference, "txt2img", each.body, each.answer)
        assert [pixels(i) for i in each.answer["images"]] == [pixels(i) for i in single["images"]]


async def requests_sent(
    session: aiohttp.ClientSession, senders: Sequence[ReplicaProcess]
) -> dict[str, list[int]]:
    """Node -> the jobs each of ``senders`` has sent it (its /cluster/status counters)."""
    sent: dict[str, list[int]] = {}
    for replica in senders:
        for node in (await cluster_status(session, replica.url))["nodes"]:
            sent.setdefault(node["name"], []).append(node["requests_sent"])
    return sent


async def fences(raw: Redis, nodes: Sequence[str]) -> dict[str, int]:
    """Node -> its fencing counter: how many leases Redis has granted on it."""
    values = await raw.mget([f"sdproxy:node:{node}:fence" for node in nodes])
    return {node: int(value or 0) for node, value in zip(nodes, values, strict=True)}


async def kill_holding_a_lease(
    victim: ReplicaProcess, raw: Redis, nodes: Sequence[str]
) -> list[str]:
    """SIGKILL ``victim`` at a moment it holds node leases; the nodes whose lease it held."""
    held: list[str] = []

    async def frozen_holding() -> bool:
        os.kill(victim.pid, signal.SIGSTOP)  # stopped, it can neither release nor renew
        values = await raw.mget([f"sdproxy:node:{node}:lease" for node in nodes])
        # A lease is "<token>|<replica id>#<nonce>" (decoded: the client decodes responses).
        owners = [str(value or "|").split("|", 1)[1].rsplit("#", 1)[0] for value in values]
        held[:] = [
            node for node, owner in zip(nodes, owners, strict=True) if owner == victim.replica_id
        ]
        if not held:
            os.kill(victim.pid, signal.SIGCONT)
        return bool(held)

    await wait_until(frozen_holding, what=f"{victim.replica_id} to hold a lease")
    victim.kill()
    assert victim.process is not None
    assert await victim.process.wait() == -signal.SIGKILL
    return held


def listed(status: dict[str, Any]) -> list[str]:
    return sorted(replica["id"] for replica in status["shared"]["replicas"])


class TestNodeLeases:
    """Replicas in front of the same nodes give each node one job at a time between them."""

    async def test_leases_keep_one_job_per_node_across_replicas(
        self, tmp_path: Path, redis_server: RedisServer
    ) -> None:
        """24 clients over 3 replicas, mixed sizes: every answer right, no node held two jobs."""
        async with fake_nodes(*node_settings(3)) as running, aiohttp.ClientSession() as session:
            nodes, reference = running[:3], running[3]
            config = replica_config(tmp_path / "sdproxy.toml", nodes, redis_server.url)
            async with replicas(config, "r0", "r1", "r2") as started:
                async with asyncio.TaskGroup() as group:
                    tasks = [group.create_task(send(session, started[i % 3], i)) for i in range(24)]
                statuses = [await cluster_status(session, replica.url) for replica in started]
                sent = await requests_sent(session, started)
            answers = [task.result() for task in tasks]
            await assert_rendered_right(session, reference, answers)
        assert [node.node.max_concurrent_jobs for node in nodes] == [1, 1, 1]
        # Each image rendered once: no job ran twice.
        asked = sum(each.body["batch_size"] * each.body["n_iter"] for each in answers)
        assert sum(node.node.images_rendered for node in nodes) == asked
        # The leases were contended: every node took jobs from two replicas or more.
        assert all(sum(count > 0 for count in counts) >= 2 for counts in sent.values()), sent
        for status in statuses:
            assert status["shared"]["mode"] == "shared"
            assert listed(status) == ["r0", "r1", "r2"]
        assert_no_tracebacks(*started)


class TestReplicaKilled:
    """A replica killed by PID mid-load costs the others nothing but the rest of its lease."""

    async def test_killed_replica_leases_taken_over_and_requests_elsewhere_complete(
        self, tmp_path: Path, redis_server: RedisServer
    ) -> None:
        """SIGKILL a replica holding leases: within the TTL the others take the nodes over,
        finish every request they were sent, and stop listing it."""
        async with (
            fake_nodes(*node_settings(3)) as running,
            aiohttp.ClientSession() as session,
            contextlib.aclosing(Redis.from_url(redis_server.url, decode_responses=True)) as raw,
        ):
            nodes, reference = running[:3], running[3]
            names = [node.name for node in nodes]
            config = replica_config(tmp_path / "sdproxy.toml", nodes, redis_server.url)
            async with replicas(config, "r0", "r1", "r2") as started:
                victim, living = started[0], started[1:]
                load = Load(session)
                async with asyncio.TaskGroup() as group:
                    await load.under_way(group, started, clients=3)
                    orphaned = await kill_holding_a_lease(victim, raw, names)
                    answered_at_kill = len(load.answers)
                    fenced_at_kill = await fences(raw, orphaned)
                    sent_at_kill = await requests_sent(session, living)

                    async def taken_over() -> bool:
                        now = await fences(raw, orphaned)
                        return all(now[node] > fenced_at_kill[node] for node in orphaned)

                    async def every_node_works() -> bool:
                        now = await requests_sent(session, living)
                        return all(sum(now[n]) > sum(sent_at_kill[n]) for n in names)

                    async def dead_one_dropped() -> bool:
                        statuses = [await cluster_status(session, r.url) for r in living]
                        return all(listed(status) == ["r1", "r2"] for status in statuses)

                    # A new lease on each node the dead replica held: it expired unreleased.
                    await wait_until(taken_over, what="the leases taken over", timeout_s=TTL_S + 5)
                    await wait_until(
                        every_node_works, what="jobs on every node", timeout_s=TTL_S + 5
                    )
                    await wait_until(dead_one_dropped, what="r0 unlisted", timeout_s=TTL_S + 5)
                    load.stopping.set()
            await assert_rendered_right(session, reference, load.answers)
        after_kill = load.answers[answered_at_kill:]
        assert after_kill
        assert all(each.replica != victim.replica_id for each in after_kill)
        assert [node.node.max_concurrent_jobs for node in nodes] == [1, 1, 1]
        assert_no_tracebacks(*living)


class TestRedisRestart:
    """Redis restarting mid-load: no request fails, the replicas rejoin, leases work again."""

    async def test_redis_restart_mid_load_fails_nothing_and_replicas_rejoin(
        self, tmp_path: Path, redis_server: RedisServer
    ) -> None:
        """Redis killed and started again under load: every answer right, both replicas back
        in shared mode with one "reachable again" line each, then one job per node again."""
        async with (
            fake_nodes(*node_settings(2)) as running,
            aiohttp.ClientSession() as session,
        ):
            nodes, reference = running[:2], running[2]
            names = [node.name for node in nodes]
            config = replica_config(tmp_path / "sdproxy.toml", nodes, redis_server.url)
            async with replicas(config, "r0", "r1") as started:

                async def modes() -> list[str]:
                    return [
                        (await cluster_status(session, r.url))["shared"]["mode"] for r in started
                    ]

                async def in_mode(mode: str) -> bool:
                    return await modes() == [mode, mode]

                load = Load(session)
                async with asyncio.TaskGroup() as group:
                    await load.under_way(group, started, clients=2)
                    # Stopped and started again once both noticed, so that both surely rejoin.
                    await redis_server.stop()
                    await wait_until(lambda: in_mode("local"), what="local mode", timeout_s=10)
                    await redis_server.start()
                    await wait_until(lambda: in_mode("shared"), what="shared mode", timeout_s=15)
                    rejoined = len(load.answers)
                    await wait_until(
                        lambda: len(load.answers) >= rejoined + 4, what="answers after the rejoin"
                    )
                    load.stopping.set()
                await assert_rendered_right(session, reference, load.answers)
                for replica in started:
                    assert replica.log_text().count(REACHABLE_AGAIN) == 1, replica.log_path

                # Leases work again: a fresh burst from both replicas, one job per node.
                await wait_until(
                    lambda: all(node.node.active_jobs == 0 for node in nodes), what="idle nodes"
                )
                for node in nodes:
                    node.node.max_concurrent_jobs = 0
                sent_before = await requests_sent(session, started)
                async with asyncio.TaskGroup() as group:
                    tasks = [group.create_task(send(session, started[i % 2], i)) for i in range(12)]
                sent_after = await requests_sent(session, started)
            await assert_rendered_right(session, reference, [task.result() for task in tasks])
        assert [node.node.max_concurrent_jobs for node in nodes] == [1, 1]
        # Contended by both replicas, through leases granted by the restarted Redis.
        for name in names:
            deltas = [a - b for a, b in zip(sent_after[name], sent_before[name], strict=True)]
            assert all(delta > 0 for delta in deltas), (name, deltas)
        async with contextlib.aclosing(Redis.from_url(redis_server.url)) as raw:
            assert all(count > 0 for count in (await fences(raw, names)).values())
        assert_no_tracebacks(*started)
