"""The real webuiapi client from PyPI, unchanged, pointed at sdproxy."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import webuiapi
from PIL import Image

from sdproxy.core.inventory import REDACTED
from sdproxy.fakewebui import FakeNodeSettings
from tests.support import fake_nodes, proxy, wait_until


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


M1 = "m1.safetensors [1111111111]"
M2 = "m2.safetensors [2222222222]"
SLOW = 256.0  # seconds an image at 512px: about 4 s for a 64px image, 0.2 s a step


class TestWebuiapiCalls:
    """webuiapi's other calls (reference section 6) against a cluster, sync and async."""

    async def test_webuiapi_reads(self) -> None:
        """Scripts, samplers, schedulers, models, LoRAs, memory and cmd-flags as one webui."""
        async with (
            fake_nodes(
                FakeNodeSettings(
                    name="a",
                    models=(M1,),
                    loras=("x",),
                    gradio_auth="admin:hunter2",
                    scripts_txt2img=("controlnet", "controlnet m2m", "lora"),
                ),
                FakeNodeSettings(name="b", models=(M1, M2), loras=("y",)),
            ) as nodes,
            proxy(nodes) as url,
        ):
            api = await asyncio.to_thread(client_for, url)
            # ControlNet is on one node only: not offered, so webuiapi does not inject it.
            assert api.has_controlnet is False
            scripts = await asyncio.to_thread(api.get_scripts)
            assert scripts["txt2img"] == ["lora"]
            samplers = await asyncio.to_thread(api.util_get_sampler_names)
            assert "Euler a" in samplers
            schedulers = await asyncio.to_thread(api.util_get_scheduler_names)
            assert "karras" in schedulers
            assert await asyncio.to_thread(api.util_get_model_names) == [M1, M2]
            loras = await asyncio.to_thread(api.get_loras)
            assert [lora["name"] for lora in loras] == ["x", "y"]
            memory = await asyncio.to_thread(api.get_memory)
            assert memory["ram"]["total"] > 0
            flags = await asyncio.to_thread(api.get_cmd_flags)
            assert flags["gradio_auth"] == REDACTED
            assert await asyncio.to_thread(api.controlnet_model_list) == [
                "control_v11p_sd15_canny [d14c016b]"
            ]
            assert await asyncio.to_thread(api.refresh_checkpoints) is None
            assert all(n.node.requests["POST /sdapi/v1/refresh-checkpoints"] == 1 for n in nodes)
            result = await asyncio.to_thread(
                api.txt2img, prompt="x", batch_size=2, width=64, height=64
            )
            assert len(result.images) == 2

    async def test_webuiapi_set_model_and_options(self) -> None:
        """util_set_model picks a checkpoint for the cluster; generations then run on it."""
        async with (
            fake_nodes(
                FakeNodeSettings(name="a", models=(M1,)),
                FakeNodeSettings(name="b", models=(M1, M2)),
            ) as nodes,
            proxy(nodes) as url,
        ):
            api = await asyncio.to_thread(client_for, url)
            assert await asyncio.to_thread(api.util_get_current_model) == M1
            await asyncio.to_thread(api.util_set_model, "m2")
            assert await asyncio.to_thread(api.util_get_current_model) == M2
            result = await asyncio.to_thread(
                api.txt2img, prompt="x", batch_size=3, width=64, height=64
            )
            assert all("Model: m2" in text for text in result.info["infotexts"])
            assert nodes[0].node.images_rendered == 0
            await asyncio.to_thread(api.set_options, {"jpeg_quality": 70})
            options = await asyncio.to_thread(api.get_options)
            assert options["jpeg_quality"] == 70
            assert [n.node.options["jpeg_quality"] for n in nodes] == [70, 70]

    async def test_webuiapi_progress_interrupt_wait_for_ready(self) -> None:
        """An async txt2img is interrupted mid-way; then util_wait_for_ready returns."""
        async with (
            fake_nodes(
                FakeNodeSettings(name="a", per_image_s=SLOW),
                FakeNodeSettings(name="b", per_image_s=SLOW),
            ) as nodes,
            proxy(nodes) as url,
        ):
            api = await asyncio.to_thread(client_for, url)
            pending = api.txt2img(
                prompt="x", batch_size=1, n_iter=4, seed=7, width=64, height=64, use_async=True
            )
            await wait_until(
                lambda: all(n.node.state.sampling_step >= 1 for n in nodes),
                what="the nodes to render",
            )
            progress = await asyncio.to_thread(api.get_progress)
            assert progress["progress"] > 0
            assert progress["state"]["job_count"] > 0
            assert await asyncio.to_thread(api.interrupt) == {}
            result = await pending
            assert len(result.images) == 2
            assert result.info["all_seeds"] == [7, 9, 8, 10]  # rendered first: images[i]'s
            assert len(result.info["infotexts"]) == 2
            await asyncio.to_thread(api.util_wait_for_ready, 0.05)
            idle = await asyncio.to_thread(api.get_progress)
            assert (idle["progress"], idle["state"]["job_count"]) == (0, 0)

    async def test_webuiapi_png_info_interrogate_extras(self) -> None:
        """png_info, interrogate and extras (sync and async) reach a node and come back."""
        async with (
            fake_nodes(FakeNodeSettings(name="a"), FakeNodeSettings(name="b")) as nodes,
            proxy(nodes) as url,
        ):
            api = await asyncio.to_thread(client_for, url)
            result = await asyncio.to_thread(api.txt2img, prompt="owl", seed=5, width=64, height=64)
            image = result.image
            info = await asyncio.to_thread(api.png_info, image)
            assert "Seed: 5" in info.info
            caption = await asyncio.to_thread(api.interrogate, image)
            assert caption.info.startswith("a simulated picture")
            upscaled = await asyncio.to_thread(
                api.extra_single_image, image, upscaler_1="Lanczos", upscaling_resize=2
            )
            assert upscaled.image.size == (128, 128)
            again = await api.extra_single_image(
                image, upscaler_1="Lanczos", upscaling_resize=2, use_async=True
            )
            assert again.image.size == (128, 128)
            batch = await api.extra_batch_images(
                [image, image], upscaler_1="Lanczos", upscaling_resize=3, use_async=True
            )
            assert [picture.size for picture in batch.images] == [(192, 192)] * 2
