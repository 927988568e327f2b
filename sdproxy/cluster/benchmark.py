"""Benchmarks: time each node on a standard payload, fit its speed line, keep the results.

A node is timed at two batch sizes; the median of each size's timed runs gives two points, and
the line through them the node's fixed overhead per request (intercept) and its seconds per
image (slope). Warm-up runs come first and are not timed, so loading the checkpoint or warming
caches does not count. Results go to a JSON state file with when they were measured and on which
checkpoint; ``serve`` reuses them across restarts and benchmarks, in the background, only the
nodes without one (they are planned by weight meanwhile).

While serving, each run is background work on the node's lane: it runs only while no client job
waits for the node, the run in progress counts in the node's backlog, and every timed run teaches
the node's speed model as soon as it ends.
"""

from __future__ import annotations

import asyncio
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import orjson

from sdproxy.cluster.clock import Clock
from sdproxy.cluster.lanes import Background, Lane
from sdproxy.cluster.state import ClusterState
from sdproxy.config import BenchmarkSettings
from sdproxy.core.speed import SpeedEstimate, fit_benchmark, image_work
from sdproxy.errors import NodeError
from sdproxy.logs import log_crash
from sdproxy.nodes.client import NodeClient

log = logging.getLogger(__name__)

STATE_VERSION = 1
PREEMPT_TIMEOUT_S = 10.0  # asking a node to stop a benchmark run for a client job

Progress = Callable[[str, str], None]  # (node, what is happening)


@dataclass(frozen=True)
class BenchmarkResult:
    """One node's benchmark: what was run, what it took, and the line fitted to it."""

    node: str
    url: str
    measured_at: float  # Unix time
    checkpoint: str | None
    steps: int
    width: int
    height: int
    runs: tuple[tuple[int, float], ...]  # (batch size, seconds) of every timed run
    overhead_s: float
    per_image_s: float  # seconds per image of 20 steps at 512x512, beyond the overhead

    @property
    def work_per_image(self) -> float:
        return image_work(steps=self.steps, width=self.width, height=self.height)

    def estimate(self) -> SpeedEstimate:
        return SpeedEstimate(self.overhead_s, self.per_image_s, len(self.runs), "benchmark")

    def works(self) -> tuple[float, float]:
        """The work of the smallest and largest batch timed, for the model's prior."""
        sizes = [size for size, _ in self.runs] or [1]
        return min(sizes) * self.work_per_image, max(max(sizes), 2) * self.work_per_image

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["runs"] = [list(run) for run in self.runs]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BenchmarkResult:
        fields = dict(data)
        fields["runs"] = tuple((int(size), float(seconds)) for size, seconds in data["runs"])
        return cls(**fields)


def fit_runs(runs: Iterable[tuple[int, float]], work_per_image: float) -> SpeedEstimate:
    """The line through each batch size's median time, in seconds per unit of work."""
    by_size: dict[int, list[float]] = {}
    for size, seconds in runs:
        by_size.setdefault(size, []).append(seconds)
    points = [(size * work_per_image, statistics.median(t)) for size, t in by_size.items()]
    return fit_benchmark(points)


def load_state(path: Path) -> dict[str, BenchmarkResult]:
    """Stored results by node name; an unreadable or foreign file counts as none stored."""
    try:
        data = orjson.loads(path.read_bytes())
        version = data.get("version")
        results = {
            name: BenchmarkResult.from_json(entry) for name, entry in data["benchmarks"].items()
        }
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("ignoring benchmark state file %s: %s", path, exc)
        return {}
    if version != STATE_VERSION:
        log.warning("ignoring benchmark state file %s: version %r", path, version)
        return {}
    return results


