"""Realistic fake images: webui-sized PNGs, still a pure function of the image's own inputs."""

from __future__ import annotations

import base64
import io

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from sdproxy.cli import free_port
from sdproxy.fakewebui import FakeNodeSettings, render_png
from tests.support import NodeProcess, fake_nodes, post_json


def png(seed: int, size: int, *, realistic: bool = True, prompt: str = "a cow") -> bytes:
    return render_png(
        seed=seed,
        subseed=1,
        subseed_strength=0.0,
        prompt=prompt,
        width=size,
        height=size,
        init_image_digest=None,
        infotext=f"{prompt}\nSteps: 20, Seed: {seed}",
        realistic=realistic,
    )


class TestRealisticPixels:
    """render_png with realistic=True: about a webui's PNG size, deterministic, seed-dependent."""

    @pytest.mark.parametrize(
        ("size", "low_kb", "high_kb"), [(512, 330, 500), (1024, 1300, 2000), (64, 4, 12)]
    )
    def test_realistic_png_has_webui_size(self, size: int, low_kb: int, high_kb: int) -> None:
        """A 512x512 PNG is about 400 KB and a 1024x1024 one about 1.6 MB, as a webui's are."""
        data = png(7, size)
        assert low_kb * 1000 <= len(data) <= high_kb * 1000
        assert len(png(7, size, realistic=False)) < len(data) / 10

    @settings(max_examples=10, deadline=None)
    @given(seed=st.integers(0, 2**32 - 1), prompt=st.text(max_size=20))
    def test_realistic_png_is_a_function_of_its_inputs(self, seed: int, prompt: str) -> None:
        """The same inputs give the same bytes; another seed gives other pixels."""
        first = png(seed, 64, prompt=prompt)
        assert png(seed, 64, prompt=prompt) == first
        other = Image.open(io.BytesIO(png(seed + 1, 64, prompt=prompt))).convert("RGB")
        assert Image.open(io.BytesIO(first)).convert("RGB").tobytes() != other.tobytes()

    def test_realistic_png_keeps_infotext(self) -> None:
        """The tEXt parameters chunk is there, as on plain images."""
        with Image.open(io.BytesIO(png(3, 64))) as image:
            assert image.info["parameters"] == "a cow\nSteps: 20, Seed: 3"


class TestRealisticNode:
    """A fake node told to return realistic images sends webui-sized PNGs over HTTP."""

    async def test_realistic_node_returns_large_pngs(self) -> None:
        """batch 2 at 512x512: two PNGs of about 400 KB, the same again for the same seed."""
        body = {"batch_size": 2, "seed": 11, "steps": 20, "width": 512, "height": 512}
        async with (
            fake_nodes(FakeNodeSettings(name="r", realistic_images=True)) as nodes,
            aiohttp.ClientSession() as session,
        ):
            url = f"{nodes[0].url}/sdapi/v1/txt2img"
            status, answer, _ = await post_json(session, url, body)
            assert status == 200
            sizes = [len(base64.b64decode(image)) for image in answer["images"]]
            assert all(330_000 <= size <= 500_000 for size in sizes), sizes
            _, again, _ = await post_json(session, url, body)
            assert again["images"] == answer["images"]

    async def test_cli_flag_makes_a_realistic_node(self) -> None:
        """`sdproxy fake-node --realistic-images` serves webui-sized PNGs."""
        node = NodeProcess("cli", free_port(), "--per-image-s", "0", "--realistic-images")
        await node.start()
        try:
            body = {"batch_size": 1, "seed": 2, "steps": 20, "width": 512, "height": 512}
            async with aiohttp.ClientSession() as session:
                status, answer, _ = await post_json(session, f"{node.url}/sdapi/v1/txt2img", body)
            assert status == 200
            assert len(base64.b64decode(answer["images"][0])) >= 330_000
        finally:
            await node.stop()
