"""A simulated AUTOMATIC1111 webui v1.10.1 node (no GPU) for tests, the demo and benchmarks."""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hmac
import json
import os
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from aiohttp import web
from PIL import Image

from sdproxy.fakewebui_model import (
    DEFAULT_SAMPLERS,
    DEFAULT_SCRIPTS_IMG2IMG,
    DEFAULT_SCRIPTS_TXT2IMG,
    IMG2IMG_FIELDS,
    LATENT_MODES,
    REQUIRED,
    SELECTABLE_SCRIPTS,
    TXT2IMG_FIELDS,
    Checkpoint,
    FieldSpec,
    Generation,
    InvalidValue,
    JobPlan,
    Kind,
    RequestValidationError,
    WebuiError,
    apply_overrides,
    b64_png,
    check_scripts,
    cmd_flags,
    coerce,
    decode_image,
    default_options,
    encode_png,
    find_checkpoint,
    image_digest,
    image_grid,
    info_json,
    infotext,
    memory_stats,
    parse_checkpoint,
    parse_infotext,
    parse_json_body,
    plan_job,
    render_image,
    render_png,
    sampler_entries,
    scheduler_entries,
    upscaler_entries,
    validate_request,
)

__all__ = [
    "FakeNode",
    "FakeNodeSettings",
    "Fault",
    "create_fake_app",
    "render_png",
    "serve_fake_node",
]

FaultMode = Literal["none", "error500", "hang", "reset", "truncated", "exit", "slow"]


@dataclass
class Fault:
    """A failure the node should simulate on its next generation requests."""

    mode: FaultMode = "none"
    after_s: float = 0.0  # seconds into the generation before the fault strikes
    times: int | None = None  # how many generation requests it applies to (None = all)
    slow_factor: float = 10.0  # for "slow": generation takes this many times longer


@dataclass
class FakeNodeSettings:
    """What a fake node is: its speed, models, scripts, credentials and simulated fault."""

    name: str = "fake"
    per_image_s: float = 0.0  # seconds per image at 20 steps, 512x512
    overhead_s: float = 0.0  # fixed seconds per generation request
    models: tuple[str, ...] = ("v1-5-pruned-emaonly.safetensors [6ce0161689]",)
    api_auth: str | None = None  # "user:pass,user2:pass2" like --api-auth
    version: str = "v1.10.1"
    scripts_txt2img: tuple[str, ...] = DEFAULT_SCRIPTS_TXT2IMG
    scripts_img2img: tuple[str, ...] = DEFAULT_SCRIPTS_IMG2IMG
    samplers: tuple[str, ...] = DEFAULT_SAMPLERS
    fault: Fault = field(default_factory=Fault)
    model_load_s: float = 0.0  # seconds a checkpoint change takes
    loras: tuple[str, ...] = ()
    embeddings: tuple[str, ...] = ()
    vaes: tuple[str, ...] = ()
    gradio_auth: str | None = None  # shows up in cmd-flags only, like --gradio-auth


@dataclass
class ProgressState:
    """shared.state: what GET /progress reports, stale fields included."""

    skipped: bool = False
    interrupted: bool = False
    stopping_generation: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    time_start: float = 0.0
    preview: str | None = None

    def begin(self, job: str) -> None:
        self.sampling_step = 0
        self.time_start = time.time()
        self.job_count = -1
        self.job_no = 0
        self.job_timestamp = datetime.now().strftime("%Y%m%d%H%M%S")
        self.preview = None
        self.skipped = self.interrupted = self.stopping_generation = False
        self.job = job

    def nextjob(self) -> None:
        self.job_no += 1
        self.sampling_step = 0

    def end(self) -> None:
        # Like the webui, only these two are reset; the rest stays stale while idle.
        self.job = ""
        self.job_count = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "skipped": self.skipped,
            "interrupted": self.interrupted,
            "stopping_generation": self.stopping_generation,
            "job": self.job,
            "job_count": self.job_count,
            "job_timestamp": self.job_timestamp,
            "job_no": self.job_no,
            "sampling_step": self.sampling_step,
            "sampling_steps": self.sampling_steps,
        }

    def progress(self, *, skip_current_image: bool) -> dict[str, Any]:
        """Api.progressapi."""
        if self.job_count == 0:
            return {
                "progress": 0.0,
                "eta_relative": 0.0,
                "state": self.as_dict(),
                "current_image": None,
                "textinfo": None,
            }
        progress = 0.01
        if self.job_count > 0:
            progress += self.job_no / self.job_count
        if self.sampling_steps > 0:
            progress += 1 / self.job_count * self.sampling_step / self.sampling_steps
        elapsed = time.time() - self.time_start
        return {
            "progress": min(progress, 1.0),
            "eta_relative": elapsed / progress - elapsed if progress else 0.0,
            "state": self.as_dict(),
            "current_image": None if skip_current_image else self.preview,
            "textinfo": None,
        }


