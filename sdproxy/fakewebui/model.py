"""The fake webui's request handling: error bodies, JSON bodies as FastAPI reads them, models.

The models, coercion and 422 items are sdproxy's own table (``sdproxy.core.webui_model``), so
the fake and the proxy cannot drift apart.
"""

from __future__ import annotations

import email.message
import json
from collections.abc import Sequence
from typing import Any

from sdproxy.core.webui_model import (
    IMG2IMG_FIELDS,
    REQUIRED,
    TXT2IMG_FIELDS,
    FieldSpec,
    InvalidValue,
    Kind,
    RequestValidationError,
    coerce,
    validate_model,
)

__all__ = [
    "IMG2IMG_FIELDS",
    "REQUIRED",
    "TXT2IMG_FIELDS",
    "FieldSpec",
    "InvalidValue",
    "Kind",
    "RequestValidationError",
    "WebuiError",
    "check_torch_seeds",
    "coerce",
    "dump_json",
    "parse_json_body",
    "validate_request",
]

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


# --- request model (pydantic 1 as used by webui v1.10.1): the table shared with sdproxy ------

# Torch's generators take seeds in this range (torch.Generator.manual_seed); the webui passes
# every image's seed to one, so a seed beyond it fails the job.
TORCH_SEED_MIN = -(2**63)
TORCH_SEED_MAX = 2**64 - 1


def check_torch_seeds(all_seeds: list[int], all_subseeds: list[int], strength: float) -> None:
    """rng.ImageRNG: a generator per seed, and per subseed when a subseed strength is set."""
    used = all_seeds + (all_subseeds if strength != 0 else [])
    if any(not TORCH_SEED_MIN <= seed <= TORCH_SEED_MAX for seed in used):
        raise WebuiError(500, "RuntimeError", errors="Overflow when unpacking long")


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
    return validate_model(fields, body)
