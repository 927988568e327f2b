"""Shared by the benchmark scenarios: fake-node clusters, sdproxy in front, whole-request baselines.

Everything runs in this process on loopback: fake webui nodes (restartable on their port at
another speed), sdproxy started as ``serve`` starts it, and the proxy-less baselines that send
each client request whole, straight to one node: least-connections (the node with the fewest
requests in flight, ties in turn, as nginx's ``least_conn``) and round-robin.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import aiohttp
from aiohttp import web

from sdproxy.cluster.benchmark import BenchmarkResult, benchmark_node, save_state
from sdproxy.config import BenchmarkSettings, NodeSettings, SchedulerSettings, Settings
from sdproxy.fakewebui import FakeNode, FakeNodeSettings, create_fake_app
from sdproxy.nodes.client import NodeClient
from sdproxy.server.site import start_proxy, start_site

TIMEOUT = aiohttp.ClientTimeout(total=900)


@dataclass(frozen=True)
class Spec:
    """One simulated node: its true speed, for the request size the scenario sends."""

    name: str
    per_image_s: float  # true seconds per image of the scenario's requests
    overhead_s: float  # true seconds per request
    fake_per_image_s: float  # what the fake node is told (seconds per 512x512 image)
    realistic: bool = False


class FakeCluster:
    """Fake webui nodes on fixed loopback ports; one can be restarted at another speed."""

    def __init__(self, specs: Sequence[Spec]) -> None:
        self.specs = {spec.name: spec for spec in specs}
        self.nodes: dict[str, FakeNode] = {}
        self.ports: dict[str, int] = {}
        self._runners: dict[str, web.AppRunner] = {}

    @property
    def urls(self) -> dict[str, str]:
        return {name: f"http://127.0.0.1:{port}" for name, port in self.ports.items()}

    def node_list(self) -> list[dict[str, str]]:
        return [{"name": name, "url": url} for name, url in self.urls.items()]

    async def start(self) -> None:
        for name in self.specs:
            await self._start(name)

    async def _start(self, name: str) -> None:
        spec = self.specs[name]
        fake = FakeNode(
            FakeNodeSettings(
                name=name,
                per_image_s=spec.fake_per_image_s,
                overhead_s=spec.overhead_s,
                realistic_images=spec.realistic,
            )
        )
        runner = await start_site(
            create_fake_app(fake), "127.0.0.1", self.ports.get(name, 0), shutdown_timeout_s=1.0
        )
        self.ports[name] = runner.addresses[0][1]
        self.nodes[name], self._runners[name] = fake, runner

    async def restart(self, name: str, per_image_s: float, fake_per_image_s: float) -> None:
        """Stop a node and start it again on its port at another speed (a restarted webui)."""
        await self._runners.pop(name).cleanup()
        self.specs[name] = replace(
            self.specs[name], per_image_s=per_image_s, fake_per_image_s=fake_per_image_s
        )
        await self._start(name)

    def generations(self) -> int:
        return sum(node.generations for node in self.nodes.values())

    async def aclose(self) -> None:
        for runner in self._runners.values():
            await runner.cleanup()
        self._runners.clear()


@asynccontextmanager
async def fake_cluster(specs: Sequence[Spec]) -> AsyncIterator[FakeCluster]:
    cluster = FakeCluster(specs)
    try:
        await cluster.start()
        yield cluster
    finally:
        await cluster.aclose()


@asynccontextmanager
async def sdproxy(
    cluster: FakeCluster, benchmark: dict[str, Any], **sections: Any
) -> AsyncIterator[str]:
    """sdproxy in front of ``cluster`` (as ``serve`` runs it); yields its base URL."""
    settings = Settings.model_validate(
        {
            "server": {"port": 0, "shutdown_grace_s": 1},
            "benchmark": benchmark,
            "nodes": cluster.node_list(),
            **sections,
        }
    )
    runner = await start_proxy(settings, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def txt2img(size: int, images: int, seed: int) -> dict[str, Any]:
    return {
        "prompt": "a lighthouse at dusk",
        "steps": 20,
        "width": size,
        "height": size,
        "batch_size": images,
        "n_iter": 1,
        "seed": seed,
    }


async def post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> dict[str, str]:
    """POST txt2img and check every image came back; returns the response headers."""
    async with session.post(f"{url}/sdapi/v1/txt2img", json=body) as resp:
        answer = await resp.json()
        if resp.status != 200 or len(answer["images"]) < body["batch_size"]:
            raise RuntimeError(f"{url}: {resp.status} {str(answer)[:200]}")
        return dict(resp.headers)


Rule = Literal["least-conn", "round-robin"]


class WholeRequests:
    """Sends each request whole to one node, as a speed-blind load balancer would."""

    def __init__(self, session: aiohttp.ClientSession, urls: Sequence[str], rule: Rule) -> None:
        self.session, self.urls, self.rule = session, list(urls), rule
        self.in_flight = [0] * len(self.urls)
        self._turn = 0

    def _pick(self) -> int:
        count = len(self.urls)
        order = [(self._turn + k) % count for k in range(count)]
        if self.rule == "least-conn":  # the fewest in flight; ties in turn (nginx least_conn)
            fewest = min(self.in_flight)
            order = [i for i in order if self.in_flight[i] == fewest]
        chosen = order[0]
        self._turn = (chosen + 1) % count
        return chosen

    async def post(self, body: dict[str, Any]) -> dict[str, str]:
        index = self._pick()
        self.in_flight[index] += 1
        try:
            return await post(self.session, self.urls[index], body)
        finally:
            self.in_flight[index] -= 1


async def timed(coro: Any) -> float:
    started = time.perf_counter()
    await coro
    return time.perf_counter() - started


async def wait_for(check: Any, timeout_s: float = 60.0, interval_s: float = 0.1) -> None:
    """Poll an async predicate until it holds (benchmarks wait for sdproxy's state)."""
    deadline = time.perf_counter() + timeout_s
    while not await check():
        if time.perf_counter() > deadline:
            raise TimeoutError("the benchmark waited too long for sdproxy")
        await asyncio.sleep(interval_s)


async def cluster_status(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(f"{url}/cluster/status") as resp:
        status: dict[str, Any] = await resp.json()
        return status


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def state_path(folder: Path, name: str) -> Path:
    return folder / f"{name.replace(' ', '-')}.json"


async def measure_nodes(
    node_list: list[dict[str, str]], bench: BenchmarkSettings
) -> dict[str, BenchmarkResult]:
    """Benchmark every node as ``sdproxy benchmark`` does (all nodes at once)."""
    results: dict[str, BenchmarkResult] = {}
    scheduler = SchedulerSettings()
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:

        async def one(node: NodeSettings) -> None:
            client = NodeClient(session, node, scheduler)
            results[node.name] = await benchmark_node(client, bench, 600.0)

        async with asyncio.TaskGroup() as group:
            for entry in node_list:
                group.create_task(one(NodeSettings.model_validate(entry)))
    return results


def store_for(path: Path, results: dict[str, BenchmarkResult], cluster: FakeCluster) -> None:
    """Store benchmark results for ``cluster``'s nodes (their URLs may have changed)."""
    urls = cluster.urls
    save_state(path, {name: replace(r, url=urls[name]) for name, r in results.items()})
