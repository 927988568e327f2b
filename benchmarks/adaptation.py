"""Cold start and speed changes: how soon sdproxy plans well from nothing, and after a change.

The cluster is the issue's: three nodes at 0.10 / 0.20 / 0.40 s per image and 0.3 s overhead
each (64x64 requests, the simulation's scale, as in makespan.py).

- cold start: no weights, no state file, the start-up benchmark on (at the simulation's image
  size, its default run counts): one warm-up txt2img of batch 6 right after start, then a timed
  batch 28. Against the fluid bound, the fastest node alone, and least-connections and
  round-robin of whole requests (from fresh nodes: the same warm-up, then the timed request).
  Target: >= 0.90 of the fluid bound and never slower than the fastest node. A second row with
  1.0 s overheads shows what a wrong nominal overhead (0.3 s) costs.
- speed change: sdproxy warm (a stored benchmark); two batch-28 requests, then node n0 is
  restarted at 0.40 s per image, four requests, then restarted at 0.10 again, four requests.
  Each request's efficiency against the fluid bound of the speeds at the time. Target: >= 0.90
  from the second request after each change. Baselines: one whole request per phase through
  least-connections and round-robin (on fresh nodes restarted the same way).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from bounds import fluid_bound_s
from harness import (
    TIMEOUT,
    FakeCluster,
    Spec,
    WholeRequests,
    cluster_status,
    fake_cluster,
    measure_nodes,
    median,
    post,
    sdproxy,
    store_for,
    timed,
    txt2img,
    wait_for,
)

from sdproxy.config import BenchmarkSettings

SIZE = 64  # request images of 64x64: a fake node's per-image time applies / 64
SCALE = 512 * 512 / (SIZE * SIZE)
BENCH = {"steps": 20, "width": SIZE, "height": SIZE}  # the start-up benchmark at this scale


def issue_nodes(
    overhead_s: float = 0.3, per_image: Sequence[float] = (0.1, 0.2, 0.4)
) -> list[Spec]:
    return [Spec(f"n{i}", p, overhead_s, p * SCALE) for i, p in enumerate(per_image)]


@dataclass
class ColdStart:
    name: str
    ideal_s: float
    sdproxy_s: float
    baselines: dict[str, float]
    shares: str
    benchmarking: int  # nodes still benchmarking when the timed request was sent

    @property
    def efficiency(self) -> float:
        return self.ideal_s / self.sdproxy_s

    @property
    def met(self) -> bool:
        return self.efficiency >= 0.90 and self.sdproxy_s <= self.baselines["fastest node"]


async def cold_start(name: str, overhead_s: float, state_dir: Path, run: int) -> ColdStart:
    specs = issue_nodes(overhead_s)
    bench = {**BENCH, "on_start": True, "state_file": str(state_dir / f"cold-{run}.json")}
    async with (
        aiohttp.ClientSession(timeout=TIMEOUT) as session,
        fake_cluster(specs) as cluster,
        sdproxy(cluster, bench) as url,
    ):
        await post(session, url, txt2img(SIZE, 6, 1))
        status = await cluster_status(session, url)
        running = sum(n["benchmark"]["running"] for n in status["nodes"])
        begun = _now()
        headers = await post(session, url, txt2img(SIZE, 28, 100))
        sdproxy_s = _now() - begun
    baselines: dict[str, float] = {}
    for method in ("fastest node", "least-conn", "round-robin"):
        async with (
            aiohttp.ClientSession(timeout=TIMEOUT) as session,
            fake_cluster(specs) as cluster,
        ):
            urls = list(cluster.urls.values())
            if method == "fastest node":
                await post(session, urls[0], txt2img(SIZE, 6, 1))
                baselines[method] = await timed(post(session, urls[0], txt2img(SIZE, 28, 100)))
            else:
                whole = WholeRequests(session, urls, method)  # type: ignore[arg-type]
                await whole.post(txt2img(SIZE, 6, 1))
                baselines[method] = await timed(whole.post(txt2img(SIZE, 28, 100)))
    return ColdStart(
        name,
        fluid_bound_s(specs, 28),
        sdproxy_s,
        baselines,
        headers.get("X-Sdproxy-Shares", ""),
        running,
    )


def _now() -> float:
    return time.perf_counter()


@dataclass
class Phase:
    label: str
    restart: float | None  # n0's new seconds per image, or None
    requests: int
    ideal_s: float = 0.0
    times: list[float] = field(default_factory=list)
    shares: list[str] = field(default_factory=list)
    baselines: dict[str, float] = field(default_factory=dict)

    @property
    def efficiencies(self) -> list[float]:
        return [self.ideal_s / t for t in self.times]

    @property
    def met(self) -> bool:
        return all(e >= 0.90 for e in self.efficiencies[1:])


PHASES = (
    ("before (n0 0.10 s)", None, 2),
    ("n0 restarted at 0.40 s", 0.4, 4),
    ("n0 restarted at 0.10 s", 0.1, 4),
)


async def speed_change(state_dir: Path) -> list[Phase]:
    specs = issue_nodes()
    phases = [Phase(label, restart, requests) for label, restart, requests in PHASES]
    state = state_dir / "speed-change.json"
    bench = BenchmarkSettings(steps=20, width=SIZE, height=SIZE, warmup_runs=1, timed_runs=2)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session, fake_cluster(specs) as cluster:
        results = await measure_nodes(cluster.node_list(), bench)
        store_for(state, results, cluster)
        settings = {**bench.model_dump(), "on_start": False, "state_file": str(state)}
        async with sdproxy(cluster, settings) as url:
            seed = 1000
            for phase in phases:
                if phase.restart is not None:
                    await _restart(cluster, phase.restart)
                    await _until_up(session, url)
                phase.ideal_s = fluid_bound_s(list(cluster.specs.values()), 28)
                for _ in range(phase.requests):
                    begun = _now()
                    headers = await post(session, url, txt2img(SIZE, 28, seed))
                    phase.times.append(_now() - begun)
                    phase.shares.append(headers.get("X-Sdproxy-Shares", ""))
                    seed += 28
    for method in ("least-conn", "round-robin"):
        async with (
            aiohttp.ClientSession(timeout=TIMEOUT) as session,
            fake_cluster(specs) as cluster,
        ):
            whole = WholeRequests(session, list(cluster.urls.values()), method)
            for phase in phases:
                if phase.restart is not None:
                    await _restart(cluster, phase.restart)
                phase.baselines[method] = await timed(whole.post(txt2img(SIZE, 28, 1)))
    return phases


async def _restart(cluster: FakeCluster, per_image_s: float) -> None:
    await cluster.restart("n0", per_image_s, per_image_s * SCALE)


async def _until_up(session: aiohttp.ClientSession, url: str) -> None:
    async def up() -> bool:
        status = await cluster_status(session, url)
        return all(n["healthy"] for n in status["nodes"])

    await wait_for(up)


async def run(only: str | None, repeat: int, state_dir: Path) -> list[tuple[str, bool]]:
    """Run and print both scenarios; return (scenario, target met) pairs."""
    verdicts: list[tuple[str, bool]] = []
    if only is None or only in "cold start":
        print("\ncold start (no weights, no state file, benchmark on): timed batch 28", flush=True)
        print(
            f"{'scenario':<30} {'ideal s':>8} {'sdproxy s':>9} {'efficiency':>10} "
            f"{'fastest x':>9} {'least-conn x':>12} {'round-robin x':>13}  shares; benchmarking",
            flush=True,
        )
        for name, overhead_s in (("0.3 s overhead", 0.3), ("1.0 s overhead", 1.0)):
            runs = [await cold_start(name, overhead_s, state_dir, k) for k in range(repeat)]
            row = sorted(runs, key=lambda r: r.sdproxy_s)[len(runs) // 2]
            _print_cold(row)
            if overhead_s == 0.3:
                verdicts.append((f"cold start {name}", row.met))
    if only is None or only in "speed change":
        print("\nspeed change (n0 restarted at another speed): batch 28 after batch 28", flush=True)
        for phase in await speed_change(state_dir):
            effs = " ".join(f"{e:.2f}" for e in phase.efficiencies)
            after = median(phase.times[1:]) if len(phase.times) > 1 else phase.times[0]
            ratios = " ".join(f"{name} x{t / after:.2f}" for name, t in phase.baselines.items())
            print(
                f"  {phase.label:<24} ideal {phase.ideal_s:.2f} s; efficiency per request {effs};"
                f" {ratios}; shares {phase.shares}",
                flush=True,
            )
            if phase.restart is not None:
                verdicts.append((f"speed change: {phase.label}", phase.met))
    return verdicts


def _print_cold(row: ColdStart) -> None:
    ratios = " ".join(
        f"{row.baselines[name] / row.sdproxy_s:>{width}.2f}"
        for name, width in (("fastest node", 9), ("least-conn", 12), ("round-robin", 13))
    )
    print(
        f"{row.name:<30} {row.ideal_s:>8.2f} {row.sdproxy_s:>9.2f} {row.efficiency:>10.2f} "
        f"{ratios}  {row.shares}; {row.benchmarking} of 3",
        flush=True,
    )
