"""The fake webui's request models: pydantic-1-style coercion, validation, error bodies."""

from __future__ import annotations

import copy
import email.message
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

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


def dump_json(value: Any) -> bytes:
    """FastAPI's JSONResponse rendering."""
    text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.encode()


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
