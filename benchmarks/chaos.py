"""Chaos run: many concurrent requests while fake nodes (subprocesses) are killed and restarted.

Runs the same workload twice against sdproxy in front of N ``sdproxy fake-node`` processes:
first clean, then while a chaos task SIGKILLs a random node at random moments and restarts it a
little later. Every answer of the chaos run is checked against the clean run's answer for the
same request (fixed seeds): the same seeds, in order, and the same pixels. Prints requests
completed, images lost and duplicated (both must be 0), errors by kind, and the time cost of
failover as a ratio to the clean run.

    python benchmarks/chaos.py --requests 60 --max-seconds 120
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import io
import json
import logging
import os
import random
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from PIL import Image

from sdproxy.cli import free_port
from sdproxy.config import Settings
from sdproxy.server.site import start_proxy


@dataclass
class Outcome:
    """One request's result: status, seeds and pixel digests of its images, latency."""

    status: int
    seeds: list[int] = field(default_factory=list)
    digests: list[str] = field(default_factory=list)
    error: str = ""
    seconds: float = 0.0


class NodeProcess:
    """One ``sdproxy fake-node`` subprocess on a fixed port, killable and restartable."""

    def __init__(self, name: str, per_image_s: float) -> None:
        self.name, self.port, self.per_image_s = name, free_port(), per_image_s
        self.process: asyncio.subprocess.Process | None = None
        self.kills = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self, session: aiohttp.ClientSession) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sdproxy", "--log-level", "ERROR", "fake-node",
            "--port", str(self.port), "--name", self.name,
            "--per-image-s", str(self.per_image_s), "--overhead-s", "0.05",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        async with asyncio.timeout(30):
            while True:
                try:
                    async with session.get(f"{self.url}/internal/ping") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)

    async def kill(self) -> None:
        if self.process is not None and self.alive:
            os.kill(self.process.pid, signal.SIGKILL)
            await self.process.wait()
            self.kills += 1

    async def stop(self) -> None:
        if self.process is not None and self.alive:
            self.process.terminate()
            await self.process.wait()


def workload(count: int, rng: random.Random) -> list[dict[str, Any]]:
    """``count`` txt2img bodies with fixed seeds, 1-8 images each, 64 px."""
    return [
        {
            "prompt": f"chaos {i}",
            "seed": 1000 * i,
            "batch_size": rng.randint(1, 4),
            "n_iter": rng.randint(1, 2),
            "width": 64,
            "height": 64,
            "steps": 20,
        }
        for i in range(count)
    ]


def digest(image_b64: str) -> str:
    with Image.open(io.BytesIO(base64.b64decode(image_b64))) as image:
        return hashlib.sha256(image.convert("RGB").tobytes()).hexdigest()


