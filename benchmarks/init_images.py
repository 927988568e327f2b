"""What large init images cost the proxy: resident memory and time, against an idle proxy.

Every figure comes from this run. ``sdproxy serve`` runs as a subprocess in front of one fake
node (in this process); its resident set (VmRSS) is read from /proc:

- idle: after start-up and one small request (the baseline of every ratio);
- after ``--rounds`` rounds of ``--parallel`` concurrent img2img requests, each with two blank
  7000x7000 PNGs (49 MP each, about 140 KB: 98 MP, under the default max_request_megapixels);
- refused: a request of thirty such images (1470 MP), which is answered 422 from the headers,
  timed against one small request.

Target: the proxy's resident set after the large requests within 2x its idle size, and the
refusal of 30 images in under 0.1 s (it decodes nothing).

Run: ``python benchmarks/init_images.py`` (under a minute; Linux only, for /proc).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from PIL import Image

from sdproxy.fakewebui import FakeNode, FakeNodeSettings, create_fake_app
from sdproxy.server.site import start_site

SMALL = {"width": 64, "height": 64, "steps": 1}


def blank_png(side: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def post(session: aiohttp.ClientSession, url: str, body: dict[str, object]) -> int:
    async with session.post(f"{url}/sdapi/v1/img2img", json=body) as resp:
        await resp.read()
        return resp.status


async def main(rounds: int, parallel: int) -> None:
    # The fake node decodes init images too: make it cheap (1 px images it never sees big).
    node = FakeNode(FakeNodeSettings(name="n0", per_image_s=0.0, overhead_s=0.0))
    runner = await start_site(create_fake_app(node), "127.0.0.1", 0)
    node_port = runner.addresses[0][1]
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "sdproxy.toml"
        config.write_text(
            "[server]\nport = 0\n[benchmark]\non_start = false\n"
            f'[[nodes]]\nname = "n0"\nurl = "http://127.0.0.1:{node_port}"\n'
        )
        proxy_port = 18000 + (node_port % 1000)
        config.write_text(config.read_text().replace("port = 0", f"port = {proxy_port}"))
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sdproxy", "--log-level", "WARNING", "serve",
            "--config", str(config),
        )  # fmt: skip
        url = f"http://127.0.0.1:{proxy_port}"
        try:
            timeout = aiohttp.ClientTimeout(total=600)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                tiny = {"init_images": [blank_png(8)], **SMALL}
                for _ in range(200):
                    try:
                        if await post(session, url, tiny) == 200:
                            break
                    except aiohttp.ClientError:
                        await asyncio.sleep(0.05)
                idle = rss_mb(process.pid)
                big = blank_png(7000)
                body = {"init_images": [big, big], "batch_size": 2, **SMALL}
                started = time.perf_counter()
                for _ in range(rounds):
                    statuses = await asyncio.gather(
                        *(post(session, url, body) for _ in range(parallel))
                    )
                    assert statuses == [200] * parallel, statuses
                per_request_s = (time.perf_counter() - started) / (rounds * parallel)
                after = rss_mb(process.pid)
                started = time.perf_counter()
                await post(session, url, tiny)
                small_s = time.perf_counter() - started
                started = time.perf_counter()
                thirty = {"init_images": [big] * 30, "batch_size": 30, **SMALL}
                refused = await post(session, url, thirty)
                refused_s = time.perf_counter() - started
        finally:
            process.terminate()
            await process.wait()
            await runner.cleanup()
    print(
        f"proxy RSS idle {idle:.0f} MB; after {rounds}x{parallel} requests of 2x49 MP: "
        f"{after:.0f} MB = {after / idle:.2f}x idle (target <= 2x)"
    )
    print(f"one request of 2x49 MP: {per_request_s:.2f} s wall (both images checked, rendered)")
    print(
        f"30x49 MP: {refused} in {refused_s * 1000:.0f} ms = {refused_s / small_s:.1f}x a tiny "
        f"request (target < 100 ms)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--parallel", type=int, default=4)
    args = parser.parse_args()
    asyncio.run(main(args.rounds, args.parallel))
