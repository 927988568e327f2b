"""Planning a fake webui job: sizes, hires fix and masks from a validated request."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sdproxy.fakewebui.catalog import (
    LATENT_MODES,
    UPSCALERS,
    Checkpoint,
    find_checkpoint,
    resolve_sampler,
    sampling_schedule,
)
from sdproxy.fakewebui.infotext import Generation, seed_lists
from sdproxy.fakewebui.model import WebuiError, check_torch_seeds


def apply_overrides(
    options: Mapping[str, Any],
    overrides: Mapping[str, Any] | None,
    checkpoints: Sequence[Checkpoint],
) -> tuple[dict[str, Any], dict[str, Any], Checkpoint]:
    """process_images' override_settings: (options for the job, overrides, checkpoint to load)."""
    opts, applied = dict(options), dict(overrides or {})
    wanted = find_checkpoint(applied.get("sd_model_checkpoint"), checkpoints)
    if wanted is None:  # an unknown checkpoint override is dropped silently
        applied.pop("sd_model_checkpoint", None)
        wanted = find_checkpoint(opts["sd_model_checkpoint"], checkpoints) or checkpoints[0]
    else:
        applied["sd_model_checkpoint"] = wanted.title
    for key, value in applied.items():
        if opts.get(key) != value and key not in opts:
            raise WebuiError(500, "KeyError", errors=repr(key))
        opts[key] = value
    return opts, applied, wanted


@dataclass(frozen=True)
class JobPlan:
    """What a txt2img/img2img job will do, settled before it samples anything."""

    gen: Generation
    n_iter: int
    first_steps: int
    first_size: tuple[int, int]
    hr_steps: int | None  # None without hires fix
    hr_size: tuple[int, int]
    digests: list[bytes | None]  # the init image digest for each batch position


def _need(req: Mapping[str, Any], *names: str) -> list[Any]:
    """Fields processing can't do without: null there crashes the webui with a TypeError."""
    for name in names:
        if req[name] is None:
            raise WebuiError(500, "TypeError", errors=f"{name} must not be None")
    return [req[name] for name in names]


def _hires_size(req: Mapping[str, Any], width: int, height: int) -> tuple[int, int]:
    """calculate_target_resolution: the size hires fix delivers."""
    resize_x, resize_y = _need(req, "hr_resize_x", "hr_resize_y")
    if resize_x == 0 and resize_y == 0:
        (scale,) = _need(req, "hr_scale")
        return int(width * scale), int(height * scale)
    if resize_y == 0:
        return resize_x, resize_x * height // width
    if resize_x == 0:
        return resize_y * width // height, resize_y
    return resize_x, resize_y


def _hires_params(
    req: Mapping[str, Any],
    extra: dict[str, Any],
    sampler: str,
    samplers: Sequence[str],
    checkpoints: Sequence[Checkpoint],
) -> None:
    """StableDiffusionProcessingTxt2Img.init: hires fix's infotext entries and checks."""
    extra["Denoising strength"] = req["denoising_strength"]
    name = req["hr_checkpoint_name"]
    if name and name != "Use same checkpoint":
        found = find_checkpoint(name, checkpoints)
        if found is None:
            raise WebuiError(500, "Exception", errors=f"Could not find checkpoint with name {name}")
        extra["Hires checkpoint"] = found.short_title
    hr_sampler = req["hr_sampler_name"]
    if hr_sampler is not None and hr_sampler != sampler:
        if hr_sampler not in samplers:
            raise WebuiError(500, "AssertionError", errors=f"bad sampler name: {hr_sampler}")
        extra["Hires sampler"] = hr_sampler
    # Callables in the webui: null in the info JSON, resolved per image in infotexts.
    extra["Hires prompt"] = extra["Hires negative prompt"] = None
    extra["Hires schedule type"] = None
    upscaler = req["hr_upscaler"]
    if upscaler is not None and upscaler not in LATENT_MODES + UPSCALERS:
        raise WebuiError(500, "Exception", errors=f"could not find upscaler named {upscaler}")
    if req["hr_resize_x"] == 0 and req["hr_resize_y"] == 0:
        extra["Hires upscale"] = req["hr_scale"]
    else:
        extra["Hires resize"] = f"{req['hr_resize_x']}x{req['hr_resize_y']}"
    if req["hr_second_pass_steps"]:
        extra["Hires steps"] = req["hr_second_pass_steps"]
    if upscaler is not None:
        extra["Hires upscaler"] = upscaler


def _mask_params(req: Mapping[str, Any], extra: dict[str, Any], mask_blank: bool | None) -> None:
    """StableDiffusionProcessingImg2Img.init: a mask's infotext entries."""
    if mask_blank is None:
        return
    if req["inpainting_mask_invert"]:
        extra["Mask mode"] = "Inpaint not masked"
    blur_x, blur_y = req["mask_blur_x"], req["mask_blur_y"]
    if (blur_x or 0) > 0 or (blur_y or 0) > 0:
        extra["Mask blur"] = blur_x if blur_x == blur_y else None
    if req["inpaint_full_res"]:
        if mask_blank:
            return  # nothing to inpaint: the webui falls back to plain img2img
        extra["Inpaint area"] = "Only masked"
        extra["Masked area padding"] = req["inpaint_full_res_padding"]
    fill = {0: "fill", 2: "latent noise", 3: "latent nothing"}.get(req["inpainting_fill"])
    if fill is not None:
        extra["Masked content"] = fill


