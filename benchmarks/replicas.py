"""Several sdproxy replicas sharing state in Redis against one: throughput, latency, round trips.

Every figure comes from this run. The same fake nodes (subprocesses, fresh for each run so their
counters start at zero) and the same clients (16 and 32 by default, each sending its requests
one after the other, spread round robin over the replicas) are measured:

- **baseline**: one sdproxy process without Redis (single-process mode);
- **R replicas** (``--replicas``, default 1,2,3): R ``sdproxy serve`` processes with one
  ``[cluster] redis_url``, a real redis-server started here.

For each run: cluster throughput (images/s) and its ratio to the sum of the node rates (what the
nodes could render flat out at this size and batch), p50/p95 request latency, Redis round trips
per request (the replicas' own count of their calls, heartbeats and publishes included), the
commands Redis ran for them (``INFO commandstats``: those inside scripts count too), and the most
jobs any node held at once (``/fake/stats``; must be 1). Against the baseline: the throughput ratio
(target >= 0.95) and the added p50 latency (target <= 5 ms per request), measured first with
one client on an idle cluster (where the p50 difference is sdproxy's own, not queueing). First,
what one node turn costs in Redis: an uncontended acquire and release, and a handover between
two replicas.

Runs with more than one replica need them to share state: a run whose first replica's
/cluster/status does not say mode "shared" (Redis unreachable, say) is skipped (``--force``
runs it anyway: each replica then believes the nodes idle, and the nodes get several jobs at
once, which the table shows).

    python benchmarks/replicas.py                        # about 3 minutes
    python benchmarks/replicas.py --quick --replicas 1   # the harness and the baseline only
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from redis.asyncio import Redis

# The harness shares its process helpers with the tests (one RedisServer, one ReplicaProcess).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sdproxy.cli import free_port
from sdproxy.config import ClusterSettings, SchedulerSettings
from sdproxy.core.speed import image_work
from sdproxy.shared.connect import open_store
from sdproxy.shared.store import SharedStore
from tests.support import (
    NodeProcess,
    RedisServer,
    ReplicaProcess,
    fake_stats,
    find_redis_server,
    replica_config,
    wait_until,
)


@dataclass
class Workload:
    nodes: int
    per_image_s: float  # at 20 steps, 512x512
    overhead_s: float
    size: int
    batch: int
    clients: int
    requests_per_client: int

    @property
    def images(self) -> int:
        return self.clients * self.requests_per_client * self.batch

    def node_rate(self) -> float:
        """Images/s one node renders flat out, one request of ``batch`` after the other."""
        work = image_work(steps=20, width=self.size, height=self.size)
        return self.batch / (self.overhead_s + self.batch * self.per_image_s * work)

    def body(self, client: int, index: int) -> dict[str, Any]:
        seed = 1000 * client + index
        return {"prompt": "a cow", "seed": seed, "steps": 20, "batch_size": self.batch,
                "width": self.size, "height": self.size}  # fmt: skip


@dataclass
class Result:
    label: str
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    images: int = 0
    redis_commands: int = 0  # every command Redis ran, those inside scripts too
    round_trips: int = 0  # calls the replicas made (their /cluster/status)
    max_jobs_on_a_node: int = 0
    skipped: str = ""

    @property
    def throughput(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _client(
    session: aiohttp.ClientSession, url: str, work: Workload, client: int, result: Result
) -> None:
    for index in range(work.requests_per_client):
        started = time.perf_counter()
        try:
            async with session.post(f"{url}/sdapi/v1/txt2img", json=work.body(client, index)) as r:
                answer = await r.json(content_type=None)
                ok = r.status == 200 and len(answer.get("images", [])) == work.batch
        except aiohttp.ClientError:
            ok = False
        result.latencies.append(time.perf_counter() - started)
        if ok:
            result.images += work.batch
        else:
            result.errors += 1


async def _redis_commands(client: Redis | None) -> int:
    if client is None:
        return 0
    stats = await client.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")


async def _round_trips(session: aiohttp.ClientSession, urls: Sequence[str]) -> int:
    total = 0
    for url in urls:
        async with session.get(f"{url}/cluster/status") as resp:
            shared = (await resp.json()).get("shared", {})
        trips = shared.get("round_trips") if isinstance(shared, dict) else None
        total += trips if isinstance(trips, int) else 0
    return total


async def _shares_state(session: aiohttp.ClientSession, url: str) -> bool:
    async with session.get(f"{url}/cluster/status") as resp:
        status = await resp.json()
    shared = status.get("shared") if isinstance(status, dict) else None
    return isinstance(shared, dict) and shared.get("mode") == "shared"


async def run_once(
    work: Workload, replicas: int, redis: RedisServer | None, tmp: Path, *, force: bool
) -> Result:
    label = "baseline (1 process, no Redis)" if redis is None else f"{replicas} replica(s)"
    result = Result(label)
    async with AsyncExitStack() as stack, aiohttp.ClientSession() as session:
        flags = ["--per-image-s", str(work.per_image_s), "--overhead-s", str(work.overhead_s)]
        nodes = [NodeProcess(f"n{i}", free_port(), *flags) for i in range(work.nodes)]
        for node in nodes:
            stack.push_async_callback(node.stop)
            await node.start()
        url = redis.url if redis is not None else None
        config = replica_config(tmp / f"{replicas}-{work.clients}.toml", nodes, url)
        processes = [ReplicaProcess(config, f"bench-{i}") for i in range(replicas)]
        for process in processes:
            stack.push_async_callback(process.stop)
            await process.start()
        urls = [process.url for process in processes]
        sharing = redis is None or replicas == 1 or await _shares_state(session, urls[0])
        if not sharing and not force:
            result.skipped = "the replicas do not share state (see their /cluster/status); --force"
            return result
        client = Redis.from_url(redis.url, decode_responses=True) if redis is not None else None
        if client is not None:
            stack.push_async_callback(client.aclose)
        warm = Workload(**{**work.__dict__, "requests_per_client": 1})
        await asyncio.gather(*(_client(session, u, warm, 999, Result("")) for u in urls))
        before, trips_before = await _redis_commands(client), await _round_trips(session, urls)
        started = time.perf_counter()
        async with asyncio.TaskGroup() as group:
            for index in range(work.clients):
                group.create_task(_client(session, urls[index % len(urls)], work, index, result))
        result.seconds = time.perf_counter() - started
        result.redis_commands = await _redis_commands(client) - before
        result.round_trips = await _round_trips(session, urls) - trips_before
        stats = [await fake_stats(session, node.url) for node in nodes]
        result.max_jobs_on_a_node = max(s["max_concurrent_jobs"] for s in stats)
    return result


async def compare(
    work: Workload, replica_counts: Sequence[int], redis: RedisServer, tmp: Path, *, force: bool
) -> None:
    """The baseline, then each replica count, one after the other; then the table."""
    results = [await run_once(work, 1, None, tmp, force=force)]
    for replicas in replica_counts:
        results.append(await run_once(work, replicas, redis, tmp, force=force))  # noqa: PERF401 (one after the other, on purpose)
    report(work, results)


def _waited(store: SharedStore, count: int) -> bool:
    return store.leases.waited >= count


async def measure_leases(redis: RedisServer, rounds: int = 300) -> None:
    """What a node turn costs: uncontended acquire and release, and a handover between two
    replicas (release on one -> the waiter on the other holds the lease)."""
    cluster = ClusterSettings.model_validate({"redis_url": redis.url, "redis_prefix": "bench"})
    stores = []
    for name in ("a", "b"):
        store = open_store(cluster.model_copy(update={"replica_id": name}), SchedulerSettings())
        await store.start(wait_s=5)
        stores.append(store)
    a, b = stores
    acquire, release, handover = [], [], []
    try:
        for _ in range(rounds):
            started = time.perf_counter()
            lease = await a.leases.acquire("gpu-a")
            acquire.append(time.perf_counter() - started)
            assert lease is not None
            started = time.perf_counter()
            await a.leases.release(lease)
            release.append(time.perf_counter() - started)
        for _ in range(rounds // 3):
            held = await a.leases.acquire("gpu-a")
            assert held is not None
            in_line = b.leases.waited + 1
            waiting = asyncio.create_task(b.leases.acquire("gpu-a"))
            await wait_until(functools.partial(_waited, b, in_line), what="b to wait in line")
            started = time.perf_counter()
            await a.leases.release(held)
            got = await waiting
            handover.append(time.perf_counter() - started)
            assert got is not None
            await b.leases.release(got)
    finally:
        for store in stores:
            await store.aclose()

    def ms(values: list[float], q: float) -> float:
        return sorted(values)[round(q * (len(values) - 1))] * 1000

    print("\nnode turns (loopback Redis, this machine):")
    for name, values in (("acquire", acquire), ("release", release), ("handover", handover)):
        print(f"  {name:9} p50 {ms(values, 0.5):6.2f} ms   p95 {ms(values, 0.95):6.2f} ms")


def report(work: Workload, results: Sequence[Result]) -> None:
    capacity = work.node_rate() * work.nodes
    base = results[0]
    print(f"\n{work.clients} clients x {work.requests_per_client} requests of {work.batch} "
          f"images at {work.size}x{work.size}; {work.nodes} nodes, {capacity:.2f} images/s "
          f"flat out")  # fmt: skip
    head = f"{'':32} {'img/s':>7} {'of nodes':>8} {'vs base':>7} {'p50 s':>7} {'p95 s':>7}"
    print(head + f" {'+p50 ms':>8} {'trips/req':>9} {'cmds/req':>8} {'max jobs':>8} {'errors':>6}")
    requests = work.clients * work.requests_per_client
    for result in results:
        if result.skipped:
            print(f"{result.label:32} skipped: {result.skipped}")
            continue
        added_ms = (result.percentile(0.5) - base.percentile(0.5)) * 1000
        print(
            f"{result.label:32} {result.throughput:7.2f} {result.throughput / capacity:8.2f} "
            f"{result.throughput / base.throughput:7.2f} {result.percentile(0.5):7.3f} "
            f"{result.percentile(0.95):7.3f} {added_ms:8.1f} "
            f"{result.round_trips / requests:9.1f} {result.redis_commands / requests:8.1f} "
            f"{result.max_jobs_on_a_node:8d} "
            f"{result.errors:6d}"
        )


async def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", default="1,2,3", help="replica counts, e.g. 1,2,3")
    parser.add_argument("--clients", default="16,32", help="client counts, e.g. 16,32")
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--per-image-s", type=float, default=0.4, help="at 20 steps, 512x512")
    parser.add_argument("--overhead-s", type=float, default=0.05)
    parser.add_argument("--size", type=int, default=512, help="width = height")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--requests-per-client", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="8 clients, 2 requests each")
    parser.add_argument("--force", action="store_true", help="run replicas that do not share")
    args = parser.parse_args(argv)
    binary = find_redis_server()
    if binary is None:
        print("redis-server not found: install the Debian package redis-server")
        return 2
    replica_counts = [int(part) for part in args.replicas.split(",")]
    client_counts = [8] if args.quick else [int(part) for part in args.clients.split(",")]
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        redis = RedisServer(binary, tmp / "redis")
        await redis.start()
        try:
            await measure_leases(redis)
            # The added latency itself: one client on an idle cluster, short one-image
            # requests, so the p50 difference is what sdproxy adds, not queueing.
            requests = 10 if args.quick else 30
            idle = Workload(args.nodes, 0.05, args.overhead_s, args.size, 1, 1, requests)
            await compare(idle, replica_counts, redis, tmp, force=args.force)
            for clients in client_counts:
                per_client = 2 if args.quick else args.requests_per_client
                work = Workload(args.nodes, args.per_image_s, args.overhead_s, args.size,
                                args.batch, clients, per_client)  # fmt: skip
                await compare(work, replica_counts, redis, tmp, force=args.force)
        finally:
            await redis.stop()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
