"""What the fake webui offers: samplers, schedulers, checkpoints, scripts, options."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sdproxy.fakewebui.model import WebuiError

# --- samplers, schedulers, checkpoints ---------------------------------------------------------

DEFAULT_SAMPLERS: tuple[str, ...] = (
    "DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 2S a", "DPM++ 3M SDE",
    "Euler a", "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DPM fast", "DPM adaptive", "Restart",
    "DDIM", "DDIM CFG++", "PLMS", "UniPC", "LCM",
)  # fmt: skip
# Each sampler's own default schedule ("Automatic" resolves to it when sampling).
SAMPLER_SCHEDULER: dict[str, str] = {
    "DPM++ 2M": "karras", "DPM++ SDE": "karras", "DPM++ 2M SDE": "exponential",
    "DPM++ 2M SDE Heun": "exponential", "DPM++ 2S a": "karras", "DPM++ 3M SDE": "exponential",
    "DPM2": "karras", "DPM2 a": "karras", "Restart": "karras",
}  # fmt: skip
# Timestep samplers never go through k-diffusion's sigma schedules.
_TIMESTEP_SAMPLERS = frozenset({"DDIM", "DDIM CFG++", "PLMS", "UniPC"})


@dataclass(frozen=True)
class Scheduler:
    """One entry of sd_schedulers.schedulers."""

    name: str
    label: str
    aliases: tuple[str, ...] = ()
    default_rho: float = -1
    need_inner_model: bool = False


SCHEDULERS: tuple[Scheduler, ...] = (
    Scheduler("automatic", "Automatic"),
    Scheduler("uniform", "Uniform", need_inner_model=True),
    Scheduler("karras", "Karras", default_rho=7.0),
    Scheduler("exponential", "Exponential"),
    Scheduler("polyexponential", "Polyexponential", default_rho=1.0),
    Scheduler("sgm_uniform", "SGM Uniform", ("SGMUniform",), need_inner_model=True),
    Scheduler("kl_optimal", "KL Optimal"),
    Scheduler("align_your_steps", "Align Your Steps"),
    Scheduler("simple", "Simple", need_inner_model=True),
    Scheduler("normal", "Normal", need_inner_model=True),
    Scheduler("ddim", "DDIM", need_inner_model=True),
    Scheduler("beta", "Beta", need_inner_model=True),
)
_SCHEDULER_MAP = {s.name: s for s in SCHEDULERS} | {s.label: s for s in SCHEDULERS}


def resolve_sampler(
    name: str | None, scheduler: str | None, samplers: Sequence[str], *, convert_automatic: bool
) -> tuple[str, str]:
    """sd_samplers.get_sampler_and_scheduler: (sampler name, scheduler label)."""
    found = _SCHEDULER_MAP.get(scheduler or "", SCHEDULERS[0])
    name = name or samplers[0]
    for candidate in SCHEDULERS:
        for option in (candidate.label, *candidate.aliases):
            if name.endswith(" " + option):
                found = candidate
                name = name[: -(len(option) + 1)]
                break
    sampler = name if name in samplers else samplers[0]
    if convert_automatic and SAMPLER_SCHEDULER.get(sampler) == found.name:
        found = SCHEDULERS[0]
    return sampler, found.label


def sampling_schedule(sampler: str, scheduler: str | None) -> str | None:
    """The schedule k-diffusion reports as "Schedule type" while sampling, if any."""
    if sampler in _TIMESTEP_SAMPLERS:
        return None
    found = _SCHEDULER_MAP.get(scheduler or "", SCHEDULERS[0])
    if found.name == "automatic":
        found = _SCHEDULER_MAP.get(SAMPLER_SCHEDULER.get(sampler, ""), SCHEDULERS[0])
    return None if found.name == "automatic" else found.label


def sampler_entries(samplers: Sequence[str]) -> list[dict[str, Any]]:
    """GET /samplers: [{name, aliases, options}]."""
    entries = []
    for name in samplers:
        options = {"scheduler": SAMPLER_SCHEDULER[name]} if name in SAMPLER_SCHEDULER else {}
        alias = "k_" + re.sub(r"\W+", "_", name.lower()).strip("_")
        entries.append({"name": name, "aliases": [alias], "options": options})
    return entries


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint known by its title "<file> [<shorthash>]"."""

    title: str
    filename: str
    model_name: str
    shorthash: str
    sha256: str

    @property
    def short_title(self) -> str:
        return f"{self.model_name} [{self.shorthash}]"

    @property
    def aliases(self) -> frozenset[str]:
        return frozenset(
            (self.title, self.filename, self.model_name, self.shorthash, self.sha256)
        ) | {self.short_title, f"{self.filename} [{self.shorthash}]"}

    def entry(self) -> dict[str, Any]:
        """One item of GET /sd-models."""
        return {
            "title": self.title,
            "model_name": self.model_name,
            "hash": self.shorthash,
            "sha256": self.sha256,
            "filename": f"/stable-diffusion-webui/models/Stable-diffusion/{self.filename}",
            "config": None,
        }


