"""Pure: the webui's txt2img/img2img request models, and pydantic 1's coercion and 422 items.

One table says, for every field of the webui's generated request models (A1111 v1.10.1,
``modules/api/models.py``), its type, default and whether it accepts null. sdproxy parses client
bodies with it (``core/request.py``), the fake webui validates with it (``fakewebui/model.py``)
and ``/openapi.json`` describes the bodies from it (``server/openapi.py``).

``needed`` marks fields the webui's model accepts as null but its processing cannot run
without (``process_images`` fails with a TypeError or an AssertionError): sdproxy refuses null
there with a 422 instead of letting every node fail with a 500.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sdproxy.errors import RequestValidationError as RequestValidationError  # what it raises
from sdproxy.errors import validation_error

Kind = Literal["int", "float", "str", "bool", "list", "list_str", "dict", "dict_str"]
Loc = list[str | int]

REQUIRED: Any = object()  # the default of a field that must be sent


@dataclass(frozen=True)
class FieldSpec:
    """One field of a generated webui request model."""

    name: str
    kind: Kind
    default: Any
    nullable: bool = True
    needed: bool = False  # accepted as null by the model, but processing fails without it


def _fields(*rows: tuple[Any, ...]) -> tuple[FieldSpec, ...]:
    return tuple(FieldSpec(*row) for row in rows)


# Dataclass order of StableDiffusionProcessing minus API_NOT_ALLOWED; every generated field is
# Optional, so null is accepted and kept.
_BASE = _fields(
    ("prompt", "str", "", True, True),  # process_images_inner: assert p.prompt is not None
    ("negative_prompt", "str", ""),
    ("styles", "list_str", None),
    ("seed", "int", -1),
    ("subseed", "int", -1),
    ("subseed_strength", "float", 0, True, True),
    ("seed_resize_from_h", "int", -1, True, True),
    ("seed_resize_from_w", "int", -1, True, True),
    ("sampler_name", "str", None),
    ("scheduler", "str", None),
    ("batch_size", "int", 1, True, True),
    ("n_iter", "int", 1, True, True),
    ("steps", "int", 50, True, True),
    ("cfg_scale", "float", 7.0, True, True),
    ("width", "int", 512, True, True),
    ("height", "int", 512, True, True),
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
        # __post_init__ compares both with 0 and takes them as the first pass size.
        ("firstphase_width", "int", 0, True, True),
        ("firstphase_height", "int", 0, True, True),
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
# With enable_hr, calculate_target_resolution needs these too.
HIRES_NEEDED = ("hr_scale", "hr_resize_x", "hr_resize_y")

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

MODELS: dict[str, tuple[FieldSpec, ...]] = {"txt2img": TXT2IMG_FIELDS, "img2img": IMG2IMG_FIELDS}

# --- pydantic 1's validators (pydantic/validators.py, 1.10) -------------------------------------

_BOOL_TRUE = {1, "1", "on", "t", "true", "y", "yes"}
_BOOL_FALSE = {0, "0", "off", "f", "false", "n", "no"}
_MAX_STR_INT = 4300  # pydantic refuses longer digit strings before calling int()
_TYPE_ERRORS: dict[str, tuple[str, str]] = {
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
    """Validate one non-null value like pydantic 1 does; InvalidValue if it would refuse it."""
    if kind == "int":
        return _to_int(value)
    if kind == "float":
        return _to_float(value)
    if kind == "str":
        return _to_str(value)
    if kind == "bool":
        return _to_bool(value)
    if kind in ("list", "list_str"):
        if not isinstance(value, list | tuple):
            raise InvalidValue("list")
        if kind == "list":
            return list(value)
        items = []
        for index, item in enumerate(value):
            try:
                items.append(_to_str(item))
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
        return {_to_str(key): item for key, item in mapping.items()}
    return mapping


def _to_int(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and len(value) > _MAX_STR_INT:
        raise InvalidValue("int")
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        raise InvalidValue("int") from None


def _to_float(value: Any) -> float:
    if isinstance(value, float):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InvalidValue("float") from None


def _to_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):  # bool included: pydantic 1 makes True "True"
        return str(value)
    raise InvalidValue("str")


def _to_bool(value: Any) -> bool:
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


# --- 422 items ---------------------------------------------------------------------------------


def type_error(loc: Loc, kind: str) -> dict[str, Any]:
    """pydantic 1's item for a value of the wrong type."""
    msg, type_ = _TYPE_ERRORS[kind]
    return validation_error(loc, msg, type_)


