"""Pure parts of the fake webui: request model, samplers, seeds, infotexts, info JSON, pixels."""

from __future__ import annotations

import base64
import binascii
import copy
import email.message
import hashlib
import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from PIL import Image, ImageDraw, PngImagePlugin

# --- errors ------------------------------------------------------------------------------------


class WebuiError(Exception):
    """An error the webui answers through its api_middleware: a status and a four-key body."""

    def __init__(self, status: int, error: str, *, detail: str = "", errors: str = "") -> None:
        super().__init__(errors or detail)
        self.status = status
        self.error = error
        self.detail = detail
        self.errors = errors

    @classmethod
    def http(cls, status: int, detail: str) -> WebuiError:
        """A FastAPI HTTPException: starlette 0.26 leaves ``errors`` empty for these."""
        return cls(status, "HTTPException", detail=detail)

    def body(self) -> dict[str, str]:
        return {"error": self.error, "detail": self.detail, "body": "", "errors": self.errors}


class RequestValidationError(Exception):
    """FastAPI's 422: pydantic-1 error dicts under ``detail``."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__(errors)
        self.errors = errors


# --- request model (pydantic 1 as used by webui v1.10.1) --------------------------------------

Kind = Literal["int", "float", "str", "bool", "list", "list_str", "dict", "dict_str"]


REQUIRED: Any = object()  # the default of a field that must be sent


@dataclass(frozen=True)
class FieldSpec:
    """One field of a generated webui request model."""

    name: str
    kind: Kind
    default: Any
    nullable: bool = True


def _fields(*rows: tuple[Any, ...]) -> tuple[FieldSpec, ...]:
    return tuple(FieldSpec(*row) for row in rows)


# Dataclass order of StableDiffusionProcessing minus API_NOT_ALLOWED; every generated field is
# Optional, so null is accepted and kept.
_BASE = _fields(
    ("prompt", "str", ""),
    ("negative_prompt", "str", ""),
    ("styles", "list_str", None),
    ("seed", "int", -1),
    ("subseed", "int", -1),
    ("subseed_strength", "float", 0),
    ("seed_resize_from_h", "int", -1),
    ("seed_resize_from_w", "int", -1),
    ("sampler_name", "str", None),
    ("scheduler", "str", None),
    ("batch_size", "int", 1),
    ("n_iter", "int", 1),
    ("steps", "int", 50),
    ("cfg_scale", "float", 7.0),
    ("width", "int", 512),
    ("height", "int", 512),
    ("restore_faces", "bool", None),
    ("tiling", "bool", None),
    ("do_not_save_samples", "bool", False),
    ("do_not_save_grid", "bool", False),
    ("eta", "float", None),
    ("denoising_strength", "float", None),
    ("s_min_uncond", "float", None),
    ("s_churn", "float", None),
    ("s_tmax", "float", None),
    ("s_tmin", "float", None),
    ("s_noise", "float", None),
    ("override_settings", "dict_str", None),
    ("override_settings_restore_afterwards", "bool", True),
    ("refiner_checkpoint", "str", None),
    ("refiner_switch_at", "float", None),
    ("disable_extra_networks", "bool", False),
    ("firstpass_image", "str", None),
    ("comments", "dict", None),
)

# Appended by models.py with non-Optional types: those with a non-null default reject null.
_SCRIPT_TAIL = _fields(
    ("script_name", "str", None),
    ("script_args", "list", [], False),
    ("send_images", "bool", True, False),
    ("save_images", "bool", False, False),
    ("alwayson_scripts", "dict", {}, False),
    ("infotext", "str", None),
)
_SAMPLER_INDEX = FieldSpec("sampler_index", "str", "Euler", nullable=False)

TXT2IMG_FIELDS: tuple[FieldSpec, ...] = (
    *_BASE,
    *_fields(
        ("enable_hr", "bool", False),
        ("firstphase_width", "int", 0),
        ("firstphase_height", "int", 0),
        ("hr_scale", "float", 2.0),
        ("hr_upscaler", "str", None),
        ("hr_second_pass_steps", "int", 0),
        ("hr_resize_x", "int", 0),
        ("hr_resize_y", "int", 0),
        ("hr_checkpoint_name", "str", None),
        ("hr_sampler_name", "str", None),
        ("hr_scheduler", "str", None),
        ("hr_prompt", "str", ""),
        ("hr_negative_prompt", "str", ""),
        ("force_task_id", "str", None),
    ),
    _SAMPLER_INDEX,
    *_SCRIPT_TAIL,
)

# models.py re-adds denoising_strength (float, 0.75) for img2img: the dict keeps the first
# position and the last definition, so it stays in place but no longer accepts null.
IMG2IMG_FIELDS: tuple[FieldSpec, ...] = (
    *(
        FieldSpec("denoising_strength", "float", 0.75, nullable=False)
        if spec.name == "denoising_strength"
        else spec
        for spec in _BASE
    ),
    *_fields(
        ("init_images", "list", None),
        ("resize_mode", "int", 0),
        ("image_cfg_scale", "float", None),
        ("mask", "str", None),
        ("mask_blur_x", "int", 4),
        ("mask_blur_y", "int", 4),
        ("mask_blur", "int", None),
        ("mask_round", "bool", True),
        ("inpainting_fill", "int", 0),
        ("inpaint_full_res", "bool", True),
        ("inpaint_full_res_padding", "int", 0),
        ("inpainting_mask_invert", "int", 0),
        ("initial_noise_multiplier", "float", None),
        ("latent_mask", "str", None),
        ("force_task_id", "str", None),
    ),
    _SAMPLER_INDEX,
    FieldSpec("include_init_images", "bool", False, nullable=False),
    *_SCRIPT_TAIL,
)

_BOOL_TRUE = {1, "1", "on", "t", "true", "y", "yes"}
_BOOL_FALSE = {0, "0", "off", "f", "false", "n", "no"}
_MESSAGES: dict[str, tuple[str, str]] = {
    "int": ("value is not a valid integer", "type_error.integer"),
    "float": ("value is not a valid float", "type_error.float"),
    "str": ("str type expected", "type_error.str"),
    "bool": ("value could not be parsed to a boolean", "type_error.bool"),
    "list": ("value is not a valid list", "type_error.list"),
    "dict": ("value is not a valid dict", "type_error.dict"),
}


class InvalidValue(Exception):
    """A value pydantic 1 would reject; ``kind`` picks the message, ``loc`` is inside the field."""

    def __init__(self, kind: str, loc: tuple[str | int, ...] = ()) -> None:
        super().__init__(kind)
        self.kind = kind
        self.loc = loc


def coerce(kind: str, value: Any) -> Any:
    """Validate one non-null value like pydantic 1 does."""
    if kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        try:
            return int(value)
        except (TypeError, ValueError, OverflowError):
            raise InvalidValue("int") from None
    if kind == "float":
        if isinstance(value, float):
            return value
        try:
            return float(value)
        except (TypeError, ValueError):
            raise InvalidValue("float") from None
    if kind == "str":
        if isinstance(value, str):
            return value
        if isinstance(value, int | float):
            return str(value)
        raise InvalidValue("str")
    if kind == "bool":
        if isinstance(value, bool):
            return value
        probe = value.lower() if isinstance(value, str) else value
        try:
            if probe in _BOOL_TRUE:
                return True
            if probe in _BOOL_FALSE:
                return False
        except TypeError:  # unhashable: a list or a dict
            pass
        raise InvalidValue("bool")
    if kind in ("list", "list_str"):
        if not isinstance(value, list | tuple):
            raise InvalidValue("list")
        if kind == "list":
            return list(value)
        items = []
        for index, item in enumerate(value):
            try:
                items.append(coerce("str", item))
            except InvalidValue as exc:
                raise InvalidValue("str", (index,)) from exc
        return items
    if isinstance(value, dict):
        mapping = value
    else:
        try:
            mapping = dict(value)
        except (TypeError, ValueError):
            raise InvalidValue("dict") from None
    if kind == "dict_str":
        return {coerce("str", k): v for k, v in mapping.items()}
    return mapping


def parse_json_body(raw: bytes, content_type: str | None) -> Any:
    """Decode a request body as FastAPI 0.94 does; None means there was none."""
    if not raw:
        return None
    if content_type is not None:
        message = email.message.Message()
        message["content-type"] = content_type
        subtype = message.get_content_subtype()
        is_json = message.get_content_maintype() == "application" and (
            subtype == "json" or subtype.endswith("+json")
        )
        if not is_json:
            return raw  # validated as the model, so it fails as "not a valid dict"
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        ctx = {"msg": exc.msg, "doc": exc.doc, "pos": exc.pos, "lineno": exc.lineno}
        ctx["colno"] = exc.colno
        error = {"loc": ["body", exc.pos], "msg": str(exc), "type": "value_error.jsondecode"}
        raise RequestValidationError([{**error, "ctx": ctx}]) from exc
    except ValueError as exc:  # undecodable bytes: FastAPI's catch-all for body parsing
        raise WebuiError.http(400, "There was an error parsing the body") from exc


def validate_request(fields: Sequence[FieldSpec], body: Any) -> dict[str, Any]:
    """The request model's ``vars()``: every field in schema order after coercion."""
    if body is None:
        raise RequestValidationError(
            [{"loc": ["body"], "msg": "field required", "type": "value_error.missing"}]
        )
    try:
        data = coerce("dict", body)
    except InvalidValue:
        msg, type_ = _MESSAGES["dict"]
        raise RequestValidationError([{"loc": ["body"], "msg": msg, "type": type_}]) from None
    values: dict[str, Any] = {}
    errors: list[dict[str, Any]] = []
    for spec in fields:
        if spec.name not in data:
            if spec.default is REQUIRED:
                missing = {"loc": ["body", spec.name], "msg": "field required"}
                errors.append({**missing, "type": "value_error.missing"})
            else:
                values[spec.name] = copy.deepcopy(spec.default)
            continue
        value = data[spec.name]
        if value is None:
            if spec.nullable:
                values[spec.name] = None
                continue
            errors.append(
                {
                    "loc": ["body", spec.name],
                    "msg": "none is not an allowed value",
                    "type": "type_error.none.not_allowed",
                }
            )
            continue
        try:
            values[spec.name] = coerce(spec.kind, value)
        except InvalidValue as exc:
            msg, type_ = _MESSAGES[exc.kind]
            errors.append({"loc": ["body", spec.name, *exc.loc], "msg": msg, "type": type_})
    if errors:
        raise RequestValidationError(errors)
    return values


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


