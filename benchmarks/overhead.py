"""What sdproxy adds on top of one node: latency, throughput of image data, memory when merging.

Every figure comes from this run:

- added latency: sdproxy in front of one zero-latency stub webui node (it answers at once with
  pre-built bodies of N images of about 0.5 MB base64 each) against the same node called
  directly, for 1, 8 and 32 images; p50 and p95 of each, added = proxied - direct;
- MB/s through the proxy: image data per proxied request / its p50 time (end to end, from this
  client), and through the merge path alone (decode the node's JSON, check it, merge, encode the
  answer: the CPU work sdproxy does per response), in-process;
- peak memory while merging 64 images of 1 MB (as 4 node answers of 16): the growth of the
  resident set (Linux VmHWM) in a fresh process, from before the node answers arrive to the
  encoded answer, against the answer's size. (tracemalloc is no good here: orjson's parser
  reserves far more than it touches.)

Targets: p50 added latency <= 3 ms for one image; >= 500 MB/s of image data through the merge
path; peak memory <= 4x the response.

Run: ``python benchmarks/overhead.py`` (under a minute).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from sdproxy.config import Settings
from sdproxy.core.answers import Asked, read_part
from sdproxy.core.merge import Part, merge_parts
from sdproxy.core.request import Seeds, parse_generation
from sdproxy.server.app import create_app
from sdproxy.server.site import start_site

MB = 1024 * 1024


PNG = b"\x89PNG\r\n\x1a\n"


def image_b64(size_bytes: int, salt: int) -> str:
    """A base64 string of ``size_bytes`` characters standing in for an encoded PNG (its
    signature, then random bytes: what sdproxy checks of an image without decoding it)."""
    raw = PNG + os.urandom(size_bytes * 3 // 4 - 1 - len(PNG)) + bytes([salt % 256])
    return base64.b64encode(raw).decode()


def node_info(count: int, seed: int, subseed: int = 1) -> str:
    """A webui-shaped info string for ``count`` images from these seeds."""
    info = {
        "prompt": "x",
        "all_prompts": ["x"] * count,
        "negative_prompt": "",
        "all_negative_prompts": [""] * count,
        "seed": seed,
        "all_seeds": list(range(seed, seed + count)),
        "subseed": subseed,
        "all_subseeds": list(range(subseed, subseed + count)),
        "width": 512,
        "height": 512,
        "batch_size": count,
        "index_of_first_image": 0,
        "infotexts": [f"x\nSteps: 20, Seed: {seed + k}" for k in range(count)],
        "job_timestamp": "20240101000000",
    }
    return json.dumps(info)


def node_answer(images: list[str], first: int) -> dict[str, Any]:
    """A webui-shaped txt2img answer for these images, seed and subseed from ``first``."""
    info = node_info(len(images), first, first)
    return {"images": images, "parameters": {"prompt": "x"}, "info": info}


def stub_node(pool: list[str]) -> web.Application:
    """A webui that answers txt2img at once with ``batch_size`` images from ``pool``."""
    encoded: dict[int, bytes] = {}  # the images part of the answer, by image count

    async def txt2img(request: web.Request) -> web.Response:
        payload = await request.json()
        count = int(payload.get("batch_size", 1)) * int(payload.get("n_iter", 1))
        images = encoded.get(count)
        if images is None:
            images = encoded[count] = orjson.dumps([pool[k % len(pool)] for k in range(count)])
        # The seeds it was sent, as a webui reports them (sdproxy checks them).
        info = node_info(count, int(payload.get("seed", 1)), int(payload.get("subseed", 1)))
        body = b'{"images":%b,"parameters":{"prompt":"x"},"info":%b}' % (
            images,
            orjson.dumps(info),
        )
        return web.Response(body=body, content_type="application/json")

    async def progress(_: web.Request) -> web.Response:
        return web.json_response({"progress": 0, "state": {}})

    title = "v1-5-pruned-emaonly.safetensors [6ce0161689]"
    model = {
        "title": title,
        "model_name": "v1-5-pruned-emaonly",
        "hash": "6ce0161689",
        "sha256": "6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa",
        "filename": "/models/v1-5-pruned-emaonly.safetensors",
        "config": None,
    }

    async def sd_models(_: web.Request) -> web.Response:
        return web.json_response([model])

    async def options(_: web.Request) -> web.Response:
        return web.json_response({"sd_model_checkpoint": title})

    app = web.Application(client_max_size=64 * MB)
    app.router.add_post("/sdapi/v1/txt2img", txt2img)
    app.router.add_get("/sdapi/v1/progress", progress)
    app.router.add_get("/sdapi/v1/sd-models", sd_models)
    app.router.add_get("/sdapi/v1/options", options)
    return app


async def time_post(session: aiohttp.ClientSession, url: str, images: int) -> float:
    body = {"prompt": "x", "batch_size": images, "seed": 1, "steps": 20}
    started = time.perf_counter()
    async with session.post(f"{url}/sdapi/v1/txt2img", json=body) as resp:
        raw = await resp.read()
    elapsed = time.perf_counter() - started
    if resp.status != 200:
        raise RuntimeError(f"{url}: {resp.status} {raw[:200]!r}")
    return elapsed


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def merge_path(raw_bodies: list[bytes], images: int) -> bytes:
    """sdproxy's CPU work for one answer: decode each node body, check, merge, encode."""
    request = parse_generation("txt2img", {"batch_size": images, "seed": 1}, max_images=1000)
    parts: list[Part] = []
    start = 0
    while raw_bodies:
        raw = raw_bodies.pop(0)  # the client drops each body once decoded, as NodeClient does
        answer = orjson.loads(raw)
        del raw
        count = len(answer["images"])
        seeds = tuple(range(1 + start, 1 + start + count))
        asked = Asked(count, seeds=seeds, subseeds=seeds)
        parts.append(read_part(f"n{len(parts)}", start, answer, asked))
        start += count
    merged = merge_parts(request, Seeds(1, 1), parts)
    return orjson.dumps(merged.to_json_dict())


