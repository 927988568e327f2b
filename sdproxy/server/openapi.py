"""GET /openapi.json: an OpenAPI 3 document of the routes this sdproxy serves.

The paths come from the application's router, so the document lists what is served: every
route, templated ones (``/cluster/nodes/{name}/...``) with their path parameters, except the
extension routes, which forward any path under a prefix and are named in ``info.description``;
the generation bodies are the webui's request models from the table sdproxy parses them with
(``core/webui_model.py``), with sdproxy's bounds; fields of extensions or forks the table does not
know are passed to the nodes, hence ``additionalProperties``.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from sdproxy import __version__
from sdproxy.config import ServerSettings
from sdproxy.core import webui_model
from sdproxy.core.request import SEED_MAX, SEED_MIN
from sdproxy.server.bodies import json_response
from sdproxy.server.keys import settings_key

_ERROR = {"$ref": "#/components/schemas/WebuiError"}
_JSON: dict[str, Any] = {}  # any JSON value: the node's own answer, passed on

_TYPES: dict[str, dict[str, Any]] = {
    "int": {"type": "integer"},
    "float": {"type": "number"},
    "str": {"type": "string"},
    "bool": {"type": "boolean"},
    "list": {"type": "array", "items": {}},
    "list_str": {"type": "array", "items": {"type": "string"}},
    "dict": {"type": "object", "additionalProperties": True},
    "dict_str": {"type": "object", "additionalProperties": True},
}


def _bounds(server: ServerSettings) -> dict[str, dict[str, Any]]:
    """sdproxy's own bounds on top of the webui's model (core/request.py, core/hires.py)."""
    sizes = {"minimum": 1}
    return {
        "seed": {"minimum": SEED_MIN, "maximum": SEED_MAX},
        "subseed": {"minimum": SEED_MIN, "maximum": SEED_MAX},
        "batch_size": {"minimum": 1, "maximum": server.max_images_per_request},
        "n_iter": {"minimum": 1, "maximum": server.max_images_per_request},
        "steps": {"minimum": 1, "maximum": server.max_steps},
        "width": {**sizes, "maximum": server.max_width},
        "height": {**sizes, "maximum": server.max_height},
        "firstphase_width": {"minimum": 0, "maximum": server.max_width},
        "firstphase_height": {"minimum": 0, "maximum": server.max_height},
        "hr_second_pass_steps": {"maximum": server.max_steps},
        "hr_resize_x": {"maximum": server.max_width},
        "hr_resize_y": {"maximum": server.max_height},
        "init_images": {"items": {"type": "string"}, "minItems": 1},
    }


def request_schema(
    fields: Sequence[webui_model.FieldSpec], server: ServerSettings, what: str
) -> dict[str, Any]:
    """The webui's request model as a schema, from the table sdproxy parses bodies with."""
    bounds = _bounds(server)
    properties: dict[str, Any] = {}
    for spec in fields:
        schema = {**_TYPES[spec.kind], **bounds.get(spec.name, {})}
        nullable = spec.nullable and not spec.needed  # null where processing needs it: 422
        if nullable:
            schema["nullable"] = True
        if spec.default is not webui_model.REQUIRED and (spec.default is not None or nullable):
            schema["default"] = spec.default
        properties[spec.name] = schema
    return {
        "type": "object",
        "description": f"A webui {what} body; other fields go to the nodes unchanged.",
        "properties": properties,
        "additionalProperties": True,
    }


def request_schemas(server: ServerSettings) -> dict[str, Any]:
    img2img = request_schema(webui_model.IMG2IMG_FIELDS, server, "img2img")
    img2img["required"] = ["init_images"]  # without them: 404 "Init image not found"
    return {
        "Txt2ImgRequest": request_schema(webui_model.TXT2IMG_FIELDS, server, "txt2img"),
        "Img2ImgRequest": img2img,
    }


SCHEMAS: dict[str, Any] = {
    "GenerationResponse": {
        "type": "object",
        "properties": {
            "images": {"type": "array", "items": {"type": "string", "format": "byte"}},
            "parameters": {"type": "object", "additionalProperties": True},
            "info": {"type": "string", "description": "JSON of the generation's info"},
        },
        "required": ["images", "parameters", "info"],
    },
    "WebuiError": {
        "type": "object",
        "properties": {
            "error": {"type": "string"},
            "detail": {},
            "body": {"type": "string"},
            "errors": {"type": "string"},
            "nodes": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    },
    "HTTPValidationError": {
        "type": "object",
        "properties": {
            "detail": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "loc": {"type": "array", "items": {}},
                        "msg": {"type": "string"},
                        "type": {"type": "string"},
                    },
                    "required": ["loc", "msg", "type"],
                },
            }
        },
    },
    "Progress": {
        "type": "object",
        "properties": {
            "progress": {"type": "number"},
            "eta_relative": {"type": "number"},
            "state": {"type": "object", "additionalProperties": True},
            "current_image": {"type": "string", "nullable": True},
            "textinfo": {"type": "string", "nullable": True},
        },
        "required": ["progress", "eta_relative", "state", "current_image", "textinfo"],
    },
    "ClusterStatus": {
        "type": "object",
        "properties": {
            "version": {"type": "string"},
            "nodes": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "url": {"type": "string"},
                        "healthy": {"type": "boolean"},
                        "weight": {"type": "number"},
                        "images_rendered": {"type": "integer"},
                    },
                    "additionalProperties": True,
                },
            },
        },
        "required": ["version", "nodes"],
    },
}