@functools.lru_cache(maxsize=64)
def _checkpoints(models: tuple[str, ...]) -> tuple[Checkpoint, ...]:
    return tuple(parse_checkpoint(title) for title in models)


class FakeNode:
    """Mutable state of one simulated node (tests may change settings/fault between requests)."""

    def __init__(self, settings: FakeNodeSettings) -> None:
        self.settings = settings
        self.generations = 0  # generation requests completed
        self.images_rendered = 0
        self.state = ProgressState()
        self.queue_lock = asyncio.Lock()  # the webui's queue_lock: one job at a time
        self.rng = random.Random()
        self.requests: Counter[str] = Counter()  # "POST /sdapi/v1/skip": calls received
        first = self.checkpoints()[0]
        self.options: dict[str, Any] = default_options(first, settings.version)
        self.loaded_title = first.title
        self._jobs: set[asyncio.Task[bytes | None]] = set()

    @property
    def fault(self) -> Fault:
        return self.settings.fault

    @fault.setter
    def fault(self, value: Fault) -> None:
        self.settings.fault = value

    def checkpoints(self) -> tuple[Checkpoint, ...]:
        return _checkpoints(tuple(self.settings.models))

    def take_fault(self) -> Fault:
        """The fault for one generation request, counting it against ``times``."""
        fault = self.settings.fault
        if fault.mode == "none" or (fault.times is not None and fault.times <= 0):
            return Fault()
        if fault.times is not None:
            fault.times -= 1
        return Fault(fault.mode, fault.after_s, None, fault.slow_factor)

    async def load_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Simulated weight loading; the caller holds the queue lock."""
        if checkpoint.title != self.loaded_title:
            await asyncio.sleep(self.settings.model_load_s)
            self.loaded_title = checkpoint.title

    def spawn(self, job: Awaitable[bytes | None]) -> asyncio.Task[bytes | None]:
        """Run a job that outlives its client, as the webui's worker thread does."""
        task = asyncio.ensure_future(job)
        self._jobs.add(task)
        task.add_done_callback(self._job_done)
        return task

    def _job_done(self, task: asyncio.Task[bytes | None]) -> None:
        self._jobs.discard(task)
        if not task.cancelled():
            task.exception()  # an abandoned job's error was meant for a client that left

    async def aclose(self) -> None:
        """Cancel running jobs (app shutdown)."""
        jobs = list(self._jobs)
        for task in jobs:
            task.cancel()
        # Partial results are deliberate: each job only needs to have stopped.
        await asyncio.gather(*jobs, return_exceptions=True)


# --- generation ---------------------------------------------------------------------------------


