"""Real servers on 127.0.0.1 for tests: fake webui nodes and sdproxy in front of them."""

from __future__ import annotations

import base64
import io
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDictProxy
from PIL import Image

from sdproxy.cli import start_proxy, start_site
from sdproxy.config import Settings
from sdproxy.fakewebui import FakeNode, FakeNodeSettings, create_fake_app


@dataclass
class RunningNode:
    """A fake webui node serving on loopback."""

    node: FakeNode
    url: str

    @property
    def name(self) -> str:
        return self.node.settings.name


def bound_port(runner: web.AppRunner) -> int:
    port: int = runner.addresses[0][1]
    return port


@asynccontextmanager
async def fake_nodes(*settings: FakeNodeSettings) -> AsyncIterator[list[RunningNode]]:
    """Start one fake node per settings, each on a free loopback port."""
    async with AsyncExitStack() as stack:
        running = []
        for each in settings:
            node = FakeNode(each)
            runner = await start_site(create_fake_app(node), "127.0.0.1", 0)
            stack.push_async_callback(runner.cleanup)
            running.append(RunningNode(node, f"http://127.0.0.1:{bound_port(runner)}"))
        yield running


@asynccontextmanager
async def proxy(
    nodes: Sequence[RunningNode | dict[str, Any]], **sections: Any
) -> AsyncIterator[str]:
    """Start sdproxy in front of ``nodes`` and yield its base URL."""
    node_list = [{"name": n.name, "url": n.url} if isinstance(n, RunningNode) else n for n in nodes]
    settings = Settings.model_validate({"server": {"port": 0}, **sections, "nodes": node_list})
    runner = await start_proxy(settings, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{bound_port(runner)}"
    finally:
        await runner.cleanup()


async def post_json(
    session: aiohttp.ClientSession, url: str, body: Any
) -> tuple[int, Any, CIMultiDictProxy[str]]:
    async with session.post(url, json=body) as resp:
        return resp.status, await resp.json(content_type=None), resp.headers


def pixels(image_b64: str) -> bytes:
    """The decoded pixel data of a base64 image, for pixel-exact comparisons."""
    with Image.open(io.BytesIO(base64.b64decode(image_b64))) as image:
        return image.convert("RGB").tobytes()