# --- seeds, infotexts, info ---------------------------------------------------------------------


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


# --- planning a job -----------------------------------------------------------------------------


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


# --- pixels -------------------------------------------------------------------------------------


def render_image(
    *,
    seed: int,
    subseed: int,
    subseed_strength: float,
    prompt: str,
    width: int,
    height: int,
    init_image_digest: bytes | None,
) -> Image.Image:
    """A cheap picture determined by the image's own inputs only, never by its batch position."""
    key = json.dumps(
        [
            seed,
            subseed if subseed_strength != 0 else None,
            float(subseed_strength),
            prompt,
            width,
            height,
            init_image_digest.hex() if init_image_digest is not None else None,
        ]
    )
    digest = hashlib.blake2b(key.encode(), digest_size=32).digest()
    image = Image.new("RGB", (width, height), (digest[0], digest[1], digest[2]))
    draw = ImageDraw.Draw(image)
    for offset in range(3, 31, 7):
        x0, y0, w, h, r, g, b = digest[offset : offset + 7]
        left, top = x0 * width // 256, y0 * height // 256
        draw.rectangle(
            (left, top, left + w * width // 400, top + h * height // 400), fill=(r, g, b)
        )
    return image


def encode_png(image: Image.Image, infotext_: str | None) -> bytes:
    """PNG bytes with the webui's tEXt ``parameters`` chunk."""
    metadata = None
    if infotext_ is not None:
        metadata = PngImagePlugin.PngInfo()
        metadata.add_text("parameters", infotext_)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=metadata, compress_level=1)
    return buffer.getvalue()