def none_not_allowed(loc: Loc) -> dict[str, Any]:
    return validation_error(loc, "none is not an allowed value", "type_error.none.not_allowed")


def missing(loc: Loc) -> dict[str, Any]:
    return validation_error(loc, "field required", "value_error.missing")


def not_le(loc: Loc, limit: int | float, shown: str | None = None) -> dict[str, Any]:
    """pydantic 1's ``le`` item; ``shown`` is the limit as the message spells it."""
    return _bound(loc, "less", "le", limit, shown)


def not_ge(loc: Loc, limit: int | float, shown: str | None = None) -> dict[str, Any]:
    """pydantic 1's ``ge`` item; ``shown`` is the limit as the message spells it."""
    return _bound(loc, "greater", "ge", limit, shown)


def _bound(loc: Loc, word: str, op: str, limit: int | float, shown: str | None) -> dict[str, Any]:
    text = shown if shown is not None else str(limit)
    message = f"ensure this value is {word} than or equal to {text}"
    return validation_error(loc, message, f"value_error.number.not_{op}", limit_value=limit)


# --- a model ------------------------------------------------------------------------------------


@dataclass
class ModelRead:
    """A body read against a model: its ``vars()`` and the errors of each field."""

    specs: dict[str, FieldSpec]  # in schema order, which is FastAPI's order of errors
    values: dict[str, Any]
    errors: dict[str, list[dict[str, Any]]]

    def fail(self, name: str, *items: dict[str, Any]) -> None:
        """Record ``items`` for ``name`` unless the field already failed (pydantic stops there)."""
        self.errors.setdefault(name, list(items))

    def ok(self, name: str) -> bool:
        return name not in self.errors

    def default(self, name: str) -> Any:
        return self.specs[name].default

    def value(self, name: str) -> Any:
        """The coerced value, or the model's default where it is null or refused."""
        value = self.values.get(name)
        return self.default(name) if value is None or not self.ok(name) else value

    def integer(self, name: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
        """An int field as ``conint(ge=minimum, le=maximum)``: the default (an error) if outside."""
        value: int = self.value(name)
        if maximum is not None and value > maximum:
            self.fail(name, not_le(["body", name], maximum))
            return int(self.default(name))
        if minimum is not None and value < minimum:
            self.fail(name, not_ge(["body", name], minimum))
            return int(self.default(name))
        return value

    def number(self, name: str) -> float:
        """A finite float field: pydantic 1 takes "inf" and "nan", which no node can render."""
        value = float(self.value(name) or 0.0)  # txt2img's denoising_strength defaults to null
        if not math.isfinite(value):
            self.fail(name, type_error(["body", name], "float"))
            return float(self.default(name) or 0.0)
        return value

    def sorted_errors(self, extra: Iterable[dict[str, Any]] = ()) -> list[dict[str, Any]]:
        """Errors in schema order, then ``extra``."""
        order = {name: index for index, name in enumerate(self.specs)}
        ordered = sorted(self.errors.items(), key=lambda item: order.get(item[0], len(order)))
        return [error for _, items in ordered for error in items] + list(extra)


def read_model(fields: Sequence[FieldSpec], body: dict[str, Any]) -> ModelRead:
    """Coerce every field of ``body`` as the model would, collecting (not raising) errors."""
    read = ModelRead({spec.name: spec for spec in fields}, {}, {})
    for spec in fields:
        loc: Loc = ["body", spec.name]
        if spec.name not in body:
            if spec.default is REQUIRED:
                read.fail(spec.name, missing(loc))
            else:
                read.values[spec.name] = copy.deepcopy(spec.default)
            continue
        value = body[spec.name]
        if value is None:
            if spec.nullable:
                read.values[spec.name] = None
            else:
                read.fail(spec.name, none_not_allowed(loc))
            continue
        try:
            read.values[spec.name] = coerce(spec.kind, value)
        except InvalidValue as exc:
            read.fail(spec.name, type_error([*loc, *exc.loc], exc.kind))
    return read


def validate_model(fields: Sequence[FieldSpec], body: Any) -> dict[str, Any]:
    """The request model's ``vars()`` (every field in schema order), or FastAPI's 422."""
    if body is None:
        raise RequestValidationError([missing(["body"])])
    try:
        data = coerce("dict", body)
    except InvalidValue:
        raise RequestValidationError([type_error(["body"], "dict")]) from None
    read = read_model(fields, data)
    if read.errors:
        raise RequestValidationError(read.sorted_errors())
    return read.values