def plan_job(
    mode: str,
    req: Mapping[str, Any],
    *,
    seed: int,
    subseed: int,
    opts: Mapping[str, Any],
    checkpoint: Checkpoint,
    checkpoints: Sequence[Checkpoint],
    samplers: Sequence[str],
    init_digests: Sequence[bytes],
    mask_blank: bool | None,
    version: str,
) -> JobPlan:
    """process_images_inner up to sampling, for a validated request and resolved seeds."""
    sampler, label = resolve_sampler(
        req["sampler_name"] or req["sampler_index"],
        req["scheduler"],
        samplers,
        convert_automatic=True,
    )
    # The API sets p.scheduler only when it differs from the sampler's default; processing
    # then resolves it again without that conversion.
    scheduler = req["scheduler"] or (label if label != "Automatic" else None)
    sampler, scheduler = resolve_sampler(sampler, scheduler, samplers, convert_automatic=False)
    refiner = req["refiner_checkpoint"]
    if refiner not in (None, "", "None", "none") and not find_checkpoint(refiner, checkpoints):
        raise WebuiError(500, "Exception", errors=f"Could not find checkpoint with name {refiner}")
    strength, batch, n_iter, steps, width, height = _need(
        req, "subseed_strength", "batch_size", "n_iter", "steps", "width", "height"
    )
    _need(req, "cfg_scale", "seed_resize_from_w", "seed_resize_from_h")
    total = batch * n_iter
    if total <= 0:
        raise WebuiError(500, "IndexError", errors="list index out of range")
    if width <= 0 or height <= 0:
        raise WebuiError(500, "RuntimeError", errors="width and height must be positive")
    all_seeds, all_subseeds = seed_lists(seed, subseed, strength, total)
    check_torch_seeds(all_seeds, all_subseeds, strength)
    extra: dict[str, Any] = {}
    digests: list[bytes | None] = [None] * batch
    first_steps, hr_steps, hr_size = steps, None, (width, height)
    if mode == "img2img":
        extra["Denoising strength"] = req["denoising_strength"]
        _mask_params(req, extra, mask_blank)
        if not init_digests or len(init_digests) > batch:
            count = len(init_digests)
            message = f"bad number of images passed: {count}; expecting {batch} or less"
            raise WebuiError(500, "RuntimeError", errors=message)
        # With 2+ init images batch_size shrinks to their count, after all_seeds was sized.
        batch = batch if len(init_digests) == 1 else len(init_digests)
        digests = [*init_digests] * (batch if len(init_digests) == 1 else 1)
        first_steps = max(1, int(steps * req["denoising_strength"]))
        multiplier = req["initial_noise_multiplier"]
        multiplier = opts["initial_noise_multiplier"] if multiplier is None else multiplier
        if multiplier != 1.0:
            extra["Noise multiplier"] = multiplier
    elif req["enable_hr"]:
        _hires_params(req, extra, sampler, samplers, checkpoints)
        hr_size = _hires_size(req, width, height)
        hr_steps = req["hr_second_pass_steps"] or steps
    schedule = sampling_schedule(sampler, scheduler)
    if schedule is not None:
        extra["Schedule type"] = schedule
    if hr_steps is not None:
        hr_sampler = req["hr_sampler_name"] or sampler
        hr_schedule = sampling_schedule(hr_sampler, req["hr_scheduler"] or scheduler)
        if hr_schedule is not None and hr_schedule != extra.get("Schedule type"):
            extra["Hires schedule type"] = hr_schedule
    restore_faces = req["restore_faces"]
    tiling = req["tiling"]
    gen = Generation(
        all_prompts=[req["prompt"]] * total,
        all_negative_prompts=[req["negative_prompt"]] * total,
        all_seeds=all_seeds,
        all_subseeds=all_subseeds,
        subseed_strength=strength,
        width=width,
        height=height,
        sampler_name=sampler,
        scheduler=scheduler,
        cfg_scale=req["cfg_scale"],
        steps=steps,
        batch_size=batch,
        restore_faces=bool(opts["face_restoration"] if restore_faces is None else restore_faces),
        face_restoration_model=opts["face_restoration_model"],
        checkpoint=checkpoint,
        seed_resize_from_w=req["seed_resize_from_w"],
        seed_resize_from_h=req["seed_resize_from_h"],
        denoising_strength=req["denoising_strength"],
        extra_generation_params=extra,
        styles=list(req["styles"] or []),
        clip_skip=int(opts["CLIP_stop_at_last_layers"]),
        tiling=bool(opts["tiling"] if tiling is None else tiling),
        version=version if opts["add_version_to_infotext"] else None,
        hr_prompt=req.get("hr_prompt") or req["prompt"],
        hr_negative_prompt=req.get("hr_negative_prompt") or req["negative_prompt"],
    )
    return JobPlan(gen, n_iter, first_steps, (width, height), hr_steps, hr_size, digests)
