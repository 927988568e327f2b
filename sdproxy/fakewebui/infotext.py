"""Seeds, infotexts and the info JSON of the fake webui's finished jobs."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from sdproxy.fakewebui.catalog import Checkpoint


def seed_lists(seed: int, subseed: int, strength: float, total: int) -> tuple[list[int], list[int]]:
    """all_seeds and all_subseeds as process_images_inner builds them."""
    seeds = [seed + (k if strength == 0 else 0) for k in range(total)]
    return seeds, [subseed + k for k in range(total)]


@dataclass(frozen=True)
class Generation:
    """Everything a finished job reports about itself, for infotexts and the info JSON."""

    all_prompts: list[str]
    all_negative_prompts: list[str]
    all_seeds: list[int]
    all_subseeds: list[int]
    subseed_strength: Any
    width: int
    height: int
    sampler_name: str
    scheduler: str
    cfg_scale: Any
    steps: Any
    batch_size: int
    restore_faces: bool
    face_restoration_model: str | None
    checkpoint: Checkpoint
    seed_resize_from_w: Any
    seed_resize_from_h: Any
    denoising_strength: Any
    extra_generation_params: dict[str, Any]
    styles: list[str]
    clip_skip: int
    tiling: bool
    version: str | None
    hr_prompt: str | None = None
    hr_negative_prompt: str | None = None


def _quote(value: Any) -> Any:
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return value
    return json.dumps(value, ensure_ascii=False)


def infotext(gen: Generation, k: int) -> str:
    """processing.create_infotext for image ``k`` of the job (k=0 also serves the grid)."""
    prompt, negative = gen.all_prompts[k], gen.all_negative_prompts[k]
    varied = gen.subseed_strength != 0
    resize_w, resize_h = gen.seed_resize_from_w or 0, gen.seed_resize_from_h or 0
    extra = dict(gen.extra_generation_params)
    if "Hires prompt" in extra:
        extra["Hires prompt"] = gen.hr_prompt if gen.hr_prompt != prompt else None
    if "Hires negative prompt" in extra:
        hr_negative = gen.hr_negative_prompt
        extra["Hires negative prompt"] = hr_negative if hr_negative != negative else None
    params: dict[str, Any] = {
        "Steps": gen.steps,
        "Sampler": gen.sampler_name,
        "Schedule type": gen.scheduler,
        "CFG scale": gen.cfg_scale,
        "Seed": gen.all_seeds[k],
        "Face restoration": gen.face_restoration_model if gen.restore_faces else None,
        "Size": f"{gen.width}x{gen.height}",
        "Model hash": gen.checkpoint.shorthash,
        "Model": gen.checkpoint.model_name,
        "Variation seed": gen.all_subseeds[k] if varied else None,
        "Variation seed strength": gen.subseed_strength if varied else None,
        "Seed resize from": f"{resize_w}x{resize_h}" if resize_w > 0 and resize_h > 0 else None,
        "Denoising strength": extra.get("Denoising strength"),
        "Clip skip": gen.clip_skip if gen.clip_skip > 1 else None,
        "Tiling": "True" if gen.tiling else None,
        **extra,
        "Version": gen.version,
    }
    text = ", ".join(
        key if key == value else f"{key}: {_quote(value)}"
        for key, value in params.items()
        if value is not None
    )
    negative_text = f"\nNegative prompt: {negative}" if negative else ""
    return f"{prompt}{negative_text}\n{text}".strip()


def info_json(
    gen: Generation, infotexts: list[str], index_of_first_image: int, job_timestamp: str
) -> str:
    """Processed.js(): Python's default json.dumps, keys in the webui's order."""
    info = {
        "prompt": gen.all_prompts[0],
        "all_prompts": gen.all_prompts,
        "negative_prompt": gen.all_negative_prompts[0],
        "all_negative_prompts": gen.all_negative_prompts,
        "seed": gen.all_seeds[0],
        "all_seeds": gen.all_seeds,
        "subseed": gen.all_subseeds[0],
        "all_subseeds": gen.all_subseeds,
        "subseed_strength": gen.subseed_strength,
        "width": gen.width,
        "height": gen.height,
        "sampler_name": gen.sampler_name,
        "cfg_scale": gen.cfg_scale,
        "steps": gen.steps,
        "batch_size": gen.batch_size,
        "restore_faces": gen.restore_faces,
        "face_restoration_model": gen.face_restoration_model if gen.restore_faces else None,
        "sd_model_name": gen.checkpoint.model_name,
        "sd_model_hash": gen.checkpoint.shorthash,
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": gen.seed_resize_from_w,
        "seed_resize_from_h": gen.seed_resize_from_h,
        "denoising_strength": gen.denoising_strength,
        "extra_generation_params": gen.extra_generation_params,
        "index_of_first_image": index_of_first_image,
        "infotexts": infotexts,
        "styles": gen.styles,
        "job_timestamp": job_timestamp,
        "clip_skip": gen.clip_skip,
        "is_using_inpainting_conditioning": False,
        "version": gen.version,
    }
    return json.dumps(info, default=lambda _: None)


_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_infotext(text: str) -> dict[str, Any]:
    """A small infotext_utils.parse_generation_parameters: prompt, negative, key/value pairs."""
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    in_negative = False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    result: dict[str, Any] = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, raw in _PARAM.findall(last):
        value = json.loads(raw) if raw.startswith('"') and raw.endswith('"') else raw
        size = re.fullmatch(r"(\d+)x(\d+)", str(value))
        if size:
            result[f"{key}-1"], result[f"{key}-2"] = size.group(1), size.group(2)
        else:
            result[key] = value
    return result