def render_png(
    *,
    seed: int,
    subseed: int,
    subseed_strength: float,
    prompt: str,
    width: int,
    height: int,
    init_image_digest: bytes | None,
    infotext: str,
) -> bytes:
    """One generated image as PNG bytes carrying its infotext."""
    image = render_image(
        seed=seed,
        subseed=subseed,
        subseed_strength=subseed_strength,
        prompt=prompt,
        width=width,
        height=height,
        init_image_digest=init_image_digest,
    )
    return encode_png(image, infotext)


def image_grid(images: Sequence[Image.Image]) -> Image.Image:
    """images.image_grid with the default n_rows=-1: round(sqrt(n)) rows."""
    rows = min(max(round(math.sqrt(len(images))), 1), len(images))
    cols = math.ceil(len(images) / rows)
    width, height = images[0].size
    grid = Image.new("RGB", (cols * width, rows * height), "black")
    for index, image in enumerate(images):
        grid.paste(image, (index % cols * width, index // cols * height))
    return grid


def decode_image(encoding: object) -> Image.Image:
    """api.decode_base64_to_image for raw base64 or data: URIs (this node fetches no URLs)."""
    if not isinstance(encoding, str):
        name = type(encoding).__name__
        raise WebuiError(
            500, "AttributeError", errors=f"'{name}' object has no attribute 'startswith'"
        )
    if encoding.startswith(("http://", "https://")):
        raise WebuiError.http(500, "Invalid image url")
    if encoding.startswith("data:image/"):
        encoding = encoding.split(";")[1].split(",")[1]
    try:
        image = Image.open(io.BytesIO(base64.b64decode(encoding)))
        image.load()
    except (OSError, ValueError, binascii.Error, Image.DecompressionBombError) as exc:
        raise WebuiError.http(500, "Invalid encoded image") from exc
    return image


def image_digest(image: Image.Image) -> bytes:
    """What an init image contributes to the pixels: its RGB content, not its encoding."""
    rgb = image.convert("RGB")
    return hashlib.sha256(f"{rgb.size}".encode() + rgb.tobytes()).digest()


def b64_png(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


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
