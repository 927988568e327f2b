"""Running one fake txt2img/img2img job: queue lock, steps, faults, response body."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from aiohttp import web
from PIL import Image

from sdproxy.fakewebui.catalog import check_scripts
from sdproxy.fakewebui.faults import (
    IN_THE_WAY,
    answer_in_the_way,
    lie_in_images,
    lie_in_info,
    lie_in_plan,
    lie_in_request,
)
from sdproxy.fakewebui.infotext import Generation, info_json, infotext
from sdproxy.fakewebui.model import (
    IMG2IMG_FIELDS,
    TXT2IMG_FIELDS,
    WebuiError,
    dump_json,
    validate_request,
)
from sdproxy.fakewebui.node import FakeNode, Fault
from sdproxy.fakewebui.pixels import (
    b64_png,
    decode_image,
    encode_png,
    image_digest,
    image_grid,
    render_image,
)
from sdproxy.fakewebui.planning import JobPlan, apply_overrides, plan_job


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
            lie_in_request(self.fault, req),
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
        return await self._sample(lie_in_plan(self.fault, plan), opts)

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
                _render,
                gen,
                ks,
                plan.digests,
                size,
                batch_texts if pnginfo else None,
                node.settings.realistic_images,
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
        info = lie_in_info(
            self.fault, info_json(gen, texts, index_of_first_image, state.job_timestamp)
        )
        return await asyncio.to_thread(self._body, pngs, info)

    def _body(self, pngs: list[bytes], info: str) -> bytes:
        parameters = dict(self.req)
        if self.mode == "img2img" and not parameters["include_init_images"]:
            parameters["init_images"] = parameters["mask"] = None
        images = [b64_png(png) for png in pngs] if self.req["send_images"] else []
        images = lie_in_images(self.fault, images)
        return dump_json({"images": images, "parameters": parameters, "info": info})


def _render(
    gen: Generation,
    ks: list[int],
    digests: list[bytes | None],
    size: tuple[int, int],
    texts: list[str] | None,
    realistic: bool = False,
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
            realistic=realistic,
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


async def generate(node: FakeNode, request: web.Request, payload: Any) -> web.StreamResponse:
    """POST /sdapi/v1/txt2img|img2img: validate, run the job (shielded), answer its body."""
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
    fault = node.take_fault()
    if fault.mode in IN_THE_WAY:
        return await answer_in_the_way(fault, request)
    job = node.spawn(_Job(node, request, mode, req, mask, fault).run())
    # Shielded: like the webui, a job goes on when its client disconnects.
    body = await asyncio.shield(job)
    return web.Response(body=body or b"", content_type="application/json")