def parse_checkpoint(title: str) -> Checkpoint:
    """A title with a "[hash]" suffix keeps that hash; others get one derived from the name."""
    match = re.fullmatch(r"(.+?)\s*\[([0-9a-fA-F]{8,64})\]", title)
    filename = match.group(1) if match else title
    digest = hashlib.sha256(filename.encode()).hexdigest()
    shorthash = match.group(2).lower()[:10] if match else digest[:10]
    model_name = re.sub(r"\.(safetensors|ckpt|pt|pth|bin|gguf)$", "", filename.split("/")[-1])
    sha256 = (shorthash + digest)[:64]
    return Checkpoint(title, filename, model_name, shorthash, sha256)


def find_checkpoint(name: object, checkpoints: Sequence[Checkpoint]) -> Checkpoint | None:
    """sd_models.checkpoint_aliases lookup."""
    return next((c for c in checkpoints if isinstance(name, str) and name in c.aliases), None)


DEFAULT_SCRIPTS_TXT2IMG: tuple[str, ...] = (
    "prompt matrix", "prompts from file or textbox", "x/y/z plot", "comments", "hypertile",
    "lora", "refiner", "sampler", "seed", "extra options",
)  # fmt: skip
DEFAULT_SCRIPTS_IMG2IMG: tuple[str, ...] = (
    "img2img alternative test", "loopback", "outpainting mk2", "poor man's outpainting",
    "prompt matrix", "prompts from file or textbox", "sd upscale", "x/y/z plot", "comments",
    "hypertile", "lora", "refiner", "sampler", "seed", "soft inpainting", "extra options",
)  # fmt: skip
# Titles the webui offers as script_name; any other listed script is always-on.
SELECTABLE_SCRIPTS = frozenset(DEFAULT_SCRIPTS_IMG2IMG[:8])
LATENT_MODES: tuple[str, ...] = (
    "Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)",
    "Latent (nearest)", "Latent (nearest-exact)",
)  # fmt: skip
UPSCALERS: tuple[str, ...] = (
    "None", "Lanczos", "Nearest", "DAT x2", "DAT x3", "DAT x4", "ESRGAN_4x", "LDSR",
    "R-ESRGAN 4x+", "R-ESRGAN 4x+ Anime6B", "ScuNET GAN", "ScuNET PSNR", "SwinIR 4x",
)  # fmt: skip


def check_scripts(listed: Sequence[str], req: Mapping[str, Any]) -> None:
    """Api.get_selectable_script, then init_script_args: unknown titles are a 422."""
    titles = {title.lower() for title in listed}
    name = req["script_name"]
    if name and (name.lower() not in titles or name.lower() not in SELECTABLE_SCRIPTS):
        raise WebuiError.http(422, f"Script '{name}' not found")
    for key in req["alwayson_scripts"]:
        if str(key).lower() not in titles:
            raise WebuiError.http(422, f"Script '{key}' not found")
        if str(key).lower() in SELECTABLE_SCRIPTS:
            detail = "Cannot have a selectable script in the always on scripts params"
            raise WebuiError.http(422, detail)


# --- options and other listings ----------------------------------------------------------------


