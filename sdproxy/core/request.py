"""Pure: read a txt2img/img2img body into what sdproxy relies on, and build each node's body.

Only the fields sdproxy uses are validated; every other field travels to the nodes untouched.
Coercion and error messages follow the webui's pydantic-1 request models (reference section 2.5).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Literal

from sdproxy.core.imageurls import image_url_errors, is_url
from sdproxy.errors import NotFound, RequestValidationError, validation_error

Kind = Literal["txt2img", "img2img"]

# The webui draws random seeds from this range (modules/processing.py, get_fixed_seed).
SEED_RANGE = 4294967294


@dataclass(frozen=True)
class GenerationRequest:
    """A validated generation request: the client's body plus the values sdproxy acts on."""

    kind: Kind
    body: dict[str, Any]
    batch_size: int
    n_iter: int
    seed: int | None  # None: random, resolved once per request by resolve_seeds()
    subseed: int | None
    subseed_strength: float
    send_images: bool
    save_images: bool
    script_name: str | None
    init_images: int  # how many init images an img2img request carries
    steps: int
    width: int
    height: int
    echo: dict[str, Any]  # what the webui echoes in parameters for the fields sdproxy rewrites
    denoising_strength: float = 0.0  # img2img: the share of steps actually sampled
    hr_steps: int | None = None  # hires fix's second pass steps; None without hires fix
    hr_width: int = 0  # the size hires fix upscales to
    hr_height: int = 0

    @property
    def total_images(self) -> int:
        """Images one webui would render: its batch size (after init images) times n_iter."""
        return self.unit_size * self.n_iter if self.split_by_iteration else self.reported_total

    @property
    def reported_total(self) -> int:
        """Entries of all_seeds/all_prompts one webui reports: the requested B x n_iter."""
        return self.batch_size * self.n_iter

    @property
    def split_by_iteration(self) -> bool:
        """With 2+ init images the webui sets batch_size to their count: split whole batches."""
        return self.kind == "img2img" and self.init_images >= 2

    @property
    def unit_size(self) -> int:
        """Images per unit of work handed to a node: one image, or one whole batch."""
        return self.init_images if self.split_by_iteration else 1

    @property
    def units(self) -> int:
        """Units of work in the request."""
        return self.n_iter if self.split_by_iteration else self.reported_total

    @property
    def splittable(self) -> bool:
        """Selectable scripts (X/Y/Z, prompts from file) return their own grids: never split."""
        return not self.script_name

    @property
    def reported_batch_size(self) -> int:
        """The batch_size one webui reports in info."""
        return self.unit_size if self.split_by_iteration else self.batch_size


@dataclass(frozen=True)
class InputLimits:
    """Bounds on a generation request beyond the webui's own (it has none on sizes)."""

    max_width: int = 4096
    max_height: int = 4096
    max_steps: int = 500
    allow_image_urls: bool = False


# Fields sdproxy decodes before fanning out, so a broken image fails once, as 422.
DECODED_FIELDS = ("init_images", "mask")


def decodable_images(request: GenerationRequest) -> list[tuple[list[str | int], str]]:
    """(loc, data) of every image sdproxy checks before fanning out: init_images and mask."""
    found: list[tuple[list[str | int], str]] = []
    for name in DECODED_FIELDS:
        value = request.body.get(name)
        items = enumerate(value) if isinstance(value, list) else [(None, value)]
        for index, item in items:
            if isinstance(item, int | float) and not isinstance(item, bool):
                item = str(item)  # the webui's model coerces numbers to str, then decodes
            if isinstance(item, str) and not is_url(item):
                found.append((["body", name] + ([] if index is None else [index]), item))
    return found


@dataclass(frozen=True)
class Seeds:
    """The request's seed and subseed, resolved once."""

    seed: int
    subseed: int


def resolve_seeds(request: GenerationRequest, rng: random.Random) -> Seeds:
    """Resolve -1/null seeds the way the webui does, once for the whole request."""
    seed = request.seed if request.seed is not None else rng.randrange(SEED_RANGE)
    subseed = request.subseed if request.subseed is not None else rng.randrange(SEED_RANGE)
    return Seeds(seed, subseed)


