"""Pure: read a txt2img/img2img body into what sdproxy relies on, and build each node's body.

The body is validated against the webui's own request model (``core/webui_model.py``: the same
coercion and 422 items), then against what would fail on a node or escape sdproxy's bounds:
null where processing needs a value, seeds that overflow once an image's offset is added, sizes
and steps over the configured bounds (hires fix's pass computed as the webui does, in
``core/hires.py``). The body itself travels to the nodes untouched but for batch and seeds.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Literal

from sdproxy.core import hires, webui_model
from sdproxy.core.imageurls import image_url_errors, is_url
from sdproxy.core.webui_model import (
    Loc,
    ModelRead,
    coerce,
    none_not_allowed,
    not_ge,
    not_le,
    type_error,
)
from sdproxy.errors import NotFound, RequestValidationError, validation_error

Kind = Literal["txt2img", "img2img"]

# The webui draws random seeds from this range (modules/processing.py, get_fixed_seed).
SEED_RANGE = 4294967294
# Every image's seed (and subseed) seeds a torch generator, which takes this range; sdproxy's
# JSON (orjson) carries integers of 64 bits, so node answers could not echo more either.
SEED_MIN = -(2**63)
SEED_MAX = 2**64 - 1


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
        raise RequestValidationError([webui_model.type_error(["body"], "dict")])
    read = webui_model.read_model(webui_model.MODELS[kind], body)
    for spec in webui_model.MODELS[kind]:
        if spec.needed and spec.name in body and body[spec.name] is None:
            read.fail(spec.name, none_not_allowed(["body", spec.name]))
    batch_size = read.integer("batch_size", minimum=1)
    n_iter = read.integer("n_iter", minimum=1)
    steps = read.integer("steps", minimum=1, maximum=limits.max_steps)
    width = read.integer("width", minimum=1, maximum=limits.max_width)
    height = read.integer("height", minimum=1, maximum=limits.max_height)
    subseed_strength = read.number("subseed_strength")
    images = batch_size * n_iter
    _check_seed(read, "seed", 1 if subseed_strength != 0 else images)
    _check_seed(read, "subseed", images)
    init_images = _image_list(read, body) if kind == "img2img" else 0
    passes = None
    if kind == "txt2img":
        bounds = (limits.max_width, limits.max_height, limits.max_steps)
        passes = hires.check_passes(read, width, height, *bounds)
    denoising_strength = read.number("denoising_strength")
    extra = [] if limits.allow_image_urls else image_url_errors(body)
    if read.errors or extra:
        raise RequestValidationError(read.sorted_errors(extra))
    if kind == "img2img" and body.get("init_images") is None:
        raise NotFound("Init image not found")
    if images > max_images:
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
    values = read.values
    first = passes.first.size if passes else (width, height)
    second = passes.hires.size if passes and passes.hires else None
    second_steps = read.integer("hr_second_pass_steps") if second else 0
    return GenerationRequest(
        kind=kind,
        body=body,
        batch_size=batch_size,
        n_iter=n_iter,
        seed=None if values["seed"] in (None, -1) else values["seed"],
        subseed=None if values["subseed"] in (None, -1) else values["subseed"],
        subseed_strength=subseed_strength,
        send_images=values["send_images"],
        save_images=values["save_images"],
        script_name=values["script_name"] or None,
        init_images=init_images,
        steps=steps,
        width=first[0],
        height=first[1],
        echo={key: values[key] for key in _REWRITTEN},
        denoising_strength=denoising_strength,
        hr_steps=None if second is None else (second_steps if second_steps > 0 else steps),
        hr_width=second[0] if second else 0,
        hr_height=second[1] if second else 0,
    )


# Fields node_body() rewrites; parameters echo them as the client sent them.
_REWRITTEN = ("batch_size", "n_iter", "seed", "subseed")


def _check_seed(read: ModelRead, name: str, images: int) -> None:
    """Each image's seed (seed + 0 .. images - 1) seeds a generator; -1 stays random."""
    value = read.values.get(name)
    if value is None or value == -1 or not read.ok(name):
        return
    loc: Loc = ["body", name]
    if value > SEED_MAX - (images - 1):
        read.fail(name, not_le(loc, SEED_MAX - (images - 1)))
    elif value < SEED_MIN:
        read.fail(name, not_ge(loc, SEED_MIN))
    elif value < -1 <= value + images - 1:
        # A share starting at that image would send a node -1, which it reads as random.
        message = (
            f"with {images} images one would get the seed -1, which means random: "
            f"ensure this value is -1, at least 0 or at most {-images - 1}"
        )
        read.fail(name, validation_error(loc, message, "value_error.seed.random"))


def _image_list(read: ModelRead, body: dict[str, Any]) -> int:
    """How many init images: a non-empty list of strings (base64 or data URIs)."""
    value = body.get("init_images")
    if value is None or not read.ok("init_images"):
        return 0
    loc: Loc = ["body", "init_images"]
    if not value:
        message = "ensure this value has at least 1 items"
        read.fail("init_images", validation_error(loc, message, "value_error.list.min_items"))
        return 0
    bad = [index for index, item in enumerate(value) if not isinstance(item, str)]
    if bad:
        read.fail("init_images", *(type_error([*loc, index], "str") for index in bad))
    return len(value)


def parse_bool(value: Any) -> bool | None:
    """A boolean as pydantic 1 reads one ("yes", 1, "false"...), or None when it is not one."""
    try:
        return bool(coerce("bool", value))
    except webui_model.InvalidValue:
        return None