async def send(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Outcome:
    started = time.perf_counter()
    try:
        async with session.post(f"{url}/sdapi/v1/txt2img", json=body) as resp:
            answer = await resp.json(content_type=None)
            status = resp.status
    except aiohttp.ClientError as exc:
        return Outcome(0, error=type(exc).__name__, seconds=time.perf_counter() - started)
    seconds = time.perf_counter() - started
    if status != 200:
        return Outcome(status, error=str(answer.get("error", "?")), seconds=seconds)
    info = json.loads(answer["info"])
    digests = await asyncio.to_thread(lambda: [digest(i) for i in answer["images"]])
    return Outcome(status, info["all_seeds"], digests, seconds=seconds)


async def run_workload(
    url: str, bodies: list[dict[str, Any]], concurrency: int, deadline: float
) -> tuple[dict[int, Outcome], float]:
    """Send every body, ``concurrency`` at a time; those not started by ``deadline`` are skipped."""
    outcomes: dict[int, Outcome] = {}
    queue = list(enumerate(bodies))
    started = time.perf_counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:

        async def worker() -> None:
            while queue and time.perf_counter() < deadline:
                index, body = queue.pop(0)
                outcomes[index] = await send(session, url, body)

        async with asyncio.TaskGroup() as group:
            for _ in range(concurrency):
                group.create_task(worker())
    return outcomes, time.perf_counter() - started


async def chaos(
    nodes: list[NodeProcess],
    session: aiohttp.ClientSession,
    rng: random.Random,
    kill_every_s: float,
    down_s: float,
) -> None:
    """Kill a random live node every so often, and restart it ``down_s`` later."""
    restarts: set[asyncio.Task[None]] = set()

    async def restart(node: NodeProcess) -> None:
        await asyncio.sleep(rng.uniform(0.5 * down_s, 1.5 * down_s))
        await node.start(session)

    try:
        while True:
            await asyncio.sleep(rng.expovariate(1 / kill_every_s))
            live = [node for node in nodes if node.alive]
            if not live:
                continue
            victim = rng.choice(live)
            await victim.kill()
            task = asyncio.create_task(restart(victim))
            restarts.add(task)
            task.add_done_callback(restarts.discard)
    finally:
        for task in list(restarts):
            task.cancel()
        # Restarts are cancelled on purpose; each only needs to have stopped.
        await asyncio.gather(*restarts, return_exceptions=True)


async def main(args: argparse.Namespace) -> int:
    logging.getLogger("sdproxy").setLevel(logging.ERROR)  # each failover logs a warning
    rng = random.Random(args.seed)
    bodies = workload(args.requests, rng)
    nodes = [NodeProcess(f"node{i}", args.per_image_s) for i in range(args.nodes)]
    settings = Settings.model_validate(
        {
            "server": {"port": 0},
            "benchmark": {"on_start": False},  # the clean run teaches the speed model instead
            "scheduler": {
                "request_timeout_s": 300,
                "connect_timeout_s": 1,
                "share_timeout_floor_s": 15,
                "max_redispatches": 20,
                "wait_for_node_s": 30,
                "health_interval_s": 0.5,
                "health_timeout_s": 2,
                "cooldown_base_s": 0.1,
                "cooldown_max_s": 1,
            },
            "nodes": [{"name": node.name, "url": node.url} for node in nodes],
        }
    )
    async with aiohttp.ClientSession() as session:
        for node in nodes:
            await node.start(session)
        runner = await start_proxy(settings, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            clean, clean_s = await run_workload(url, bodies, args.concurrency, float("inf"))
            chaos_task = asyncio.create_task(
                chaos(nodes, session, rng, args.kill_every_s, args.down_s)
            )
            try:
                deadline = time.perf_counter() + args.max_seconds
                chaotic, chaos_s = await run_workload(url, bodies, args.concurrency, deadline)
            finally:
                chaos_task.cancel()
                # Cancelled on purpose: the chaos task only needs to have stopped.
                await asyncio.gather(chaos_task, return_exceptions=True)
        finally:
            await runner.cleanup()
            for node in nodes:
                await node.stop()
    return report(bodies, clean, clean_s, chaotic, chaos_s, nodes)


def report(
    bodies: list[dict[str, Any]],
    clean: dict[int, Outcome],
    clean_s: float,
    chaotic: dict[int, Outcome],
    chaos_s: float,
    nodes: list[NodeProcess],
) -> int:
    lost = duplicated = wrong_pixels = 0
    errors: Counter[str] = Counter()
    completed = images = 0
    for index, outcome in sorted(chaotic.items()):
        body = bodies[index]
        expected = list(range(body["seed"], body["seed"] + body["batch_size"] * body["n_iter"]))
        if outcome.status != 200:
            errors[f"{outcome.status} {outcome.error}"] += 1
            continue
        completed += 1
        images += len(outcome.digests)
        lost += len(set(expected) - set(outcome.seeds)) + max(
            0, len(expected) - len(outcome.digests)
        )
        duplicated += len(outcome.seeds) - len(set(outcome.seeds))
        duplicated += max(0, len(outcome.digests) - len(expected))
        reference = clean.get(index)
        if reference is None or reference.status != 200:
            errors["clean run failed: no reference"] += 1
        elif (outcome.seeds, outcome.digests) != (reference.seeds, reference.digests):
            wrong_pixels += 1
    clean_ok = sum(1 for o in clean.values() if o.status == 200)
    clean_mean = sum(o.seconds for o in clean.values()) / max(1, len(clean))
    chaos_mean = sum(o.seconds for o in chaotic.values()) / max(1, len(chaotic))
    print(f"nodes: {len(nodes)}, node kills: {sum(n.kills for n in nodes)}")
    print(f"clean run: {clean_ok}/{len(bodies)} requests ok in {clean_s:.2f} s")
    print(f"chaos run: {len(chaotic)}/{len(bodies)} requests sent in {chaos_s:.2f} s")
    print(f"requests completed: {completed} ({images} images)")
    print(f"images lost: {lost}")
    print(f"images duplicated: {duplicated}")
    print(f"answers differing from the clean run (seeds or pixels): {wrong_pixels}")
    print(f"errors by kind: {dict(errors) if errors else 'none'}")
    print(f"time cost of failover: wall {chaos_s / clean_s:.2f}x the clean run, ", end="")
    print(f"mean latency {chaos_mean / clean_mean:.2f}x ({chaos_mean:.2f} s vs {clean_mean:.2f} s)")
    return 1 if lost or duplicated or wrong_pixels else 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--max-seconds", type=float, default=120.0, help="chaos run time bound")
    parser.add_argument("--per-image-s", type=float, default=8.0, help="0.125 s an image at 64 px")
    parser.add_argument("--kill-every-s", type=float, default=1.0, help="mean time between kills")
    parser.add_argument("--down-s", type=float, default=1.0, help="mean time a node stays dead")
    parser.add_argument("--seed", type=int, default=1)
    return parser.parse_args()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