class _Job:
    """One txt2img/img2img request from the queue lock to the response body."""

    def __init__(
        self,
        node: FakeNode,
        request: web.Request,
        mode: str,
        req: dict[str, Any],
        mask: Image.Image | None,
        fault: Fault,
    ) -> None:
        self.node, self.request, self.mode, self.req = node, request, mode, req
        self.mask, self.fault = mask, fault
        self.factor = fault.slow_factor if fault.mode == "slow" else 1.0

    async def run(self) -> bytes | None:
        node = self.node
        async with node.queue_lock:
            digests: list[bytes] = []
            if self.mode == "img2img":  # the webui decodes these inside the lock, before begin()
                digests = await asyncio.to_thread(self._init_digests)
            node.state.begin(f"scripts_{self.mode}")
            try:
                body = await self._with_fault(digests)
            finally:
                node.state.end()
        if body is not None and self.fault.mode == "truncated":
            return body[: len(body) // 2]
        if body is not None:
            node.generations += 1
        return body

    def _init_digests(self) -> list[bytes]:
        return [image_digest(decode_image(encoded)) for encoded in self.req["init_images"]]

    async def _with_fault(self, digests: list[bytes]) -> bytes | None:
        if self.fault.mode not in ("error500", "reset", "exit", "hang"):
            return await self._process(digests)
        try:
            async with asyncio.timeout(self.fault.after_s):
                await self._process(digests)
                await asyncio.Event().wait()  # work done early: the fault is still due
        except TimeoutError:
            pass
        if self.fault.mode == "error500":
            raise WebuiError(500, "RuntimeError", errors="simulated failure")
        if self.fault.mode == "exit":
            os._exit(3)
        transport = self.request.transport
        if self.fault.mode == "reset":
            if transport is not None:
                transport.abort()
            return None
        # "hang": hold the queue until the client gives up. aiohttp has no disconnect event,
        # and it may not cancel the handler, so watch the transport.
        while transport is not None and not transport.is_closing():
            await asyncio.sleep(0.05)
            transport = self.request.transport
        return None

    def _fixed_seed(self, seed: int | None) -> int:
        return self.node.rng.randrange(4294967294) if seed is None or seed == -1 else seed

    async def _process(self, digests: list[bytes]) -> bytes:
        """process_images: overrides, model, plan, then the sampling loop."""
        node, req = self.node, self.req
        checkpoints = node.checkpoints()
        opts, applied, checkpoint = apply_overrides(
            node.options, req["override_settings"], checkpoints
        )
        await node.load_checkpoint(checkpoint)
        if not req["override_settings_restore_afterwards"]:
            node.options.update(applied)
        mask_blank = None
        if (mask := self.mask) is not None:
            mask_blank = await asyncio.to_thread(lambda: mask.convert("L").getbbox() is None)
        plan = plan_job(
            self.mode,
            req,
            seed=self._fixed_seed(req["seed"]),
            subseed=self._fixed_seed(req["subseed"]),
            opts=opts,
            checkpoint=checkpoint,
            checkpoints=checkpoints,
            samplers=node.settings.samplers,
            init_digests=digests,
            mask_blank=mask_blank,
            version=node.settings.version,
        )
        return await self._sample(plan, opts)

    async def _steps(self, steps: int, images: int, size: tuple[int, int]) -> None:
        """One sampling pass; stops after the current step on interrupt or skip."""
        state, settings = self.node.state, self.node.settings
        state.sampling_steps, state.sampling_step = steps, 0
        step_s = settings.per_image_s * images * size[0] * size[1] / (512 * 512) / 20
        step_s *= self.factor
        if step_s <= 0:
            state.sampling_step = steps
            return
        loop = asyncio.get_running_loop()
        started = loop.time()
        for step in range(1, steps + 1):
            if state.interrupted or state.skipped:
                return
            # Sleep to a deadline so many short steps don't pile up timer slack.
            await asyncio.sleep(max(0.0, started + step * step_s - loop.time()))
            state.sampling_step = step

    async def _sample(self, plan: JobPlan, opts: dict[str, Any]) -> bytes:
        """process_images_inner's loop over iterations, then the grid and the response body."""
        node, gen = self.node, plan.gen
        state, batch = node.state, gen.batch_size
        state.job_count = plan.n_iter * (1 if plan.hr_steps is None else 2)
        await asyncio.sleep(node.settings.overhead_s * self.factor)
        # The API sets do_not_save_grid = not save_images; return_grid puts it in the answer.
        want_grid = bool(self.req["save_images"] and opts["return_grid"])
        pnginfo = bool(opts["enable_pnginfo"])
        pictures: list[Image.Image] = []
        pngs: list[bytes] = []
        texts: list[str] = []
        for n in range(plan.n_iter):
            if state.skipped:
                state.skipped = False
            if state.interrupted or state.stopping_generation:
                break
            if plan.n_iter > 1:
                state.job = f"Batch {n + 1} out of {plan.n_iter}"
            ks = [n * batch + i for i in range(batch)]
            state.preview = await asyncio.to_thread(_preview, gen, ks[0], plan.first_size)
            await self._steps(plan.first_steps, batch, plan.first_size)
            size = plan.first_size
            if plan.hr_steps is not None and not state.interrupted:
                state.nextjob()
                await self._steps(plan.hr_steps, batch, plan.hr_size)
                size = plan.hr_size
            state.nextjob()
            batch_texts = [infotext(gen, k) for k in ks]
            rendered = await asyncio.to_thread(
                _render, gen, ks, plan.digests, size, batch_texts if pnginfo else None
            )
            node.images_rendered += len(rendered)
            texts.extend(batch_texts)
            pngs.extend(png for _, png in rendered)
            if want_grid:
                pictures.extend(picture for picture, _ in rendered)
        if not texts:
            texts.append(infotext(gen, 0))
        index_of_first_image = 0
        if want_grid and (len(pngs) >= 2 or (pngs and not opts["grid_only_if_multiple"])):
            main = infotext(gen, 0)
            grid = await asyncio.to_thread(
                lambda: encode_png(image_grid(pictures), main if pnginfo else None)
            )
            pngs.insert(0, grid)
            texts.insert(0, main)
            index_of_first_image = 1
        info = info_json(gen, texts, index_of_first_image, state.job_timestamp)
        return await asyncio.to_thread(self._body, pngs, info)

    def _body(self, pngs: list[bytes], info: str) -> bytes:
        parameters = dict(self.req)
        if self.mode == "img2img" and not parameters["include_init_images"]:
            parameters["init_images"] = parameters["mask"] = None
        images = [b64_png(png) for png in pngs] if self.req["send_images"] else []
        return _dumps({"images": images, "parameters": parameters, "info": info})


def _render(
    gen: Generation,
    ks: list[int],
    digests: list[bytes | None],
    size: tuple[int, int],
    texts: list[str] | None,
) -> list[tuple[Image.Image, bytes]]:
    """Images k of the job, each from its own seed, prompt and init image only."""
    rendered = []
    for i, k in enumerate(ks):
        picture = render_image(
            seed=gen.all_seeds[k],
            subseed=gen.all_subseeds[k],
            subseed_strength=gen.subseed_strength,
            prompt=gen.all_prompts[k],
            width=size[0],
            height=size[1],
            init_image_digest=digests[i],
        )
        rendered.append((picture, encode_png(picture, texts[i] if texts else None)))
    return rendered


def _preview(gen: Generation, k: int, size: tuple[int, int]) -> str:
    """A small live preview for /progress (base64 PNG, no data: prefix)."""
    picture = render_image(
        seed=gen.all_seeds[k],
        subseed=gen.all_subseeds[k],
        subseed_strength=gen.subseed_strength,
        prompt=gen.all_prompts[k],
        width=max(1, size[0] // 8),
        height=max(1, size[1] // 8),
        init_image_digest=None,
    )
    return b64_png(encode_png(picture, None))


async def _generate(node: FakeNode, request: web.Request, payload: Any) -> web.Response:
    mode = request.match_info["mode"]
    req = validate_request(TXT2IMG_FIELDS if mode == "txt2img" else IMG2IMG_FIELDS, payload)
    mask = None
    if mode == "img2img":
        if req["init_images"] is None:
            raise WebuiError.http(404, "Init image not found")
        if req["mask"]:
            mask = await asyncio.to_thread(decode_image, req["mask"])
    settings = node.settings
    check_scripts(settings.scripts_txt2img if mode == "txt2img" else settings.scripts_img2img, req)
    job = node.spawn(_Job(node, request, mode, req, mask, node.take_fault()).run())
    # Shielded: like the webui, a job goes on when its client disconnects.
    body = await asyncio.shield(job)
    return web.Response(body=body or b"", content_type="application/json")


# --- other endpoints ----------------------------------------------------------------------------

Endpoint = Callable[[FakeNode, web.Request, Any], Awaitable[Any]]


def _dumps(value: Any) -> bytes:
    """FastAPI's JSONResponse rendering."""
    text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.encode()


def _json(value: Any, status: int = 200) -> web.Response:
    return web.Response(body=_dumps(value), status=status, content_type="application/json")


def _body_model(payload: Any, *rows: tuple[str, Kind, Any]) -> dict[str, Any]:
    """A small pydantic request model (png-info, interrogate, extras)."""
    return validate_request([FieldSpec(n, k, d, nullable=False) for n, k, d in rows], payload)


async def _progress(node: FakeNode, request: web.Request, _: Any) -> Any:
    raw = request.query.get("skip_current_image", "false")
    try:
        skip = bool(coerce("bool", raw))
    except InvalidValue:
        loc = ["query", "skip_current_image"]
        msg = "value could not be parsed to a boolean"
        raise RequestValidationError(
            [{"loc": loc, "msg": msg, "type": "type_error.bool"}]
        ) from None
    return node.state.progress(skip_current_image=skip)


async def _interrupt(node: FakeNode, _: web.Request, __: Any) -> Any:
    node.state.interrupted = True
    return {}


async def _skip(node: FakeNode, _: web.Request, __: Any) -> Any:
    node.state.skipped = True
    return None


async def _get_options(node: FakeNode, _: web.Request, __: Any) -> Any:
    return node.options


async def _set_options(node: FakeNode, _: web.Request, payload: Any) -> Any:
    """Api.set_config: a checkpoint change loads under the queue lock before answering."""
    if payload is None:
        missing = {"loc": ["body"], "msg": "field required", "type": "value_error.missing"}
        raise RequestValidationError([missing])
    try:
        changes: dict[str, Any] = coerce("dict_str", payload)
    except InvalidValue:
        invalid = {"loc": ["body"], "msg": "value is not a valid dict", "type": "type_error.dict"}
        raise RequestValidationError([invalid]) from None
    name = changes.get("sd_model_checkpoint")
    checkpoint = find_checkpoint(name, node.checkpoints())
    if name is not None and checkpoint is None:
        raise WebuiError(500, "RuntimeError", errors=f"model {name!r} not found")
    for key, value in changes.items():
        if node.options.get(key) == value:
            continue
        if key not in node.options:
            raise WebuiError(500, "KeyError", errors=repr(key))
        if key == "sd_model_checkpoint" and checkpoint is not None:
            async with node.queue_lock:
                await node.load_checkpoint(checkpoint)
            node.options["sd_model_checkpoint"] = checkpoint.title
            node.options["sd_checkpoint_hash"] = checkpoint.sha256
        else:
            node.options[key] = value
    return None


async def _png_info(_: FakeNode, __: web.Request, payload: Any) -> Any:
    encoded = _body_model(payload, ("image", "str", REQUIRED))["image"].strip()
    if not encoded:
        return {"info": "", "items": {}, "parameters": {}}
    image = await asyncio.to_thread(decode_image, encoded)
    items = {k: v for k, v in image.info.items() if isinstance(k, str) and isinstance(v, str)}
    geninfo = items.pop("parameters", "")
    return {"info": geninfo, "items": items, "parameters": parse_infotext(geninfo)}


async def _interrogate(node: FakeNode, _: web.Request, payload: Any) -> Any:
    req = _body_model(payload, ("image", "str", ""), ("model", "str", "clip"))
    image = await asyncio.to_thread(decode_image, req["image"])
    if req["model"] not in ("clip", "deepdanbooru"):
        raise WebuiError.http(404, "Model not found")
    async with node.queue_lock:
        tag = (await asyncio.to_thread(image_digest, image)).hex()[:8]
    if req["model"] == "clip":
        return {"caption": f"a simulated picture {tag}"}
    return {"caption": f"simulated, picture_{tag}"}


async def _extra_single_image(node: FakeNode, _: web.Request, payload: Any) -> Any:
    req = _body_model(
        payload,
        ("resize_mode", "int", 0),
        ("upscaling_resize", "float", 2.0),
        ("upscaling_resize_w", "int", 512),
        ("upscaling_resize_h", "int", 512),
        ("upscaler_1", "str", "None"),
        ("image", "str", ""),
    )
    image = await asyncio.to_thread(decode_image, req["image"])

    def upscale() -> str:
        result = image.convert("RGB")
        if req["upscaler_1"] != "None":
            scale = req["upscaling_resize"]
            size = (int(result.width * scale), int(result.height * scale))
            if req["resize_mode"] != 0:
                size = (req["upscaling_resize_w"], req["upscaling_resize_h"])
            result = result.resize(size)
        return b64_png(encode_png(result, None))

    async with node.queue_lock:
        encoded = await asyncio.to_thread(upscale)
    return {"html_info": "", "image": encoded}


async def _extra_batch_images(node: FakeNode, _: web.Request, payload: Any) -> Any:
    """Api.extras_batch_images: each of imageList[{data, name}] through the same upscaler."""
    req = _body_model(payload, ("imageList", "list", []), ("upscaling_resize", "float", 2.0))
    results = []
    for index, item in enumerate(req["imageList"]):
        if not isinstance(item, dict) or not isinstance(item.get("data"), str):
            loc = ["body", "imageList", index, "data"]
            raise RequestValidationError(
                [{"loc": loc, "msg": "field required", "type": "value_error.missing"}]
            )
        single = dict(payload, image=item["data"])
        single.pop("imageList", None)
        results.append((await _extra_single_image(node, _, single))["image"])
    return {"html_info": "", "images": results}


def _embedding(node: FakeNode, name: str) -> dict[str, Any]:
    checkpoint = node.checkpoints()[0]
    return {
        "step": None,
        "sd_checkpoint": checkpoint.shorthash,
        "sd_checkpoint_name": checkpoint.model_name,
        "shape": 768,
        "vectors": 1,
    }


def _static(value: Callable[[FakeNode], Any]) -> Endpoint:
    async def endpoint(node: FakeNode, _: web.Request, __: Any) -> Any:
        return value(node)

    return endpoint


def _script_info(node: FakeNode) -> Any:
    settings = node.settings
    return [
        {"name": name, "is_alwayson": name not in SELECTABLE_SCRIPTS, "is_img2img": img2img}
        | {"args": []}
        for img2img, names in ((False, settings.scripts_txt2img), (True, settings.scripts_img2img))
        for name in names
    ]


_GETS: dict[str, Endpoint] = {
    "sd-models": _static(lambda node: [c.entry() for c in node.checkpoints()]),
    "options": _get_options,
    "samplers": _static(lambda node: sampler_entries(node.settings.samplers)),
    "schedulers": _static(lambda _: scheduler_entries()),
    "upscalers": _static(lambda _: upscaler_entries()),
    "latent-upscale-modes": _static(lambda _: [{"name": name} for name in LATENT_MODES]),
    "sd-vae": _static(
        lambda node: [
            {"model_name": name, "filename": f"/stable-diffusion-webui/models/VAE/{name}"}
            for name in node.settings.vaes
        ]
    ),
    "hypernetworks": _static(lambda _: []),
    "face-restorers": _static(
        lambda _: [{"name": "CodeFormer", "cmd_dir": None}, {"name": "GFPGAN", "cmd_dir": None}]
    ),
    "realesrgan-models": _static(lambda _: []),
    "prompt-styles": _static(lambda _: []),
    "embeddings": _static(
        lambda node: {
            "loaded": {name: _embedding(node, name) for name in node.settings.embeddings},
            "skipped": {},
        }
    ),
    "extensions": _static(lambda _: []),
    "scripts": _static(
        lambda node: {
            "txt2img": list(node.settings.scripts_txt2img),
            "img2img": list(node.settings.scripts_img2img),
        }
    ),
    "script-info": _static(_script_info),
    "memory": _static(lambda _: memory_stats()),
    "cmd-flags": _static(
        lambda node: cmd_flags(node.settings.api_auth) | {"gradio_auth": node.settings.gradio_auth}
    ),
    "progress": _progress,
    "loras": _static(
        lambda node: [
            {
                "name": name,
                "alias": name,
                "path": f"/stable-diffusion-webui/models/Lora/{name}.safetensors",
                "metadata": {},
            }
            for name in node.settings.loras
        ]
    ),
}
_POSTS: dict[str, tuple[Endpoint, bool]] = {  # path: (endpoint, takes a JSON body)
    "options": (_set_options, True),
    "interrupt": (_interrupt, False),
    "skip": (_skip, False),
    "refresh-checkpoints": (_static(lambda _: None), False),
    "refresh-vae": (_static(lambda _: None), False),
    "refresh-embeddings": (_static(lambda _: None), False),
    "refresh-loras": (_static(lambda _: None), False),
    "unload-checkpoint": (_static(lambda _: {}), False),
    "reload-checkpoint": (_static(lambda _: {}), False),
    "png-info": (_png_info, True),
    "interrogate": (_interrogate, True),
    "extra-single-image": (_extra_single_image, True),
    "extra-batch-images": (_extra_batch_images, True),
}
_CONTROLNET: dict[str, Callable[[FakeNode], Any]] = {
    "version": lambda _: {"version": 2},
    "model_list": lambda _: {"model_list": ["control_v11p_sd15_canny [d14c016b]"]},
    "module_list": lambda _: {"module_list": ["none", "canny", "depth"]},
}
# The Lora extension registers these itself, outside Api.add_api_route and its auth.
_OPEN = frozenset({"loras", "refresh-loras"})


# --- HTTP plumbing ------------------------------------------------------------------------------

_NODE_KEY = web.AppKey("fake_node", FakeNode)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _check_auth(api_auth: str | None, header: str | None) -> None:
    """FastAPI's HTTPBasic plus Api.auth; the 401s go out without WWW-Authenticate."""
    if not api_auth:
        return
    scheme, _, param = (header or "").partition(" ")
    if not header or scheme.lower() != "basic":
        raise WebuiError.http(401, "Not authenticated")
    try:
        decoded = base64.b64decode(param).decode("ascii")
    except (ValueError, binascii.Error):
        raise WebuiError.http(401, "Invalid authentication credentials") from None
    username, separator, password = decoded.partition(":")
    if not separator:
        raise WebuiError.http(401, "Invalid authentication credentials")
    credentials = dict(entry.partition(":")[::2] for entry in api_auth.split(","))
    expected = credentials.get(username)
    # Compare even for an unknown user, so timing does not tell which names exist.
    matches = hmac.compare_digest(password.encode(), (expected or "\0" + password).encode())
    if expected is None or not matches:
        raise WebuiError.http(401, "Incorrect username or password")


def _handler(endpoint: Endpoint, *, body: bool, auth: bool) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        node = request.app[_NODE_KEY]
        node.requests[f"{request.method} {request.path}"] += 1
        # FastAPI decodes the JSON body before dependencies run, so bad JSON beats a 401.
        payload = None
        if body:
            payload = parse_json_body(await request.read(), request.headers.get("Content-Type"))
        if auth:
            _check_auth(node.settings.api_auth, request.headers.get("Authorization"))
        result = await endpoint(node, request, payload)
        return result if isinstance(result, web.StreamResponse) else _json(result)

    return handle


@web.middleware
async def _webui_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """api_middleware: webui error bodies and X-Process-Time on every response."""
    started = time.perf_counter()
    response: web.StreamResponse
    try:
        response = await handler(request)
    except web.HTTPException as exc:  # routing errors keep starlette's plain shape
        response = _json({"detail": exc.reason}, status=exc.status)
        if isinstance(exc, web.HTTPMethodNotAllowed):
            response.headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
    except RequestValidationError as exc:
        response = _json({"detail": exc.errors}, status=422)
    except WebuiError as exc:
        response = _json(exc.body(), status=exc.status)
    except Exception as exc:  # the webui answers any other exception the same way
        error = {"error": type(exc).__name__, "detail": "", "body": "", "errors": str(exc)}
        response = _json(error, status=500)
    response.headers["X-Process-Time"] = str(round(time.perf_counter() - started, 4))
    return response


def create_fake_app(node: FakeNode) -> web.Application:
    """The node's aiohttp application: the /sdapi/v1 routes plus /internal/ping."""
    app = web.Application(middlewares=[_webui_middleware], client_max_size=1024**3)
    app[_NODE_KEY] = node
    add = app.router.add_route
    add("POST", "/sdapi/v1/{mode:txt2img|img2img}", _handler(_generate, body=True, auth=True))
    for path, endpoint in _GETS.items():
        add("GET", f"/sdapi/v1/{path}", _handler(endpoint, body=False, auth=path not in _OPEN))
    for path, (endpoint, body) in _POSTS.items():
        add("POST", f"/sdapi/v1/{path}", _handler(endpoint, body=body, auth=path not in _OPEN))
    add("GET", "/internal/ping", _handler(_static(lambda _: {}), body=False, auth=False))
    # A small part of the ControlNet extension's routes, registered at the host root.
    for path, answer in _CONTROLNET.items():
        add("GET", f"/controlnet/{path}", _handler(_static(answer), body=False, auth=False))

    async def stop_jobs(_: web.Application) -> None:
        await node.aclose()

    app.on_shutdown.append(stop_jobs)
    return app


async def serve_fake_node(settings: FakeNodeSettings, host: str, port: int) -> None:
    """Run a fake node until cancelled (used by `sdproxy fake-node` and `sdproxy demo`)."""
    runner = web.AppRunner(create_fake_app(FakeNode(settings)), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