def save_state(path: Path, results: dict[str, BenchmarkResult]) -> None:
    """Write every result to ``path`` atomically (a crash leaves the old file or the new one)."""
    data = {
        "version": STATE_VERSION,
        "benchmarks": {name: result.to_json() for name, result in sorted(results.items())},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(orjson.dumps(data, option=orjson.OPT_INDENT_2))
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def payload(settings: BenchmarkSettings, batch_size: int) -> dict[str, Any]:
    """The standard txt2img body for one benchmark run."""
    return {
        "prompt": settings.prompt,
        "negative_prompt": "",
        "steps": settings.steps,
        "width": settings.width,
        "height": settings.height,
        "batch_size": batch_size,
        "n_iter": 1,
        "seed": 1,
        "save_images": False,
        "send_images": True,  # what a real request transfers counts too
    }


RunOne = Callable[[int, bool], Awaitable[float]]  # (batch size, timed) -> seconds it took


def direct_runs(client: NodeClient, settings: BenchmarkSettings, timeout_s: float) -> RunOne:
    """Runs sent straight to the node and timed here (the ``sdproxy benchmark`` command)."""

    async def run_one(size: int, _timed: bool) -> float:
        started = time.perf_counter()
        await client.generate("txt2img", payload(settings, size), timeout_s)
        return time.perf_counter() - started

    return run_one


async def benchmark_node(
    client: NodeClient,
    settings: BenchmarkSettings,
    timeout_s: float,
    *,
    run_one: RunOne | None = None,
    progress: Progress | None = None,
) -> BenchmarkResult:
    """Time ``client`` on the standard payload; raises NodeError if a run fails.

    ``run_one`` runs and times one batch (default: straight to the node); a serving sdproxy
    runs them through the node's lane instead (Benchmarker).
    """
    say = progress or (lambda _node, _what: None)
    run_one = run_one or direct_runs(client, settings, timeout_s)
    options = await client.request("GET", "sdapi/v1/options", timeout_s=timeout_s)
    checkpoint = options.get("sd_model_checkpoint") if isinstance(options, dict) else None
    small, large = settings.batch_sizes
    total = settings.warmup_runs + 2 * settings.timed_runs
    runs: list[tuple[int, float]] = []
    plan = [(small, False)] * settings.warmup_runs + [
        (size, True) for size in (small, large) for _ in range(settings.timed_runs)
    ]
    for number, (size, timed) in enumerate(plan, start=1):
        label = "timed" if timed else "warm-up"
        say(client.name, f"run {number}/{total}: {label}, batch {size}")
        seconds = await run_one(size, timed)
        if timed:
            runs.append((size, seconds))
        say(client.name, f"run {number}/{total}: {label}, batch {size}: {seconds:.2f} s")
    work = image_work(steps=settings.steps, width=settings.width, height=settings.height)
    estimate = fit_runs(runs, work)
    return BenchmarkResult(
        node=client.name,
        url=client.settings.base_url,
        measured_at=time.time(),
        checkpoint=checkpoint if isinstance(checkpoint, str) else None,
        steps=settings.steps,
        width=settings.width,
        height=settings.height,
        runs=tuple(runs),
        overhead_s=estimate.overhead_s,
        per_image_s=estimate.per_unit_s,
    )


class BenchmarkHost(Protocol):
    """What the background benchmark needs from the cluster."""

    @property
    def clients(self) -> Mapping[str, NodeClient]: ...

    @property
    def lanes(self) -> Mapping[str, Lane]: ...

    @property
    def state(self) -> ClusterState: ...

    @property
    def clock(self) -> Clock: ...


class Benchmarker:
    """Benchmarks the cluster's nodes in the background while it serves, and keeps results."""

    def __init__(self, host: BenchmarkHost, settings: BenchmarkSettings, timeout_s: float) -> None:
        self.host = host
        self.settings = settings
        self.results: dict[str, BenchmarkResult] = {}
        self.errors: dict[str, str] = {}
        self.running: set[str] = set()
        self._timeout_s = timeout_s
        self._tasks: set[asyncio.Task[None]] = set()
        self._store_lock = asyncio.Lock()  # one read-modify-write of the state file at a time
        host.state.on_benchmark(self._heard)

    async def load(self) -> list[str]:
        """Apply stored results to the nodes; return the nodes that have none."""
        path = self.settings.state_file
        stored = await asyncio.to_thread(load_state, path) if path is not None else {}
        missing = []
        for name, client in self.host.clients.items():
            result = stored.get(name)
            if result is None or result.url != client.settings.base_url:
                result = self._from_replica(name, await self.host.state.shared_benchmark(name))
            if result is not None:
                self._apply(result)
            else:
                missing.append(name)
        return missing

    def _from_replica(self, node: str, data: dict[str, Any] | None) -> BenchmarkResult | None:
        """A result another replica shared (without the node's URL), or None if not one."""
        client = self.host.clients.get(node)
        if data is None or client is None:
            return None
        try:
            result = BenchmarkResult.from_json({**data, "url": client.settings.base_url})
        except (TypeError, ValueError, KeyError):
            return None
        numbers = (result.measured_at, result.overhead_s, result.per_image_s)
        sizes = (result.steps, result.width, result.height)
        valid = all(isinstance(n, int | float) for n in numbers) and result.node == node
        return result if valid and all(isinstance(n, int) and n > 0 for n in sizes) else None

    def _heard(self, node: str, data: dict[str, Any]) -> None:
        result = self._from_replica(node, data)
        if result is not None:
            log.info("node %s: benchmarked by another replica", node)
            self._apply(result)

    def start(self, names: Iterable[str]) -> list[str]:
        """Benchmark ``names`` in the background (those not already running); return them."""
        names = [name for name in names if name not in self.running]
        if names:
            self.running.update(names)
            task = asyncio.create_task(self._run(names), name="benchmark")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            task.add_done_callback(log_crash)
        return names

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)  # all cancelled on purpose

    async def _run(self, names: list[str]) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                for name in names:
                    group.create_task(self._run_one(name))
        finally:
            self.running.difference_update(names)

    async def _run_one(self, name: str) -> None:
        try:
            if not await self.host.state.claim_benchmark(name):
                log.info("node %s is being benchmarked by another replica", name)
                return
            try:
                await self._measure(name)
            finally:  # else the claim would bar every replica until it expires (30 min)
                self.host.state.release_benchmark(name)
        except Exception:  # a background task: a bug is logged, the other nodes go on
            log.exception("benchmark of node %s crashed", name)
            self.errors[name] = "internal error in sdproxy"
        finally:
            self.running.discard(name)  # only now: the result is applied and stored

    def _lane_runs(self, name: str) -> RunOne:
        """Runs queued as background work on the node's lane, timed on the cluster's clock."""
        host, settings = self.host, self.settings
        work_per_run = image_work(
            steps=settings.steps, width=settings.width, height=settings.height
        )

        async def run_one(size: int, timed: bool) -> float:
            done: asyncio.Future[float] = asyncio.get_running_loop().create_future()
            client, lane = host.clients[name], host.lanes[name]
            preempted = False

            async def run() -> None:
                nonlocal preempted
                preempted = False
                started = host.clock.now()
                try:
                    await client.generate("txt2img", payload(settings, size), self._timeout_s)
                except NodeError as exc:
                    if not done.done():  # the benchmark may have been stopped meanwhile
                        done.set_exception(exc)
                    return
                if preempted:  # stopped for a client job: its time says nothing; run it again
                    lane.submit_background(work, first=True)
                    return
                seconds = host.clock.now() - started
                # The model learns from every run at once, warm-ups too: a warm-up slowed by a
                # checkpoint load is replaced by the next run (core/speed.py change detection).
                host.state.observe(name, size * work_per_run, seconds, "benchmark")
                if not done.done():
                    done.set_result(seconds)

            async def preempt() -> None:
                nonlocal preempted
                preempted = True
                await client.request("POST", "sdapi/v1/interrupt", timeout_s=PREEMPT_TIMEOUT_S)

            work = Background(size * work_per_run, run, preempt=preempt)
            lane.submit_background(work)
            return await done

        return run_one

    async def _measure(self, name: str) -> None:
        client = self.host.clients[name]
        try:
            result = await benchmark_node(
                client,
                self.settings,
                self._timeout_s,
                run_one=self._lane_runs(name),
                progress=_log_progress,
            )
        except NodeError as exc:
            log.warning("benchmark of node %s failed: %s", name, exc.reason)
            self.errors[name] = exc.reason
            return
        self.errors.pop(name, None)
        self.results[name] = result  # its timed runs taught the model as each ended
        self.host.state.share_benchmark(name, result.to_json())
        log.info(
            "node %s: %.2f s overhead, %.3f s per image (20 steps, 512x512)",
            name,
            result.overhead_s,
            result.per_image_s,
        )
        path = self.settings.state_file
        if path is not None:
            try:
                async with self._store_lock:
                    await asyncio.to_thread(_store, path, result)
            except OSError as exc:  # a read-only config folder, a full disk: keep serving
                log.warning("cannot store the benchmark of %s in %s: %s", name, path, exc)

    def _apply(self, result: BenchmarkResult) -> None:
        self.results[result.node] = result
        self.host.state.set_benchmark(result.node, result.estimate(), result.works())


def _store(path: Path, result: BenchmarkResult) -> None:
    """Merge one result into the state file, keeping the other nodes' results."""
    results = load_state(path)
    results[result.node] = result
    save_state(path, results)


def _log_progress(node: str, what: str) -> None:
    log.debug("benchmark %s: %s", node, what)
