"""Sustained load: many clients, each sending its next request as soon as its answer arrives.

Three fake nodes at 0.10 / 0.20 / 0.40 s per 512x512 image and 0.3 s overhead, returning
realistically sized PNGs (about 400 KB at 512x512, 1.6 MB at 1024x1024). 8 and 32 clients send
txt2img batch-4 requests at 512x512 and at 1024x1024 in a closed loop, through sdproxy (warm:
a stored benchmark of the nodes) and through least-connections and round-robin of whole
requests sent straight to the nodes; each method on fresh nodes.

Clients run for a warm-up of 1.25 rounds (a round: every client's request once, at the limit's
pace) and then a measured window of 0.6 rounds (at least 8 s at 512x512, 20 s at 1024x1024).
Throughput is the images of the requests finished within the window, from the first such
finish to the last;
latency percentiles are of those requests; node requests per client request count the fake
nodes' finished generations over the same window. The physical limit for whole requests is
measured in the same run: each node is sent three whole requests at once (after a warm-up; all
nodes at the same time), its rate is taken between its first and last answer (the node never
idles), and the limit is the sum of the nodes' images per second.

Targets: sdproxy's throughput >= 0.97 of the limit, its p50 latency no worse than
least-connections'.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from harness import (
    TIMEOUT,
    FakeCluster,
    Spec,
    WholeRequests,
    fake_cluster,
    measure_nodes,
    post,
    sdproxy,
    store_for,
    txt2img,
)

from sdproxy.cluster.benchmark import BenchmarkResult
from sdproxy.config import BenchmarkSettings

PER_IMAGE_512 = (0.1, 0.2, 0.4)
OVERHEAD_S = 0.3
BATCH = 4
BENCH = BenchmarkSettings(steps=20, width=512, height=512, warmup_runs=1, timed_runs=2)
MIN_WINDOW_S = {512: 8.0, 1024: 20.0}
METHODS = ("sdproxy", "least-conn", "round-robin")


def specs(size: int) -> list[Spec]:
    scale = (size / 512) ** 2
    return [
        Spec(f"n{i}", p * scale, OVERHEAD_S, p, realistic=True) for i, p in enumerate(PER_IMAGE_512)
    ]


@dataclass
class Load:
    method: str
    images_per_s: float
    p50_s: float
    p95_s: float
    mean_s: float  # in a closed loop clients / throughput: the same for every fair method
    node_requests: float  # node requests per client request
    requests: int  # client requests finished in the window


Send = Callable[[dict[str, Any]], Awaitable[Any]]


async def closed_loop(
    send: Send, cluster: FakeCluster, clients: int, size: int, warm_s: float, window_s: float
) -> tuple[float, list[float], float, int]:
    """(images/s, latencies, node requests per request, requests) over the measured window."""
    started = time.perf_counter()
    window_from, window_to = started + warm_s, started + warm_s + window_s
    done: list[tuple[float, float]] = []
    generations: list[int] = []

    async def client(k: int) -> None:
        for i in itertools.count():
            sent = time.perf_counter()
            await send(txt2img(size, BATCH, 1_000_000 * (k + 1) + BATCH * i))
            done.append((sent, time.perf_counter()))

    async def mark() -> None:
        await asyncio.sleep(warm_s)
        generations.append(cluster.generations())

    tasks = [asyncio.create_task(client(k)) for k in range(clients)]
    marker = asyncio.create_task(mark())
    await asyncio.sleep(warm_s + window_s)
    generations.append(cluster.generations())
    for task in tasks:
        task.cancel()
    results = await asyncio.gather(*tasks, marker, return_exceptions=True)  # cancelled on purpose
    failures = [r for r in results if isinstance(r, Exception)]
    if failures:
        raise failures[0]
    window = sorted((f, f - s) for s, f in done if window_from <= f <= window_to)
    if len(window) < 2:
        raise RuntimeError(f"only {len(window)} requests finished in the window")
    rate = BATCH * (len(window) - 1) / (window[-1][0] - window[0][0])
    node_requests = (generations[1] - generations[0]) / len(window)
    return rate, [latency for _, latency in window], node_requests, len(window)


async def measure_limit(size: int) -> float:
    """Images per second of whole requests with every node busy, each on its own queue."""
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session, fake_cluster(specs(size)) as cl:

        async def one(url: str) -> float:
            await post(session, url, txt2img(size, BATCH, 1))
            finished: list[float] = []

            async def queued(seed: int) -> None:
                await post(session, url, txt2img(size, BATCH, seed))
                finished.append(time.perf_counter())

            async with asyncio.TaskGroup() as group:  # three queued: the node never idles
                for seed in (5, 6, 7):
                    group.create_task(queued(seed))
            return BATCH * (len(finished) - 1) / (max(finished) - min(finished))

        async with asyncio.TaskGroup() as group:
            rates = [group.create_task(one(url)) for url in cl.urls.values()]
    return sum(task.result() for task in rates)


async def run_method(
    method: str,
    size: int,
    clients: int,
    bench: dict[str, BenchmarkResult],
    state: Path,
    limit: float,
) -> Load:
    # A round: every client's request once, at the limit's pace.
    round_s = clients * BATCH / limit
    warm_s, window_s = 1.25 * round_s, max(MIN_WINDOW_S[size], 0.6 * round_s)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session, fake_cluster(specs(size)) as cl:
        if method == "sdproxy":
            store_for(state, bench, cl)
            settings = {**BENCH.model_dump(), "on_start": False, "state_file": str(state)}
            async with sdproxy(cl, settings) as url:

                async def send(body: dict[str, Any]) -> Any:
                    return await post(session, url, body)

                outcome = await closed_loop(send, cl, clients, size, warm_s, window_s)
        else:
            whole = WholeRequests(session, list(cl.urls.values()), method)  # type: ignore[arg-type]
            outcome = await closed_loop(whole.post, cl, clients, size, warm_s, window_s)
    rate, latencies, node_requests, count = outcome
    cuts = statistics.quantiles(latencies, n=20) if len(latencies) >= 2 else latencies * 19
    median, mean = statistics.median(latencies), statistics.fmean(latencies)
    return Load(method, rate, median, cuts[18], mean, node_requests, count)


async def run(only: str | None, state_dir: Path) -> list[tuple[str, bool]]:
    """Run and print every sustained-load row; return (scenario, targets met) pairs."""
    verdicts: list[tuple[str, bool]] = []
    if only is not None and only not in "sustained":
        return verdicts
    print("\nsustained load (closed loop, batch 4, realistic images)", flush=True)
    print(
        f"{'size':>5} {'clients':>7} {'method':<12} {'img/s':>6} {'vs limit':>8} "
        f"{'p50 s':>6} {'p95 s':>6} {'mean s':>6} {'node req/req':>12} {'requests':>8}",
        flush=True,
    )
    async with fake_cluster(specs(512)) as cluster:
        bench = await measure_nodes(cluster.node_list(), BENCH)
    for size in (512, 1024):
        limit = await measure_limit(size)
        print(f"{size:>5} physical limit for whole requests: {limit:.2f} img/s", flush=True)
        for clients in (8, 32):
            rows = {}
            for method in METHODS:
                state = state_dir / f"sustained-{size}-{clients}.json"
                rows[method] = row = await run_method(method, size, clients, bench, state, limit)
                print(
                    f"{size:>5} {clients:>7} {method:<12} {row.images_per_s:>6.2f} "
                    f"{row.images_per_s / limit:>8.2f} {row.p50_s:>6.2f} {row.p95_s:>6.2f} "
                    f"{row.mean_s:>6.2f} "
                    f"{row.node_requests:>12.2f} {row.requests:>8}",
                    flush=True,
                )
            ours, least = rows["sdproxy"], rows["least-conn"]
            met = ours.images_per_s >= 0.97 * limit and ours.p50_s <= least.p50_s * 1.02
            verdicts.append((f"sustained {size}x{size}, {clients} clients", met))
    return verdicts