def node_body(
    request: GenerationRequest, seeds: Seeds, first_image: int, batch_size: int, n_iter: int
) -> dict[str, Any]:
    """The body one node gets to render images ``first_image`` onwards as ``batch_size x n_iter``.

    The seed (or, with a subseed strength, the subseed) is offset by the first image's index, so
    the node reports and renders exactly the seeds one webui would have used for those images.
    """
    body = dict(request.body)
    body["batch_size"] = batch_size
    body["n_iter"] = n_iter
    if request.subseed_strength == 0:
        body["seed"] = seeds.seed + first_image
        body["subseed"] = seeds.subseed + first_image
    else:
        body["seed"] = seeds.seed
        body["subseed"] = seeds.subseed + first_image
    return body


def parse_generation(
    kind: Kind, body: Any, *, max_images: int, limits: InputLimits = InputLimits()
) -> GenerationRequest:
    """Validate ``body`` (decoded JSON) and return what sdproxy needs from it.

    Raises RequestValidationError with every problem found, in the webui's 422 shape.
    """
    if not isinstance(body, dict):
        raise RequestValidationError(
            [validation_error(["body"], "value is not a valid dict", "type_error.dict")]
        )
    reader = _FieldReader(body)
    batch_size = reader.integer("batch_size", 1, minimum=1)
    n_iter = reader.integer("n_iter", 1, minimum=1)
    seed = reader.optional_integer("seed", -1)
    subseed = reader.optional_integer("subseed", -1)
    subseed_strength = reader.number("subseed_strength", 0.0)
    steps = reader.integer("steps", 50, minimum=1, maximum=limits.max_steps)
    width = reader.integer("width", 512, minimum=1, maximum=limits.max_width)
    height = reader.integer("height", 512, minimum=1, maximum=limits.max_height)
    send_images = reader.boolean("send_images", True)
    save_images = reader.boolean("save_images", False)
    reader.string("prompt")
    reader.string("negative_prompt")
    script_name = reader.string("script_name")
    init_images = reader.image_list("init_images") if kind == "img2img" else 0
    denoising_strength = reader.number("denoising_strength", 0.75 if kind == "img2img" else 0.0)
    hires = _read_hires(reader, kind, steps, width, height, limits)
    if kind == "img2img":
        reader.string("mask")
    if not limits.allow_image_urls:
        reader.errors.extend(image_url_errors(body))
    reader.raise_if_errors()
    if kind == "img2img" and body.get("init_images") is None:
        raise NotFound("Init image not found")
    if batch_size * n_iter > max_images:
        raise RequestValidationError(
            [
                validation_error(
                    ["body", "batch_size"],
                    f"batch_size x n_iter must be at most {max_images}",
                    "value_error.number.not_le",
                    limit_value=max_images,
                )
            ]
        )
    if init_images > batch_size:
        # The webui fails this with a 500 RuntimeError; it is the client's input, so 422.
        raise RequestValidationError(
            [
                validation_error(
                    ["body", "init_images"],
                    f"bad number of images passed: {init_images}; expecting {batch_size} or less",
                    "value_error",
                )
            ]
        )
    return GenerationRequest(
        kind=kind,
        body=body,
        batch_size=batch_size,
        n_iter=n_iter,
        seed=None if seed is None or seed == -1 else seed,
        subseed=None if subseed is None or subseed == -1 else subseed,
        subseed_strength=subseed_strength,
        send_images=send_images,
        save_images=save_images,
        script_name=script_name or None,
        init_images=init_images,
        steps=steps,
        width=width,
        height=height,
        echo={key: _echo(body, key, default) for key, default in _REWRITTEN.items()},
        denoising_strength=denoising_strength,
        hr_steps=hires[0] if hires else None,
        hr_width=hires[1] if hires else 0,
        hr_height=hires[2] if hires else 0,
    )