_REQUEST_BODIES = {
    "/sdapi/v1/txt2img": "Txt2ImgRequest",
    "/sdapi/v1/img2img": "Img2ImgRequest",
}
_RESPONSES = {
    "/sdapi/v1/txt2img": "GenerationResponse",
    "/sdapi/v1/img2img": "GenerationResponse",
    "/sdapi/v1/progress": "Progress",
    "/cluster/status": "ClusterStatus",
}
# Routes that answer something else than JSON (issue 7's dashboard and Prometheus metrics).
_CONTENT_TYPES = {"/cluster": "text/html", "/metrics": "text/plain"}
# POST routes that take no body (the webui's refresh-*, interrupt, ...).
_NO_BODY = ("refresh-", "unload-", "reload-", "interrupt", "skip")


def _operation(path: str, method: str, handler: Any) -> dict[str, Any]:
    doc = inspect.getdoc(handler) or f"{method.upper()} {path}"
    schema = _RESPONSES.get(path)
    ok = {"$ref": f"#/components/schemas/{schema}"} if schema else _JSON
    content_type = _CONTENT_TYPES.get(path, "application/json")
    if content_type != "application/json":
        ok = {"type": "string"}
    operation: dict[str, Any] = {
        "summary": doc.splitlines()[0],
        "operationId": f"{method}_{path.strip('/').replace('/', '_').replace('-', '_')}",
        "responses": {
            "200": {"description": "Success", "content": {content_type: {"schema": ok}}},
            "default": {
                "description": "A webui-shaped error (502 node failed, 503 no node, 504 timeout)",
                "content": {"application/json": {"schema": _ERROR}},
            },
        },
    }
    if method == "post" and not path.rsplit("/", 1)[-1].startswith(_NO_BODY):
        body = _REQUEST_BODIES.get(path)
        body_schema = {"$ref": f"#/components/schemas/{body}"} if body else {"type": "object"}
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": body_schema}},
        }
        invalid = {"$ref": "#/components/schemas/HTTPValidationError"}
        operation["responses"]["422"] = {
            "description": "Validation error",
            "content": {"application/json": {"schema": invalid}},
        }
    if "/create/" in path or "/train/" in path:
        operation["responses"] = {
            "501": {
                "description": "Refused: it would change one node's local files",
                "content": {"application/json": {"schema": _ERROR}},
            }
        }
        operation.pop("requestBody", None)
    if path == "/sdapi/v1/progress":
        operation["parameters"] = [
            {
                "name": "skip_current_image",
                "in": "query",
                "required": False,
                "schema": {"type": "boolean", "default": False},
            }
        ]
    return operation


def build_document(app: web.Application) -> dict[str, Any]:
    """The OpenAPI 3.0 document of ``app``'s routes."""
    paths: dict[str, dict[str, Any]] = {}
    prefixes = tuple(f"/{p}/" for p in app[settings_key].api.extension_prefixes)
    for route in app.router.routes():
        method = route.method.lower()
        path = route.resource.canonical if route.resource is not None else None
        if method in ("head", "*") or path is None or path.startswith(prefixes):
            continue  # extension routes forward any method and path: listed in info
        operation = _operation(path, method, route.handler)
        names = re.findall(r"\{(\w+)\}", path)
        if names:
            operation["parameters"] = [
                *operation.get("parameters", []),
                *(
                    {"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
                    for n in names
                ),
            ]
        paths.setdefault(path, {})[method] = operation
    description = "One Stable Diffusion webui API in front of many webui nodes."
    if prefixes:
        forwarded = ", ".join(f"{p}..." for p in prefixes)
        description += f" Extension routes forwarded to a node: {forwarded}."
    return {
        "openapi": "3.0.3",
        "info": {"title": "sdproxy", "version": __version__, "description": description},
        "paths": dict(sorted(paths.items())),
        "components": {"schemas": {**request_schemas(app[settings_key].server), **SCHEMAS}},
    }


async def openapi_json(request: web.Request) -> web.Response:
    """GET /openapi.json: this document."""
    return json_response(build_document(request.app))