def merge_speed_mb_s(pool: list[str], images: int, nodes: int) -> float:
    """MB/s of image data through the merge path (median of 5 runs)."""
    per_node = images // nodes
    bodies = [
        orjson.dumps(
            node_answer(
                [pool[(n * per_node + k) % len(pool)] for k in range(per_node)], 1 + n * per_node
            )
        )
        for n in range(nodes)
    ]
    image_bytes = sum(len(pool[k % len(pool)]) for k in range(images))
    times = []
    for _ in range(5):
        started = time.perf_counter()
        merge_path(list(bodies), images)
        times.append(time.perf_counter() - started)
    return image_bytes / MB / statistics.median(times)


def _rss_mb(key: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def merge_memory_child(images: int, nodes: int, image_bytes: int) -> None:
    """In a fresh process: peak resident memory of the merge path, from before the node answers
    arrive until the answer is encoded, as JSON on stdout. Linux: VmHWM reset by clear_refs."""
    before = _rss_mb("VmRSS")
    per_node = images // nodes
    bodies = []
    for n in range(nodes):  # the node answers as they arrive; the image strings are not kept
        pool = [image_b64(image_bytes, n * per_node + k) for k in range(per_node)]
        bodies.append(orjson.dumps(node_answer(pool, 1 + n * per_node)))
        del pool
    gc.collect()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # restart the high-water mark from the current resident size
    answer = merge_path(bodies, images)
    peak = _rss_mb("VmHWM") - before
    print(json.dumps({"peak_mb": peak, "answer_mb": len(answer) / MB}))


def merge_memory(images: int, nodes: int, image_bytes: int) -> tuple[float, float]:
    """(peak MB, answer MB) measured by merge_memory_child in a subprocess."""
    args = [sys.executable, __file__, "--memory-child", f"{images},{nodes},{image_bytes}"]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    figures = json.loads(out)
    return figures["peak_mb"], figures["answer_mb"]


async def latency_rows(pool: list[str], reps: dict[int, int]) -> list[tuple[int, ...]]:
    node_runner = await start_site(stub_node(pool), "127.0.0.1", 0)
    node_url = f"http://127.0.0.1:{node_runner.addresses[0][1]}"
    settings = Settings.model_validate(
        {
            "server": {"port": 0},
            "benchmark": {"on_start": False},
            "nodes": [{"name": "stub", "url": node_url}],
        }
    )
    proxy_runner = await start_site(create_app(settings), "127.0.0.1", 0)
    proxy_url = f"http://127.0.0.1:{proxy_runner.addresses[0][1]}"
    rows: list[tuple[Any, ...]] = []
    try:
        async with aiohttp.ClientSession() as session:
            for images, count in reps.items():
                for _ in range(3):  # warm up connections and caches
                    await time_post(session, node_url, images)
                    await time_post(session, proxy_url, images)
                direct, proxied = [], []
                for _ in range(count):  # interleaved, so drifts in machine load hit both alike
                    direct.append(await time_post(session, node_url, images))
                    proxied.append(await time_post(session, proxy_url, images))
                image_mb = sum(len(pool[k % len(pool)]) for k in range(images)) / MB
                rows.append(
                    (
                        images,
                        statistics.median(direct) * 1000,
                        statistics.median(proxied) * 1000,
                        (statistics.median(proxied) - statistics.median(direct)) * 1000,
                        (percentile(proxied, 0.95) - percentile(direct, 0.95)) * 1000,
                        image_mb / statistics.median(proxied),
                    )
                )
                print(
                    "{:>6} {:>12.2f} {:>12.2f} {:>14.2f} {:>14.2f} {:>13.0f}".format(*rows[-1]),
                    flush=True,
                )
    finally:
        await proxy_runner.cleanup()
        await node_runner.cleanup()
    return rows


async def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--reps", type=int, default=200, help="requests of one image (fewer of more)"
    )
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        merge_memory_child(*(int(v) for v in args.memory_child.split(",")))
        return 0
    pool = [image_b64(512 * 1024, k) for k in range(32)]
    reps = {1: args.reps, 8: max(args.reps // 5, 5), 32: max(args.reps // 20, 5)}
    print(
        f"{'images':>6} {'direct p50 ms':>12} {'proxy p50 ms':>12} {'added p50 ms':>14} "
        f"{'added p95 ms':>14} {'proxy MB/s':>13}",
        flush=True,
    )
    rows = await latency_rows(pool, reps)
    merge_mb_s = merge_speed_mb_s(pool, 32, 4)
    peak_mb, answer_mb = merge_memory(64, 4, MB)
    peak_ratio = peak_mb / answer_mb
    print(f"merge path, 32 images of 0.5 MB: {merge_mb_s:.0f} MB/s of image data")
    print(
        f"merge of 64 images of 1 MB from 4 nodes: peak resident memory {peak_mb:.0f} MB, "
        f"{peak_ratio:.2f}x the {answer_mb:.0f} MB answer"
    )
    added_one = rows[0][3]
    met = added_one <= 3.0 and merge_mb_s >= 500 and peak_ratio <= 4.0
    print(
        f"overhead: p50 added latency {added_one:.2f} ms for one image (target <= 3), "
        f"merge path {merge_mb_s:.0f} MB/s (target >= 500), peak memory {peak_ratio:.2f}x "
        f"the answer (target <= 4); " + ("targets met" if met else "TARGETS MISSED")
    )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