def _read_hires(
    reader: _FieldReader, kind: Kind, steps: int, width: int, height: int, limits: InputLimits
) -> tuple[int, int, int] | None:
    """Hires fix's second pass as (steps, width, height), with the webui's defaults and bounds.

    The target size is the webui's ``calculate_target_resolution``: hr_resize_x/y when either is
    set (the other kept in proportion), else the size times hr_scale.
    """
    if kind != "txt2img":
        return None
    unbounded = -(2**63)  # the webui accepts any value here; only the top is bounded
    second_pass = reader.integer(
        "hr_second_pass_steps", 0, minimum=unbounded, maximum=limits.max_steps
    )
    resize_x = reader.integer("hr_resize_x", 0, minimum=unbounded, maximum=limits.max_width)
    resize_y = reader.integer("hr_resize_y", 0, minimum=unbounded, maximum=limits.max_height)
    # enable_hr is Optional in the webui's model: null means off.
    if reader.body.get("enable_hr") is None or not reader.boolean("enable_hr", False):
        return None
    if resize_x <= 0 and resize_y <= 0:
        scale = reader.number("hr_scale", 2.0)
        if width * scale > limits.max_width or height * scale > limits.max_height:
            limit = min(limits.max_width / width, limits.max_height / height)
            reader.errors.append(
                validation_error(
                    ["body", "hr_scale"],
                    f"ensure this value is less than or equal to {limit:g}",
                    "value_error.number.not_le",
                    limit_value=limit,
                )
            )
        size = int(width * scale), int(height * scale)
    elif resize_y <= 0:
        size = resize_x, resize_x * height // width
    elif resize_x <= 0:
        size = resize_y * width // height, resize_y
    else:
        size = resize_x, resize_y
    return (second_pass if second_pass > 0 else steps), max(1, size[0]), max(1, size[1])


# Fields node_body() rewrites, with the webui's defaults for when the client left them out.
_REWRITTEN = {"batch_size": 1, "n_iter": 1, "seed": -1, "subseed": -1}


def _echo(body: dict[str, Any], key: str, default: int) -> int | None:
    value = body.get(key, default)
    return None if value is None else _as_int(value)


class _FieldReader:
    """Reads fields the way pydantic 1 coerces them, collecting every error."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body
        self.errors: list[dict[str, Any]] = []

    def _fail(self, name: str, msg: str, type_: str, **ctx: Any) -> None:
        self.errors.append(validation_error(["body", name], msg, type_, **ctx))

    def raise_if_errors(self) -> None:
        if self.errors:
            raise RequestValidationError(self.errors)

    def integer(self, name: str, default: int, *, minimum: int, maximum: int | None = None) -> int:
        """An int of at least ``minimum`` (and at most ``maximum``); null means the default."""
        value = self.optional_integer(name, default)
        if value is None:
            return default
        if maximum is not None and value > maximum:
            self._fail(
                name,
                f"ensure this value is less than or equal to {maximum}",
                "value_error.number.not_le",
                limit_value=maximum,
            )
            return default
        if value < minimum:
            self._fail(
                name,
                f"ensure this value is greater than or equal to {minimum}",
                "value_error.number.not_ge",
                limit_value=minimum,
            )
            return default
        return value

    def optional_integer(self, name: str, default: int) -> int | None:
        value = self.body.get(name, default)
        if value is None:
            return None
        result = _as_int(value)
        if result is None:
            self._fail(name, "value is not a valid integer", "type_error.integer")
            return default
        return result

    def number(self, name: str, default: float) -> float:
        value = self.body.get(name, default)
        if value is None:
            return default
        result = _as_float(value)
        if result is None:
            self._fail(name, "value is not a valid float", "type_error.float")
            return default
        return result

    def boolean(self, name: str, default: bool) -> bool:
        value = self.body.get(name, default)
        if value is None:
            self._fail(name, "none is not an allowed value", "type_error.none.not_allowed")
            return default
        result = parse_bool(value)
        if result is None:
            self._fail(name, "value could not be parsed to a boolean", "type_error.bool")
            return default
        return result

    def string(self, name: str) -> str | None:
        value = self.body.get(name)
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        self._fail(name, "str type expected", "type_error.str")
        return None

    def image_list(self, name: str) -> int:
        value = self.body.get(name)
        if value is None:
            return 0
        if not isinstance(value, list):
            self._fail(name, "value is not a valid list", "type_error.list")
            return 0
        if not value:
            self._fail(name, "ensure this value has at least 1 items", "value_error.list.min_items")
            return 0
        for index, item in enumerate(value):
            if not isinstance(item, str):
                self.errors.append(
                    validation_error(["body", name, index], "str type expected", "type_error.str")
                )
        return len(value)


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def _as_float(value: Any) -> float | None:
    if isinstance(value, int | float):
        result = float(value)
    elif isinstance(value, str):
        try:
            result = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return result if math.isfinite(result) else None


_TRUE = {"1", "on", "t", "true", "y", "yes"}
_FALSE = {"0", "off", "f", "false", "n", "no"}


def parse_bool(value: Any) -> bool | None:
    """A boolean as pydantic 1 reads one ("yes", 1, "false"...), or None when it is not one."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
    return None
