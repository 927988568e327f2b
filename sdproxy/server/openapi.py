"""GET /openapi.json: an OpenAPI 3 document of the routes this sdproxy serves.

The paths come from the application's router, so the document lists exactly what is served;
the generation bodies list the fields sdproxy itself validates (every other webui field is
accepted and passed to the nodes, hence ``additionalProperties``).
"""

from __future__ import annotations

import inspect
from typing import Any

from aiohttp import web

from sdproxy import __version__
from sdproxy.server.bodies import json_response
from sdproxy.server.keys import settings_key

_ERROR = {"$ref": "#/components/schemas/WebuiError"}
_JSON: dict[str, Any] = {}  # any JSON value: the node's own answer, passed on

_BASE_FIELDS: dict[str, Any] = {
    "prompt": {"type": "string", "default": ""},
    "negative_prompt": {"type": "string", "default": ""},
    "seed": {"type": "integer", "nullable": True, "default": -1},
    "subseed": {"type": "integer", "nullable": True, "default": -1},
    "subseed_strength": {"type": "number", "nullable": True, "default": 0},
    "batch_size": {"type": "integer", "minimum": 1, "nullable": True, "default": 1},
    "n_iter": {"type": "integer", "minimum": 1, "nullable": True, "default": 1},
    "steps": {"type": "integer", "minimum": 1, "nullable": True, "default": 50},
    "width": {"type": "integer", "minimum": 1, "nullable": True, "default": 512},
    "height": {"type": "integer", "minimum": 1, "nullable": True, "default": 512},
    "send_images": {"type": "boolean", "default": True},
    "save_images": {"type": "boolean", "default": False},
    "script_name": {"type": "string", "nullable": True},
    "override_settings": {"type": "object", "nullable": True, "additionalProperties": True},
}

SCHEMAS: dict[str, Any] = {
    "Txt2ImgRequest": {
        "type": "object",
        "description": "A webui txt2img body; fields not listed go to the nodes unchanged.",
        "properties": _BASE_FIELDS,
        "additionalProperties": True,
    },
    "Img2ImgRequest": {
        "type": "object",
        "description": "A webui img2img body; fields not listed go to the nodes unchanged.",
        "properties": {
            **_BASE_FIELDS,
            "init_images": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        },
        "required": ["init_images"],
        "additionalProperties": True,
    },
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
    """The OpenAPI 3.0 document of ``app``'s fixed routes."""
    paths: dict[str, dict[str, Any]] = {}
    for route in app.router.routes():
        method = route.method.lower()
        path = route.resource.canonical if route.resource is not None else None
        if method in ("head", "*") or path is None or "{" in path:
            continue  # extension routes forward any method and path: listed in info
        paths.setdefault(path, {})[method] = _operation(path, method, route.handler)
    prefixes = ", ".join(f"/{p}/..." for p in app[settings_key].api.extension_prefixes)
    description = "One Stable Diffusion webui API in front of many webui nodes."
    if prefixes:
        description += f" Extension routes forwarded to a node: {prefixes}."
    return {
        "openapi": "3.0.3",
        "info": {"title": "sdproxy", "version": __version__, "description": description},
        "paths": dict(sorted(paths.items())),
        "components": {"schemas": SCHEMAS},
    }


async def openapi_json(request: web.Request) -> web.Response:
    """GET /openapi.json: this document."""
    return json_response(build_document(request.app))
