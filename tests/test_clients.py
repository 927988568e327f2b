"""The real webuiapi client from PyPI, unchanged, pointed at sdproxy."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import webuiapi
from PIL import Image

from sdproxy.fakewebui import FakeNodeSettings
from tests.support import fake_nodes, proxy


def client_for(url: str) -> webuiapi.WebUIApi:
    parts = urlsplit(url)
    return webuiapi.WebUIApi(host=parts.hostname, port=parts.port)


class TestWebuiapi:
    """webuiapi's txt2img and img2img work through sdproxy as against one webui."""

    async def test_webuiapi_txt2img(self) -> None:
        """Eight images over two nodes come back as PIL images with consecutive seeds."""
        async with (
            fake_nodes(*(FakeNodeSettings(name=f"n{i}") for i in range(2))) as nodes,
            proxy(nodes) as url,
        ):
            api = await asyncio.to_thread(client_for, url)
            result = await asyncio.to_thread(
                api.txt2img,
                prompt="a lighthouse",
                batch_size=4,
                n_iter=2,
                seed=1234,
                width=64,
                height=64,
            )
            assert len(result.images) == 8
            assert all(isinstance(image, Image.Image) for image in result.images)
            assert result.info["all_seeds"] == list(range(1234, 1242))
            assert result.parameters["batch_size"] == 4
            assert all(n.node.images_rendered == 4 for n in nodes)

    async def test_webuiapi_img2img(self) -> None:
        """An img2img with a PIL init image (sent as a data URI) is split and merged."""
        async with (
            fake_nodes(*(FakeNodeSettings(name=f"n{i}") for i in range(2))) as nodes,
            proxy(nodes) as url,
        ):
            api = await asyncio.to_thread(client_for, url)
            init = Image.new("RGB", (64, 64), (10, 120, 200))
            result = await asyncio.to_thread(
                api.img2img,
                images=[init],
                prompt="a boat",
                batch_size=3,
                seed=99,
                width=64,
                height=64,
                denoising_strength=0.5,
            )
            assert len(result.images) == 3
            assert result.info["all_seeds"] == [99, 100, 101]
            assert sum(n.node.images_rendered for n in nodes) == 3