def default_options(checkpoint: Checkpoint, version: str) -> dict[str, Any]:
    """A representative part of GET /options with webui v1.10.1 defaults."""
    return {
        "samples_save": True, "samples_format": "png", "samples_filename_pattern": "",
        "save_images_add_number": True, "grid_save": True, "grid_format": "png",
        "grid_extended_filename": False, "grid_only_if_multiple": True,
        "grid_prevent_empty_spots": False, "n_rows": -1, "enable_pnginfo": True,
        "save_txt": False, "save_images_before_face_restoration": False, "jpeg_quality": 80,
        "webp_lossless": False, "export_for_4chan": True, "img_downscale_threshold": 4.0,
        "target_side_length": 4000.0, "img_max_size_mp": 200.0, "use_original_name_batch": True,
        "save_init_img": False, "outdir_samples": "", "outdir_txt2img_samples":
        "outputs/txt2img-images", "outdir_img2img_samples": "outputs/img2img-images",
        "outdir_grids": "", "outdir_txt2img_grids": "outputs/txt2img-grids",
        "outdir_img2img_grids": "outputs/img2img-grids", "save_to_dirs": True,
        "face_restoration": False, "face_restoration_model": "CodeFormer",
        "code_former_weight": 0.5, "sd_model_checkpoint": checkpoint.title,
        "sd_checkpoints_limit": 1, "sd_vae": "Automatic", "sd_vae_overrides_per_model_preferences":
        True, "CLIP_stop_at_last_layers": 1, "tiling": False, "initial_noise_multiplier": 1.0,
        "img2img_color_correction": False, "img2img_fix_steps": False,
        "eta_noise_seed_delta": 0, "randn_source": "GPU", "s_min_uncond": 0.0, "s_churn": 0.0,
        "s_tmin": 0.0, "s_tmax": 0.0, "s_noise": 1.0, "eta_ancestral": 1.0, "eta_ddim": 0.0,
        "return_grid": True, "do_not_show_images": False, "add_model_hash_to_info": True,
        "add_model_name_to_info": True, "add_version_to_infotext": True,
        "live_previews_enable": True, "show_progress_every_n_steps": 10,
        "show_progress_type": "Approx NN", "api_enable_requests": True,
        "api_forbid_local_requests": True, "api_useragent": "", "upscaler_for_img2img": None,
        "token_merging_ratio": 0.0, "sd_checkpoint_hash": checkpoint.sha256,
        "hires_fix_refiner_pass": "second pass", "sd_webui_version": version,
    }  # fmt: skip


def cmd_flags(api_auth: str | None) -> dict[str, Any]:
    """Part of vars(cmd_opts): the real endpoint hands out the credentials too."""
    return {
        "api": True, "api_auth": api_auth, "api_log": False, "nowebui": True, "listen": False,
        "port": None, "gradio_auth": None, "ckpt_dir": None, "lowvram": False, "medvram": False,
        "xformers": False, "api_server_stop": False, "timeout_keep_alive": 30,
        "cors_allow_origins": None, "cors_allow_origins_regex": None, "subpath": None,
    }  # fmt: skip


def memory_stats() -> dict[str, Any]:
    """GET /memory for a 32 GiB host with a 24 GiB GPU."""
    gib = 1024.0**3
    stats = {"current": 2 * gib, "peak": 4 * gib}
    return {
        "ram": {"free": 24 * gib, "used": 8 * gib, "total": 32 * gib},
        "cuda": {
            "system": {"free": 20 * gib, "used": 4 * gib, "total": 24 * gib},
            "active": stats,
            "allocated": stats,
            "reserved": stats,
            "inactive": {"current": 0.0, "peak": 0.0},
            "events": {"retries": 0, "oom": 0},
        },
    }


def scheduler_entries() -> list[dict[str, Any]]:
    """GET /schedulers."""
    return [
        {
            "name": s.name,
            "label": s.label,
            "aliases": list(s.aliases) or None,
            "default_rho": s.default_rho,
            "need_inner_model": s.need_inner_model,
        }
        for s in SCHEDULERS
    ]


def upscaler_entries() -> list[dict[str, Any]]:
    """GET /upscalers."""
    return [
        {"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
        for name in UPSCALERS
    ]
