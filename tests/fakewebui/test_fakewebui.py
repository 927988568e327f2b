"""The fake webui node answers like webui v1.10.1: shapes, seeds, pixels, progress and faults."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from sdproxy.fakewebui import (
    FakeNode,
    FakeNodeSettings,
    Fault,
    create_fake_app,
    render_png,
    serve_fake_node,
)
from sdproxy.fakewebui.catalog import DEFAULT_SAMPLERS, resolve_sampler
from sdproxy.fakewebui.infotext import parse_infotext, seed_lists
from sdproxy.fakewebui.model import (
    IMG2IMG_FIELDS,
    TXT2IMG_FIELDS,
    RequestValidationError,
    validate_request,
)
from tests.support import SMALL, free_port, info_of, pixels, wait_until, wait_until_serving

Client = TestClient[web.Request, web.Application]
TITLE = "v1-5-pruned-emaonly.safetensors [6ce0161689]"


@asynccontextmanager
async def serving(
    settings: FakeNodeSettings | None = None,
) -> AsyncIterator[tuple[FakeNode, Client]]:
    """A fake node on 127.0.0.1 and a client for it."""
    node = FakeNode(settings or FakeNodeSettings())
    async with TestClient(TestServer(create_fake_app(node), host="127.0.0.1")) as client:
        yield node, client


@pytest.fixture
async def client() -> AsyncIterator[Client]:
    """A client for a fake node with default settings."""
    async with serving() as (_, test_client):
        yield test_client


async def call(
    client: Client, path: str, body: Any = None, *, method: str = "POST"
) -> tuple[int, Any]:
    async with client.request(method, f"/sdapi/v1/{path}", json=body) as resp:
        return resp.status, await resp.json()


async def generate(client: Client, body: dict[str, Any], mode: str = "txt2img") -> dict[str, Any]:
    status, answer = await call(client, mode, body)
    assert status == 200, answer
    result: dict[str, Any] = answer
    return result


def image_of(image_b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(image_b64)))
    image.load()
    return image


def png_b64(colour: tuple[int, int, int], size: int = 16) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


async def wait_for_progress(
    client: Client, until: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """Poll /progress until ``until`` holds (the node's state changes on its own clock)."""
    seen: dict[str, Any] = {}

    async def reached() -> bool:
        status, progress = await call(client, "progress", method="GET")
        assert status == 200
        seen.clear()
        seen.update(progress)
        return until(seen)

    await wait_until(reached, what="the node to reach the awaited state")
    return seen


class TestRequestModel:
    """Request bodies are validated and coerced like the webui's pydantic-1 models."""

    @pytest.mark.parametrize(
        ("field", "sent", "expected"),
        [
            ("seed", "12", 12),
            ("seed", 2.7, 2),
            ("seed", True, 1),
            ("seed", None, None),
            ("prompt", 123, "123"),
            ("prompt", 1.5, "1.5"),
            ("restore_faces", "yes", True),
            ("restore_faces", 1, True),
            ("restore_faces", "Off", False),
            ("cfg_scale", "7.5", 7.5),
            ("cfg_scale", 7, 7.0),
            ("override_settings", [], {}),
            ("styles", ["a", 1], ["a", "1"]),
        ],
    )
    def test_validate_request_coerces_values(self, field: str, sent: Any, expected: Any) -> None:
        """Values are coerced as pydantic 1 does, null included for generated fields."""
        value = validate_request(TXT2IMG_FIELDS, {field: sent})[field]
        assert value == expected
        assert type(value) is type(expected)

    @pytest.mark.parametrize(
        ("field", "sent", "loc", "msg", "type_"),
        [
            ("seed", "abc", ["seed"], "value is not a valid integer", "type_error.integer"),
            ("seed", "", ["seed"], "value is not a valid integer", "type_error.integer"),
            ("seed", "1.5", ["seed"], "value is not a valid integer", "type_error.integer"),
            ("prompt", ["a"], ["prompt"], "str type expected", "type_error.str"),
            ("cfg_scale", "x", ["cfg_scale"], "value is not a valid float", "type_error.float"),
            (
                "restore_faces",
                2,
                ["restore_faces"],
                "value could not be parsed to a boolean",
                "type_error.bool",
            ),
            ("styles", "x", ["styles"], "value is not a valid list", "type_error.list"),
            ("styles", ["a", []], ["styles", 1], "str type expected", "type_error.str"),
            (
                "alwayson_scripts",
                "x",
                ["alwayson_scripts"],
                "value is not a valid dict",
                "type_error.dict",
            ),
            (
                "send_images",
                None,
                ["send_images"],
                "none is not an allowed value",
                "type_error.none.not_allowed",
            ),
        ],
    )
    def test_validate_request_reports_pydantic1_errors(
        self, field: str, sent: Any, loc: list[Any], msg: str, type_: str
    ) -> None:
        """A bad value gives pydantic 1's message and type at ["body", field, ...]."""
        with pytest.raises(RequestValidationError) as caught:
            validate_request(TXT2IMG_FIELDS, {field: sent})
        assert caught.value.errors == [{"loc": ["body", *loc], "msg": msg, "type": type_}]

    def test_img2img_model_rejects_null_denoising(self) -> None:
        """img2img's re-added denoising_strength (0.75) is not Optional, unlike txt2img's."""
        assert validate_request(IMG2IMG_FIELDS, {})["denoising_strength"] == 0.75
        assert (
            validate_request(TXT2IMG_FIELDS, {"denoising_strength": None})["denoising_strength"]
            is None
        )
        with pytest.raises(RequestValidationError):
            validate_request(IMG2IMG_FIELDS, {"denoising_strength": None})

    @given(
        seed=st.integers(-(2**40), 2**40),
        subseed=st.integers(0, 2**33),
        strength=st.sampled_from([0, 0.0, 0.3, 1.0]),
        total=st.integers(1, 40),
    )
    def test_seed_lists_follow_the_webui_rules(
        self, seed: int, subseed: int, strength: float, total: int
    ) -> None:
        """all_seeds count up only without variation; all_subseeds always count up."""
        seeds, subseeds = seed_lists(seed, subseed, strength, total)
        step = 1 if strength == 0 else 0
        assert seeds == [seed + step * k for k in range(total)]
        assert subseeds == [subseed + k for k in range(total)]

    @pytest.mark.parametrize(
        ("name", "scheduler", "expected"),
        [
            ("DPM++ 2M Karras", None, ("DPM++ 2M", "Automatic")),
            ("Euler a", None, ("Euler a", "Automatic")),
            ("Euler a Karras", None, ("Euler a", "Karras")),
            ("k_euler_a", None, ("DPM++ 2M", "Automatic")),
            (None, None, ("DPM++ 2M", "Automatic")),
            ("Euler", "karras", ("Euler", "Karras")),
            ("Euler", "nonsense", ("Euler", "Automatic")),
        ],
    )
    def test_resolve_sampler_splits_schedule_suffix(
        self, name: str | None, scheduler: str | None, expected: tuple[str, str]
    ) -> None:
        """Sampler names resolve as get_sampler_and_scheduler does; unknown ones fall back."""
        assert (
            resolve_sampler(name, scheduler, DEFAULT_SAMPLERS, convert_automatic=True) == expected
        )


class TestValidationResponses:
    """Bad generation requests get FastAPI's 422 bodies."""

    async def test_txt2img_bad_type_is_422(self, client: Client) -> None:
        """A non-integer seed names the field with pydantic 1's wording."""
        status, body = await call(client, "txt2img", {"seed": "abc", **SMALL})
        assert (status, body) == (
            422,
            {
                "detail": [
                    {
                        "loc": ["body", "seed"],
                        "msg": "value is not a valid integer",
                        "type": "type_error.integer",
                    }
                ]
            },
        )

    async def test_txt2img_bad_json_is_422_jsondecode(self, client: Client) -> None:
        """Undecodable JSON is reported at its character position."""
        headers = {"Content-Type": "application/json"}
        async with client.post("/sdapi/v1/txt2img", data=b"{oops", headers=headers) as resp:
            assert resp.status == 422
            (error,) = (await resp.json())["detail"]
        assert error["loc"] == ["body", 1]
        assert error["type"] == "value_error.jsondecode"
        assert error["msg"].startswith("Expecting property name enclosed in double quotes")
        assert error["ctx"]["pos"] == 1

    async def test_txt2img_without_body_is_422_missing(self, client: Client) -> None:
        """No body at all is a missing field at ["body"]."""
        async with client.post("/sdapi/v1/txt2img") as resp:
            assert resp.status == 422
            assert await resp.json() == {
                "detail": [
                    {"loc": ["body"], "msg": "field required", "type": "value_error.missing"}
                ]
            }

    async def test_txt2img_list_prompt_is_422(self, client: Client) -> None:
        """A list prompt is rejected: prompt lists exist only inside scripts."""
        status, body = await call(client, "txt2img", {"prompt": ["a", "b"]})
        assert status == 422
        assert body["detail"] == [
            {"loc": ["body", "prompt"], "msg": "str type expected", "type": "type_error.str"}
        ]


class TestSeeds:
    """Seeds follow process_images_inner: per image, iteration-major, -1 drawn once."""

    async def test_seeds_count_up_without_variation(self, client: Client) -> None:
        """With subseed_strength 0 each image gets seed + k and its infotext says so."""
        body = {"seed": 10, "subseed": 100, "batch_size": 2, "n_iter": 2, **SMALL}
        info = info_of(await generate(client, body))
        assert info["all_seeds"] == [10, 11, 12, 13]
        assert info["all_subseeds"] == [100, 101, 102, 103]
        assert (info["seed"], info["subseed"]) == (10, 100)
        assert [t.split("Seed: ")[1].split(",")[0] for t in info["infotexts"]] == [
            "10",
            "11",
            "12",
            "13",
        ]

    async def test_seeds_stay_with_variation(self, client: Client) -> None:
        """With variation every seed is the same and the subseeds count up."""
        body = {"seed": 10, "subseed": 100, "subseed_strength": 0.5, "batch_size": 3, **SMALL}
        info = info_of(await generate(client, body))
        assert info["all_seeds"] == [10, 10, 10]
        assert info["all_subseeds"] == [100, 101, 102]
        assert "Seed: 10, Size: 64x64" in info["infotexts"][1]
        assert "Variation seed: 101, Variation seed strength: 0.5" in info["infotexts"][1]

    async def test_random_seed_drawn_once(self, client: Client) -> None:
        """-1 becomes one random seed for the request; parameters keep -1."""
        answer = await generate(client, {"seed": -1, "batch_size": 3, **SMALL})
        info = info_of(answer)
        first = info["all_seeds"][0]
        assert 0 <= first < 4294967294
        assert info["all_seeds"] == [first, first + 1, first + 2]
        assert answer["parameters"]["seed"] == -1


class TestResponseShape:
    """The envelope, parameters echo, info JSON and infotexts match the webui."""

    async def test_info_keys_in_webui_order(self, client: Client) -> None:
        """info has Processed.js()'s keys in its order, and the envelope its three keys."""
        answer = await generate(client, SMALL)
        assert list(answer) == ["images", "parameters", "info"]
        assert list(info_of(answer)) == [
            "prompt", "all_prompts", "negative_prompt", "all_negative_prompts", "seed",
            "all_seeds", "subseed", "all_subseeds", "subseed_strength", "width", "height",
            "sampler_name", "cfg_scale", "steps", "batch_size", "restore_faces",
            "face_restoration_model", "sd_model_name", "sd_model_hash", "sd_vae_name",
            "sd_vae_hash", "seed_resize_from_w", "seed_resize_from_h", "denoising_strength",
            "extra_generation_params", "index_of_first_image", "infotexts", "styles",
            "job_timestamp", "clip_skip", "is_using_inpainting_conditioning", "version",
        ]  # fmt: skip

    async def test_info_uses_python_json_formatting(self, client: Client) -> None:
        """info is json.dumps with default separators and ASCII escapes."""
        answer = await generate(client, {"prompt": "café ☕", **SMALL})
        assert answer["info"] == json.dumps(json.loads(answer["info"]))
        assert "caf\\u00e9 \\u2615" in answer["info"]
        info = info_of(answer)
        assert info["sd_model_name"] == "v1-5-pruned-emaonly"
        assert info["sd_model_hash"] == "6ce0161689"
        assert info["denoising_strength"] is None
        assert (info["restore_faces"], info["clip_skip"], info["version"]) == (False, 1, "v1.10.1")

    async def test_parameters_echo_every_field_with_defaults(self, client: Client) -> None:
        """parameters is every field after coercion, unsent defaults included, unknowns dropped."""
        answer = await generate(client, {"steps": "12", "bogus": 1, "width": 64, "height": 64})
        parameters = answer["parameters"]
        assert list(parameters) == [spec.name for spec in TXT2IMG_FIELDS]
        assert parameters["steps"] == 12
        assert parameters["sampler_index"] == "Euler"
        assert parameters["sampler_name"] is None
        assert parameters["script_name"] is None
        assert parameters["seed"] == -1
        assert parameters["denoising_strength"] is None
        assert parameters["alwayson_scripts"] == {}

    async def test_infotext_matches_webui_format(self, client: Client) -> None:
        """An infotext reads prompt, negative prompt, then the parameters line."""
        body = {"prompt": "a cat", "negative_prompt": "ugly", "seed": 123, **SMALL}
        (text,) = info_of(await generate(client, body))["infotexts"]
        assert text == (
            "a cat\nNegative prompt: ugly\nSteps: 20, Sampler: Euler, Schedule type: Automatic, "
            "CFG scale: 7.0, Seed: 123, Size: 64x64, Model hash: 6ce0161689, "
            "Model: v1-5-pruned-emaonly, Version: v1.10.1"
        )

    async def test_sampler_with_karras_suffix_reports_karras(self, client: Client) -> None:
        """DPM++ 2M Karras samples as DPM++ 2M with its default Karras schedule."""
        info = info_of(await generate(client, {"sampler_name": "DPM++ 2M Karras", **SMALL}))
        assert info["sampler_name"] == "DPM++ 2M"
        assert info["extra_generation_params"] == {"Schedule type": "Karras"}
        assert "Sampler: DPM++ 2M, Schedule type: Karras," in info["infotexts"][0]

    async def test_hires_reports_first_pass_size_and_upscales(self, client: Client) -> None:
        """Hires fix returns upscaled images; info keeps the first-pass size."""
        body = {"enable_hr": True, "hr_scale": 2, "denoising_strength": 0.5, **SMALL}
        answer = await generate(client, body)
        info = info_of(answer)
        assert image_of(answer["images"][0]).size == (128, 128)
        assert (info["width"], info["height"]) == (64, 64)
        assert info["extra_generation_params"]["Hires upscale"] == 2.0
        assert "Denoising strength: 0.5, Hires upscale: 2.0" in info["infotexts"][0]


class TestPixels:
    """Pixels depend on each image's own inputs only, so split runs match single runs."""

    async def test_batch_pixels_match_single_requests(self, client: Client) -> None:
        """A batch of 3 from seed S equals single requests for S, S+1 and S+2, byte for byte."""
        batch = await generate(client, {"seed": 50, "subseed": 7, "batch_size": 3, **SMALL})
        singles = [
            await generate(client, {"seed": 50 + k, "subseed": 7 + k, **SMALL}) for k in range(3)
        ]
        assert batch["images"] == [single["images"][0] for single in singles]
        assert len({pixels(image) for image in batch["images"]}) == 3

    async def test_variation_pixels_match_split_iterations(self, client: Client) -> None:
        """With variation the second iteration equals a run from subseed + batch_size."""
        common = {"seed": 7, "subseed_strength": 0.3, "batch_size": 2, **SMALL}
        whole = await generate(client, {**common, "subseed": 100, "n_iter": 2})
        tail = await generate(client, {**common, "subseed": 102})
        assert [pixels(i) for i in whole["images"][2:]] == [pixels(i) for i in tail["images"]]

    async def test_png_carries_infotext_chunk(self, client: Client) -> None:
        """Each PNG has a tEXt parameters chunk with its own infotext."""
        answer = await generate(client, {"seed": 5, "batch_size": 2, **SMALL})
        texts = info_of(answer)["infotexts"]
        assert [image_of(i).info["parameters"] for i in answer["images"]] == texts

    def test_render_png_is_deterministic(self) -> None:
        """render_png depends on its arguments only, and the seed changes the picture."""
        args: dict[str, Any] = {
            "seed": 1,
            "subseed": 2,
            "subseed_strength": 0.0,
            "prompt": "p",
            "width": 32,
            "height": 24,
            "init_image_digest": None,
            "infotext": "p\nSteps: 20",
        }
        png = render_png(**args)
        assert png == render_png(**args)
        assert render_png(**{**args, "subseed": 3}) == png  # ignored without variation
        with Image.open(io.BytesIO(png)) as image:
            assert (image.size, image.info["parameters"]) == ((32, 24), "p\nSteps: 20")
            first = image.convert("RGB").tobytes()
        with Image.open(io.BytesIO(render_png(**{**args, "seed": 2}))) as image:
            assert image.convert("RGB").tobytes() != first


class TestGrid:
    """A grid leads the images only when the API caller asks to save images."""

    async def test_grid_leads_with_save_images(self, client: Client) -> None:
        """save_images adds a grid at index 0 with the first image's infotext."""
        body = {"seed": 1, "batch_size": 2, "n_iter": 2, "save_images": True, **SMALL}
        answer = await generate(client, body)
        info = info_of(answer)
        assert len(answer["images"]) == 5
        assert info["index_of_first_image"] == 1
        assert info["infotexts"][0] == info["infotexts"][1]
        assert len(info["infotexts"]) == 5
        assert image_of(answer["images"][0]).size == (128, 128)

    async def test_grid_absent_by_default(self, client: Client) -> None:
        """Without save_images the API returns the images alone."""
        answer = await generate(client, {"batch_size": 2, "n_iter": 2, **SMALL})
        assert len(answer["images"]) == 4
        assert info_of(answer)["index_of_first_image"] == 0

    async def test_send_images_false_returns_empty_list(self, client: Client) -> None:
        """send_images false empties images; info still describes every image."""
        answer = await generate(client, {"batch_size": 3, "send_images": False, **SMALL})
        assert answer["images"] == []
        assert len(info_of(answer)["infotexts"]) == 3


class TestImg2img:
    """img2img follows the webui's init image rules."""

    async def test_img2img_without_init_images_is_404(self, client: Client) -> None:
        """Missing init_images is the webui's 404 body."""
        status, body = await call(client, "img2img", SMALL)
        assert (status, body) == (
            404,
            {"error": "HTTPException", "detail": "Init image not found", "body": "", "errors": ""},
        )

    async def test_img2img_two_init_images_shrink_batch(self, client: Client) -> None:
        """Two init images make batch_size 2, but seeds stay sized by the original batch."""
        images = [png_b64((255, 0, 0)), png_b64((0, 0, 255))]
        body = {"init_images": images, "batch_size": 4, "seed": 3, **SMALL}
        answer = await generate(client, body, "img2img")
        info = info_of(answer)
        assert len(answer["images"]) == 2
        assert info["batch_size"] == 2
        assert info["all_seeds"] == [3, 4, 5, 6]
        assert answer["parameters"]["batch_size"] == 4
        assert answer["parameters"]["init_images"] is None
        assert "Denoising strength: 0.75" in info["infotexts"][0]

    async def test_img2img_pixels_follow_the_init_image(self, client: Client) -> None:
        """The init image's content changes pixels; its encoding does not."""
        red = png_b64((255, 0, 0))
        common = {"seed": 9, **SMALL}
        raw = await generate(client, {"init_images": [red], **common}, "img2img")
        uri = await generate(
            client, {"init_images": [f"data:image/png;base64,{red}"], **common}, "img2img"
        )
        blue = await generate(client, {"init_images": [png_b64((0, 0, 255))], **common}, "img2img")
        assert pixels(raw["images"][0]) == pixels(uri["images"][0])
        assert pixels(raw["images"][0]) != pixels(blue["images"][0])

    async def test_img2img_too_many_init_images_is_500(self, client: Client) -> None:
        """More init images than batch_size is the webui's RuntimeError."""
        body = {"init_images": [png_b64((1, 1, 1))] * 3, "batch_size": 2, **SMALL}
        status, answer = await call(client, "img2img", body)
        assert (status, answer) == (
            500,
            {
                "error": "RuntimeError",
                "detail": "",
                "body": "",
                "errors": "bad number of images passed: 3; expecting 2 or less",
            },
        )

    async def test_img2img_bad_image_is_500(self, client: Client) -> None:
        """An undecodable init image is 500 "Invalid encoded image"."""
        status, answer = await call(client, "img2img", {"init_images": ["bm90IGFuIGltYWdl"]})
        assert (status, answer["detail"]) == (500, "Invalid encoded image")


class TestProgress:
    """GET /progress reports the webui's idle and busy shapes."""

    async def test_progress_idle_shape(self, client: Client) -> None:
        """An idle node answers zeros and the stale state."""
        status, progress = await call(client, "progress", method="GET")
        assert status == 200
        assert progress == {
            "progress": 0.0,
            "eta_relative": 0.0,
            "state": {
                "skipped": False,
                "interrupted": False,
                "stopping_generation": False,
                "job": "",
                "job_count": 0,
                "job_timestamp": "0",
                "job_no": 0,
                "sampling_step": 0,
                "sampling_steps": 0,
            },
            "current_image": None,
            "textinfo": None,
        }

    async def test_progress_busy_shape(self) -> None:
        """A running job shows its batch, fraction done, ETA and a preview."""
        async with serving(FakeNodeSettings(per_image_s=2.0)) as (_, client):
            body = {"n_iter": 2, "seed": 1, "steps": 20, "width": 128, "height": 128}
            job = asyncio.create_task(generate(client, body))
            busy = await wait_for_progress(client, lambda p: p["state"]["sampling_step"] >= 1)
            state = busy["state"]
            assert (state["job"], state["job_count"], state["sampling_steps"]) == (
                "Batch 1 out of 2",
                2,
                20,
            )
            expected = 0.01 + state["job_no"] / 2 + state["sampling_step"] / 20 / 2
            assert busy["progress"] == pytest.approx(expected)
            assert busy["eta_relative"] > 0
            assert image_of(busy["current_image"]).format == "PNG"
            status, hidden = await call(client, "progress?skip_current_image=true", method="GET")
            assert (status, hidden["current_image"]) == (200, None)
            await call(client, "interrupt")
            await job
            idle = await wait_for_progress(client, lambda p: p["state"]["job_count"] == 0)
            assert idle["progress"] == 0.0
            assert idle["state"]["interrupted"] is True

    async def test_progress_counts_hires_passes(self) -> None:
        """With hires fix job_count is twice n_iter."""
        async with serving(FakeNodeSettings(per_image_s=20.0)) as (_, client):
            body = {"enable_hr": True, "denoising_strength": 0.5, **SMALL}
            job = asyncio.create_task(generate(client, body))
            busy = await wait_for_progress(client, lambda p: p["state"]["job_count"] > 0)
            assert busy["state"]["job"] == "scripts_txt2img"
            assert busy["state"]["job_count"] == 2
            await call(client, "interrupt")
            answer = await job
            assert image_of(answer["images"][0]).size == (64, 64)  # stopped before the hires pass


class TestInterrupt:
    """Interrupt and skip stop work early the way the webui does."""

    async def test_interrupt_returns_finished_images(self) -> None:
        """Interrupting during iteration 2 returns two images and full-length seeds."""
        async with serving(FakeNodeSettings(per_image_s=0.2)) as (node, client):
            job = asyncio.create_task(generate(client, {"n_iter": 3, "seed": 1, "steps": 20}))
            await wait_for_progress(
                client, lambda p: p["state"]["job_no"] == 1 and p["state"]["sampling_step"] >= 1
            )
            assert await call(client, "interrupt") == (200, {})
            answer = await job
            info = info_of(answer)
            assert len(answer["images"]) == 2
            assert len(info["infotexts"]) == 2
            assert info["all_seeds"] == [1, 2, 3]
            assert node.images_rendered == 2

    async def test_skip_ends_only_the_current_iteration(self) -> None:
        """Skip answers null and the job still renders every iteration."""
        async with serving(FakeNodeSettings(per_image_s=0.2)) as (_, client):
            job = asyncio.create_task(generate(client, {"n_iter": 2, "seed": 1, "steps": 20}))
            await wait_for_progress(client, lambda p: p["state"]["sampling_step"] >= 1)
            assert await call(client, "skip") == (200, None)
            answer = await job
            assert len(answer["images"]) == 2


class TestFaults:
    """Simulated faults fail generation requests in the configured way."""

    async def test_error500_answers_webui_error(self) -> None:
        """error500 answers the webui's RuntimeError body."""
        async with serving(FakeNodeSettings(fault=Fault("error500", after_s=0.01))) as (
            node,
            client,
        ):
            status, body = await call(client, "txt2img", SMALL)
            assert (status, body) == (
                500,
                {"error": "RuntimeError", "detail": "", "body": "", "errors": "simulated failure"},
            )
            assert node.generations == 0

    async def test_fault_times_limits_its_reach(self) -> None:
        """A fault with times=1 fails one request and leaves the next one alone."""
        async with serving(FakeNodeSettings(fault=Fault("error500", times=1))) as (node, client):
            assert (await call(client, "txt2img", SMALL))[0] == 500
            assert (await call(client, "txt2img", SMALL))[0] == 200
            assert node.fault.times == 0
            assert node.generations == 1

    async def test_truncated_sends_half_the_body(self) -> None:
        """truncated answers 200 with the first half of the JSON."""
        async with serving(FakeNodeSettings(fault=Fault("truncated", times=1))) as (_, client):
            body = {"seed": 1, "subseed": 2, **SMALL}
            async with client.post("/sdapi/v1/txt2img", json=body) as resp:
                assert resp.status == 200
                truncated = await resp.read()
            async with client.post("/sdapi/v1/txt2img", json=body) as resp:
                full = await resp.read()
            assert len(truncated) == len(full) // 2
            with pytest.raises(json.JSONDecodeError):
                json.loads(truncated)

    async def test_hang_times_out_then_frees_the_node(self) -> None:
        """hang never answers; once the client gives up the node serves again."""
        async with serving(FakeNodeSettings(fault=Fault("hang", times=1))) as (_, client):
            with pytest.raises(TimeoutError):
                await client.post(
                    "/sdapi/v1/txt2img", json=SMALL, timeout=aiohttp.ClientTimeout(total=0.3)
                )
            assert (await call(client, "txt2img", SMALL))[0] == 200

    async def test_reset_drops_the_connection(self) -> None:
        """reset aborts the TCP connection mid-request."""
        async with serving(FakeNodeSettings(fault=Fault("reset", times=1))) as (_, client):
            with pytest.raises(aiohttp.ClientConnectionError):
                await client.post("/sdapi/v1/txt2img", json=SMALL)
            assert (await call(client, "txt2img", SMALL))[0] == 200

    async def test_exit_ends_the_process(self) -> None:
        """exit makes a node served by serve_fake_node leave with status 3."""
        port = free_port()
        code = (
            "import asyncio, sys\n"
            "from sdproxy.fakewebui import FakeNodeSettings, Fault, serve_fake_node\n"
            "settings = FakeNodeSettings(fault=Fault('exit'))\n"
            "asyncio.run(serve_fake_node(settings, '127.0.0.1', int(sys.argv[1])))\n"
        )
        process = await asyncio.create_subprocess_exec(sys.executable, "-c", code, str(port))
        url = f"http://127.0.0.1:{port}"
        try:
            async with aiohttp.ClientSession() as session:
                await wait_until_serving(url)
                with pytest.raises(aiohttp.ClientConnectionError):
                    await session.post(f"{url}/sdapi/v1/txt2img", json=SMALL)
            assert await asyncio.wait_for(process.wait(), 10) == 3
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()


class TestAuth:
    """--api-auth guards /sdapi/v1 with the webui's 401 bodies."""

    @pytest.mark.parametrize(
        ("header", "detail"),
        [
            (None, "Not authenticated"),
            ("Bearer x", "Not authenticated"),
            ("Basic " + base64.b64encode(b"alice:nope").decode(), "Incorrect username or password"),
            ("Basic " + base64.b64encode(b"eve:secret").decode(), "Incorrect username or password"),
            (
                "Basic " + base64.b64encode(b"no-colon").decode(),
                "Invalid authentication credentials",
            ),
            ("Basic %%%", "Invalid authentication credentials"),
        ],
    )
    async def test_auth_failures_are_401_without_challenge(
        self, header: str | None, detail: str
    ) -> None:
        """Each failure has its detail and no WWW-Authenticate header."""
        headers = {"Authorization": header} if header else {}
        async with (
            serving(FakeNodeSettings(api_auth="alice:secret,bob:pw")) as (_, client),
            client.get("/sdapi/v1/sd-models", headers=headers) as resp,
        ):
            assert resp.status == 401
            assert await resp.json() == {
                "error": "HTTPException",
                "detail": detail,
                "body": "",
                "errors": "",
            }
            assert "WWW-Authenticate" not in resp.headers
            assert "X-Process-Time" in resp.headers

    async def test_auth_good_credentials_and_open_routes(self) -> None:
        """Good credentials pass; loras, refresh-loras and /internal/ping need none."""
        async with serving(FakeNodeSettings(api_auth="alice:secret,bob:pw")) as (_, client):
            auth = {"Authorization": aiohttp.encode_basic_auth("bob", "pw")}
            async with client.get("/sdapi/v1/sd-models", headers=auth) as resp:
                assert resp.status == 200
            for method, path in [
                ("GET", "/sdapi/v1/loras"),
                ("POST", "/sdapi/v1/refresh-loras"),
                ("GET", "/internal/ping"),
            ]:
                async with client.request(method, path) as resp:
                    assert resp.status == 200, path

    async def test_bad_json_is_422_before_auth(self) -> None:
        """FastAPI decodes the body before the auth dependency runs."""
        async with serving(FakeNodeSettings(api_auth="alice:secret")) as (_, client):
            headers = {"Content-Type": "application/json"}
            async with client.post("/sdapi/v1/txt2img", data=b"[", headers=headers) as resp:
                assert resp.status == 422
            async with client.post("/sdapi/v1/txt2img", json={"seed": "x"}) as resp:
                assert resp.status == 401


class TestScripts:
    """Script names are checked against the node's /scripts lists."""

    async def test_unknown_alwayson_script_is_422(self, client: Client) -> None:
        """An always-on key the node lacks is the webui's "Script not found"."""
        body = {"alwayson_scripts": {"ControlNet": {"args": []}}, **SMALL}
        status, answer = await call(client, "txt2img", body)
        assert (status, answer) == (
            422,
            {
                "error": "HTTPException",
                "detail": "Script 'ControlNet' not found",
                "body": "",
                "errors": "",
            },
        )

    async def test_unknown_script_name_is_422(self, client: Client) -> None:
        """A script_name that is not a selectable script is rejected the same way."""
        status, answer = await call(client, "txt2img", {"script_name": "lora", **SMALL})
        assert (status, answer["detail"]) == (422, "Script 'lora' not found")

    async def test_listed_scripts_are_accepted(self) -> None:
        """Listed titles match case-insensitively, for script_name and always-on keys."""
        settings = FakeNodeSettings(scripts_txt2img=("x/y/z plot", "controlnet", "adetailer"))
        async with serving(settings) as (_, client):
            body = {
                "script_name": "X/Y/Z plot",
                "alwayson_scripts": {"ControlNet": {"args": []}, "ADetailer": {"args": [False]}},
                **SMALL,
            }
            assert (await call(client, "txt2img", body))[0] == 200
            _, scripts = await call(client, "scripts", method="GET")
            assert scripts["txt2img"] == ["x/y/z plot", "controlnet", "adetailer"]


class TestOtherEndpoints:
    """The rest of the API answers enough for a cluster proxy."""

    async def test_routing_errors_use_fastapi_bodies(self, client: Client) -> None:
        """Unknown routes and wrong methods answer FastAPI's plain bodies."""
        async with client.get("/nope") as resp:
            assert (resp.status, await resp.json()) == (404, {"detail": "Not Found"})
            assert "X-Process-Time" in resp.headers
        async with client.get("/sdapi/v1/txt2img") as resp:
            assert (resp.status, await resp.json()) == (405, {"detail": "Method Not Allowed"})

    async def test_options_switches_checkpoint(self) -> None:
        """POST options changes the checkpoint that info reports; unknown ones are a 500."""
        other = "sd_xl_base_1.0.safetensors [31e35c80fc]"
        async with serving(FakeNodeSettings(models=(TITLE, other))) as (_, client):
            assert await call(client, "options", {"sd_model_checkpoint": other}) == (200, None)
            _, options = await call(client, "options", method="GET")
            assert options["sd_model_checkpoint"] == other
            info = info_of(await generate(client, SMALL))
            assert (info["sd_model_name"], info["sd_model_hash"]) == (
                "sd_xl_base_1.0",
                "31e35c80fc",
            )
            status, body = await call(client, "options", {"sd_model_checkpoint": "x"})
            assert (status, body) == (
                500,
                {
                    "error": "RuntimeError",
                    "detail": "",
                    "body": "",
                    "errors": "model 'x' not found",
                },
            )
            status, body = await call(client, "options", {"no_such_option": 1})
            assert (status, body["error"], body["errors"]) == (500, "KeyError", "'no_such_option'")

    async def test_catalogue_endpoints_answer_webui_shapes(self) -> None:
        """Models, samplers, flags and the action routes answer the webui's shapes."""
        async with serving(FakeNodeSettings(api_auth="u:p")) as (_, client):
            auth = {"Authorization": aiohttp.encode_basic_auth("u", "p")}

            async def get(path: str, method: str = "GET") -> Any:
                async with client.request(method, f"/sdapi/v1/{path}", headers=auth) as resp:
                    assert resp.status == 200, path
                    return await resp.json()

            (model,) = await get("sd-models")
            assert model["title"] == TITLE
            assert model["hash"] == "6ce0161689"
            assert model["sha256"].startswith("6ce0161689")
            assert {"DPM++ 2M", "Euler a", "Euler"} <= {s["name"] for s in await get("samplers")}
            assert (await get("cmd-flags"))["api_auth"] == "u:p"
            assert await get("loras") == []
            assert await get("refresh-checkpoints", "POST") is None
            assert await get("unload-checkpoint", "POST") == {}
            assert "cuda" in await get("memory")

    async def test_png_info_reads_back_the_infotext(self, client: Client) -> None:
        """png-info returns a generated image's infotext and its parsed fields."""
        answer = await generate(client, {"prompt": "a, b", "seed": 4, **SMALL})
        status, body = await call(client, "png-info", {"image": answer["images"][0]})
        assert status == 200
        assert body["info"] == info_of(answer)["infotexts"][0]
        assert body["parameters"] == parse_infotext(body["info"])
        assert (body["parameters"]["Prompt"], body["parameters"]["Seed"]) == ("a, b", "4")
        assert (body["parameters"]["Size-1"], body["parameters"]["Size-2"]) == ("64", "64")


class TestServe:
    """serve_fake_node serves until cancelled."""

    async def test_serve_fake_node_stops_on_cancel(self) -> None:
        """The node answers while running and its task ends cancelled."""
        port = free_port()
        task = asyncio.create_task(serve_fake_node(FakeNodeSettings(), "127.0.0.1", port))
        await wait_until_serving(f"http://127.0.0.1:{port}")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
