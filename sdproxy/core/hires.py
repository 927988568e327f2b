"""Pure: the sizes a txt2img job renders at, as the webui computes them (``modules/processing.py``).

``StableDiffusionProcessingTxt2Img``:

- ``__post_init__``: a non-zero ``firstphase_width`` or ``firstphase_height`` replaces the size
  of the first pass (hires fix or not);
- ``calculate_target_resolution`` (with ``enable_hr``): with the option
  ``use_old_hires_fix_width_height`` the width and height become the hires target and the first
  pass shrinks to about 512x512 (``old_hires_fix_first_pass_dimensions``); then the second pass
  renders at ``int(size * hr_scale)``, or at ``hr_resize_x``/``hr_resize_y`` with the other side
  in proportion (integer division), or, with both set, at the smallest size of the first pass's
  aspect ratio that covers them (the latent is cropped to the target afterwards, so the cost is
  the covering size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sdproxy.core.webui_model import HIRES_NEEDED, Loc, ModelRead, none_not_allowed, not_ge, not_le
from sdproxy.errors import validation_error

OLD_SIZING_OPTION = "use_old_hires_fix_width_height"


@dataclass(frozen=True)
class Pass:
    """One sampling pass: its size, and the request field that decides it."""

    width: float  # float only for hr_scale's product before int(); see ``size``
    height: float
    driver: str

    @property
    def size(self) -> tuple[int, int]:
        """The pixel size the webui renders (``int()`` of hr_scale's products)."""
        return int(self.width), int(self.height)


@dataclass(frozen=True)
class Passes:
    """The first pass and, with hires fix, the second."""

    first: Pass
    hires: Pass | None


def old_first_pass(width: int, height: int) -> tuple[int, int]:
    """``old_hires_fix_first_pass_dimensions``: about 512x512 pixels, multiples of 64."""
    scale = math.sqrt(512 * 512 / (width * height))
    return math.ceil(scale * width / 64) * 64, math.ceil(scale * height / 64) * 64


def plan_passes(
    width: int,
    height: int,
    *,
    firstphase: tuple[int, int] = (0, 0),
    enable_hr: bool = False,
    hr_scale: float = 2.0,
    hr_resize: tuple[int, int] = (0, 0),
    old_sizing: bool = False,
) -> Passes:
    """Both passes of a txt2img job; width and height must be positive.

    A size may come out zero or negative (hr_scale 0, a negative resize): the caller checks it.
    """
    first = Pass(width, height, "width")
    if firstphase != (0, 0):
        first = Pass(firstphase[0], firstphase[1], "firstphase_width")
    if not enable_hr or first.width <= 0 or first.height <= 0:
        return Passes(first, None)
    w, h = int(first.width), int(first.height)
    resize_x, resize_y = hr_resize
    if old_sizing:
        resize_x, resize_y = w, h
        w, h = old_first_pass(w, h)
        first = Pass(w, h, OLD_SIZING_OPTION)
    if resize_x == 0 and resize_y == 0:
        return Passes(first, Pass(w * hr_scale, h * hr_scale, "hr_scale"))
    driver = OLD_SIZING_OPTION if old_sizing else None
    if resize_y == 0:
        x_driven = True
    elif resize_x == 0:
        x_driven = False
    else:
        x_driven = w / h < resize_x / resize_y  # float ratios, as the webui compares them
    if x_driven:
        hires = Pass(resize_x, resize_x * h // w, driver or "hr_resize_x")
    else:
        hires = Pass(resize_y * w // h, resize_y, driver or "hr_resize_y")
    return Passes(first, hires)


def resize_limits(
    driver: str, width: int, height: int, max_width: int, max_height: int
) -> tuple[int, int]:
    """(lowest, highest) value of hr_resize_x or hr_resize_y that keeps both sides in 1..max.

    For ``hr_resize_x`` the height is ``x * height // width``; for ``hr_resize_y`` the width is
    ``y * width // height``: solved for the driver with integer arithmetic.
    """
    if driver == "hr_resize_x":
        own_max, other_max, along, across = max_width, max_height, width, height
    else:
        own_max, other_max, along, across = max_height, max_width, height, width
    # value * across // along <= other_max  <=>  value <= ((other_max + 1) * along - 1) // across
    highest = min(own_max, ((other_max + 1) * along - 1) // across)
    # value * across // along >= 1  <=>  value >= ceil(along / across)
    lowest = max(1, -(-along // across))
    return lowest, highest


# --- checking a request's passes -----------------------------------------------------------------

_UNBOUNDED = -(2**63)  # the webui accepts any value for hires fix's ints; only the top is bounded


def check_passes(
    read: ModelRead, width: int, height: int, max_width: int, max_height: int, max_steps: int
) -> Passes | None:
    """txt2img's passes within the bounds, errors recorded in ``read``; None if not computable.

    Every size is checked as the webui will render it, so no combination of hr_scale,
    hr_resize_x/y, firstphase_* or the old hires sizing renders more than max_width x max_height.
    """
    read.integer("hr_second_pass_steps", maximum=max_steps)
    resize_x = read.integer("hr_resize_x", minimum=_UNBOUNDED, maximum=max_width)
    resize_y = read.integer("hr_resize_y", minimum=_UNBOUNDED, maximum=max_height)
    firstphase = (
        read.integer("firstphase_width", minimum=0, maximum=max_width),
        read.integer("firstphase_height", minimum=0, maximum=max_height),
    )
    if firstphase != (0, 0):
        for name, value in zip(("firstphase_width", "firstphase_height"), firstphase, strict=True):
            if value < 1:  # one of the two set: the other would be a size of 0
                read.fail(name, not_ge(["body", name], 1))
    enable_hr = bool(read.values.get("enable_hr")) and read.ok("enable_hr")  # null means off
    if enable_hr:
        for name in HIRES_NEEDED:
            if name in read.values and read.values[name] is None:
                read.fail(name, none_not_allowed(["body", name]))
    scale = read.number("hr_scale")
    inputs = ("width", "height", "enable_hr", "hr_scale", "hr_resize_x", "hr_resize_y")
    if not all(read.ok(name) for name in (*inputs, "firstphase_width", "firstphase_height")):
        return None
    overrides = read.values.get("override_settings") or {}
    passes = plan_passes(
        width,
        height,
        firstphase=firstphase,
        enable_hr=enable_hr,
        hr_scale=scale,
        hr_resize=(resize_x, resize_y),
        old_sizing=bool(overrides.get(OLD_SIZING_OPTION)),
    )
    for each in (passes.first, passes.hires):
        if each is not None:
            _check_pass(read, each, passes.first.size, max_width, max_height)
    return passes


def _check_pass(
    read: ModelRead, each: Pass, first: tuple[int, int], max_width: int, max_height: int
) -> None:
    """A 422 naming the field that makes ``each`` larger than the bounds, or empty."""
    too_big = each.width >= max_width + 1 or each.height >= max_height + 1  # int() truncates
    too_small = each.width < 1 or each.height < 1
    if not (too_big or too_small) or each.driver in ("width", "firstphase_width"):
        return  # the first pass's own fields are bounded one by one
    name = each.driver
    loc: Loc = ["body", name]
    if name == "hr_scale":
        if too_big:
            limit = min(max_width / first[0], max_height / first[1])
            read.fail(name, not_le(loc, limit, f"{limit:g}"))
        else:
            limit = max(1 / first[0], 1 / first[1])
            read.fail(name, not_ge(loc, limit, f"{limit:g}"))
    elif name in ("hr_resize_x", "hr_resize_y"):
        lowest, highest = resize_limits(name, *first, max_width, max_height)
        read.fail(name, not_le(loc, highest) if too_big else not_ge(loc, lowest))
    else:  # the old sizing, switched on in override_settings
        loc = ["body", "override_settings", OLD_SIZING_OPTION]
        width, height = each.size
        message = (
            f"with {OLD_SIZING_OPTION} a pass renders {width}x{height}: "
            f"ensure it is within 1x1 and {max_width}x{max_height}"
        )
        read.fail("override_settings", validation_error(loc, message, "value_error.hires.size"))
