"""The fake webui's aiohttp app: endpoints, auth, error middleware, serving."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from sdproxy.fakewebui.catalog import (
    LATENT_MODES,
    SELECTABLE_SCRIPTS,
    cmd_flags,
    find_checkpoint,
    memory_stats,
    sampler_entries,
    scheduler_entries,
    upscaler_entries,
)
from sdproxy.fakewebui.infotext import parse_infotext
from sdproxy.fakewebui.jobs import generate
from sdproxy.fakewebui.model import (
    REQUIRED,
    FieldSpec,
    InvalidValue,
    Kind,
    RequestValidationError,
    WebuiError,
    coerce,
    dump_json,
    parse_json_body,
    validate_request,
)
from sdproxy.fakewebui.node import FakeNode, FakeNodeSettings
from sdproxy.fakewebui.pixels import b64_png, decode_image, encode_png, image_digest

# --- endpoints ----------------------------------------------------------------------------------

Endpoint = Callable[[FakeNode, web.Request, Any], Awaitable[Any]]


def _json(value: Any, status: int = 200) -> web.Response:
    return web.Response(body=dump_json(value), status=status, content_type="application/json")


def _body_model(payload: Any, *rows: tuple[str, Kind, Any]) -> dict[str, Any]:
    """A small pydantic request model (png-info, interrogate, extras)."""
    return validate_request([FieldSpec(n, k, d, nullable=False) for n, k, d in rows], payload)


async def _progress(node: FakeNode, request: web.Request, _: Any) -> Any:
    raw = request.query.get("skip_current_image", "false")
    try:
        skip = bool(coerce("bool", raw))
    except InvalidValue:
        loc = ["query", "skip_current_image"]
        msg = "value could not be parsed to a boolean"
        raise RequestValidationError(
            [{"loc": loc, "msg": msg, "type": "type_error.bool"}]
        ) from None
    return node.state.progress(skip_current_image=skip)


async def _interrupt(node: FakeNode, _: web.Request, __: Any) -> Any:
    node.state.interrupted = True
    return {}


async def _skip(node: FakeNode, _: web.Request, __: Any) -> Any:
    node.state.skipped = True
    return None


async def _get_options(node: FakeNode, _: web.Request, __: Any) -> Any:
    return node.options


async def _set_options(node: FakeNode, _: web.Request, payload: Any) -> Any:
    """Api.set_config: a checkpoint change loads under the queue lock before answering."""
    if payload is None:
        missing = {"loc": ["body"], "msg": "field required", "type": "value_error.missing"}
        raise RequestValidationError([missing])
    try:
        changes: dict[str, Any] = coerce("dict_str", payload)
    except InvalidValue:
        invalid = {"loc": ["body"], "msg": "value is not a valid dict", "type": "type_error.dict"}
        raise RequestValidationError([invalid]) from None
    name = changes.get("sd_model_checkpoint")
    checkpoint = find_checkpoint(name, node.checkpoints())
    if name is not None and checkpoint is None:
        raise WebuiError(500, "RuntimeError", errors=f"model {name!r} not found")
    for key, value in changes.items():
        if node.options.get(key) == value:
            continue
        if key not in node.options:
            raise WebuiError(500, "KeyError", errors=repr(key))
        if key == "sd_model_checkpoint" and checkpoint is not None:
            async with node.queue_lock:
                await node.load_checkpoint(checkpoint)
            node.options["sd_model_checkpoint"] = checkpoint.title
            node.options["sd_checkpoint_hash"] = checkpoint.sha256
        else:
            node.options[key] = value
    return None


async def _png_info(_: FakeNode, __: web.Request, payload: Any) -> Any:
    encoded = _body_model(payload, ("image", "str", REQUIRED))["image"].strip()
    if not encoded:
        return {"info": "", "items": {}, "parameters": {}}
    image = await asyncio.to_thread(decode_image, encoded)
    items = {k: v for k, v in image.info.items() if isinstance(k, str) and isinstance(v, str)}
    geninfo = items.pop("parameters", "")
    return {"info": geninfo, "items": items, "parameters": parse_infotext(geninfo)}


async def _interrogate(node: FakeNode, _: web.Request, payload: Any) -> Any:
    req = _body_model(payload, ("image", "str", ""), ("model", "str", "clip"))
    image = await asyncio.to_thread(decode_image, req["image"])
    if req["model"] not in ("clip", "deepdanbooru"):
        raise WebuiError.http(404, "Model not found")
    async with node.queue_lock:
        tag = (await asyncio.to_thread(image_digest, image)).hex()[:8]
    if req["model"] == "clip":
        return {"caption": f"a simulated picture {tag}"}
    return {"caption": f"simulated, picture_{tag}"}


async def _extra_single_image(node: FakeNode, _: web.Request, payload: Any) -> Any:
    req = _body_model(
        payload,
        ("resize_mode", "int", 0),
        ("upscaling_resize", "float", 2.0),
        ("upscaling_resize_w", "int", 512),
        ("upscaling_resize_h", "int", 512),
        ("upscaler_1", "str", "None"),
        ("image", "str", ""),
    )
    image = await asyncio.to_thread(decode_image, req["image"])

    def upscale() -> str:
        result = image.convert("RGB")
        if req["upscaler_1"] != "None":
            scale = req["upscaling_resize"]
            size = (int(result.width * scale), int(result.height * scale))
            if req["resize_mode"] != 0:
                size = (req["upscaling_resize_w"], req["upscaling_resize_h"])
            result = result.resize(size)
        return b64_png(encode_png(result, None))

    async with node.queue_lock:
        encoded = await asyncio.to_thread(upscale)
    return {"html_info": "", "image": encoded}


async def _extra_batch_images(node: FakeNode, _: web.Request, payload: Any) -> Any:
    """Api.extras_batch_images: each of imageList[{data, name}] through the same upscaler."""
    req = _body_model(payload, ("imageList", "list", []), ("upscaling_resize", "float", 2.0))
    results = []
    for index, item in enumerate(req["imageList"]):
        if not isinstance(item, dict) or not isinstance(item.get("data"), str):
            loc = ["body", "imageList", index, "data"]
            raise RequestValidationError(
                [{"loc": loc, "msg": "field required", "type": "value_error.missing"}]
            )
        single = dict(payload, image=item["data"])
        single.pop("imageList", None)
        results.append((await _extra_single_image(node, _, single))["image"])
    return {"html_info": "", "images": results}


def _embedding(node: FakeNode, name: str) -> dict[str, Any]:
    checkpoint = node.checkpoints()[0]
    return {
        "step": None,
        "sd_checkpoint": checkpoint.shorthash,
        "sd_checkpoint_name": checkpoint.model_name,
        "shape": 768,
        "vectors": 1,
    }


def _static(value: Callable[[FakeNode], Any]) -> Endpoint:
    async def endpoint(node: FakeNode, _: web.Request, __: Any) -> Any:
        return value(node)

    return endpoint


def _script_info(node: FakeNode) -> Any:
    settings = node.settings
    return [
        {"name": name, "is_alwayson": name not in SELECTABLE_SCRIPTS, "is_img2img": img2img}
        | {"args": []}
        for img2img, names in ((False, settings.scripts_txt2img), (True, settings.scripts_img2img))
        for name in names
    ]


_GETS: dict[str, Endpoint] = {
    "sd-models": _static(lambda node: [c.entry() for c in node.checkpoints()]),
    "options": _get_options,
    "samplers": _static(lambda node: sampler_entries(node.settings.samplers)),
    "schedulers": _static(lambda _: scheduler_entries()),
    "upscalers": _static(lambda _: upscaler_entries()),
    "latent-upscale-modes": _static(lambda _: [{"name": name} for name in LATENT_MODES]),
    "sd-vae": _static(
        lambda node: [
            {"model_name": name, "filename": f"/stable-diffusion-webui/models/VAE/{name}"}
            for name in node.settings.vaes
        ]
    ),
    "hypernetworks": _static(lambda _: []),
    "face-restorers": _static(
        lambda _: [{"name": "CodeFormer", "cmd_dir": None}, {"name": "GFPGAN", "cmd_dir": None}]
    ),
    "realesrgan-models": _static(lambda _: []),
    "prompt-styles": _static(lambda _: []),
    "embeddings": _static(
        lambda node: {
            "loaded": {name: _embedding(node, name) for name in node.settings.embeddings},
            "skipped": {},
        }
    ),
    "extensions": _static(lambda _: []),
    "scripts": _static(
        lambda node: {
            "txt2img": list(node.settings.scripts_txt2img),
            "img2img": list(node.settings.scripts_img2img),
        }
    ),
    "script-info": _static(_script_info),
    "memory": _static(lambda _: memory_stats()),
    "cmd-flags": _static(
        lambda node: cmd_flags(node.settings.api_auth) | {"gradio_auth": node.settings.gradio_auth}
    ),
    "progress": _progress,
    "loras": _static(
        lambda node: [
            {
                "name": name,
                "alias": name,
                "path": f"/stable-diffusion-webui/models/Lora/{name}.safetensors",
                "metadata": {},
            }
            for name in node.settings.loras
        ]
    ),
}
_POSTS: dict[str, tuple[Endpoint, bool]] = {  # path: (endpoint, takes a JSON body)
    "options": (_set_options, True),
    "interrupt": (_interrupt, False),
    "skip": (_skip, False),
    "refresh-checkpoints": (_static(lambda _: None), False),
    "refresh-vae": (_static(lambda _: None), False),
    "refresh-embeddings": (_static(lambda _: None), False),
    "refresh-loras": (_static(lambda _: None), False),
    "unload-checkpoint": (_static(lambda _: {}), False),
    "reload-checkpoint": (_static(lambda _: {}), False),
    "png-info": (_png_info, True),
    "interrogate": (_interrogate, True),
    "extra-single-image": (_extra_single_image, True),
    "extra-batch-images": (_extra_batch_images, True),
}
_CONTROLNET: dict[str, Callable[[FakeNode], Any]] = {
    "version": lambda _: {"version": 2},
    "model_list": lambda _: {"model_list": ["control_v11p_sd15_canny [d14c016b]"]},
    "module_list": lambda _: {"module_list": ["none", "canny", "depth"]},
}
# The Lora extension registers these itself, outside Api.add_api_route and its auth.
_OPEN = frozenset({"loras", "refresh-loras"})


# --- HTTP plumbing ------------------------------------------------------------------------------

_NODE_KEY = web.AppKey("fake_node", FakeNode)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _check_auth(api_auth: str | None, header: str | None) -> None:
    """FastAPI's HTTPBasic plus Api.auth; the 401s go out without WWW-Authenticate."""
    if not api_auth:
        return
    scheme, _, param = (header or "").partition(" ")
    if not header or scheme.lower() != "basic":
        raise WebuiError.http(401, "Not authenticated")
    try:
        decoded = base64.b64decode(param).decode("ascii")
    except (ValueError, binascii.Error):
        raise WebuiError.http(401, "Invalid authentication credentials") from None
    username, separator, password = decoded.partition(":")
    if not separator:
        raise WebuiError.http(401, "Invalid authentication credentials")
    credentials = dict(entry.partition(":")[::2] for entry in api_auth.split(","))
    expected = credentials.get(username)
    # Compare even for an unknown user, so timing does not tell which names exist.
    matches = hmac.compare_digest(password.encode(), (expected or "\0" + password).encode())
    if expected is None or not matches:
        raise WebuiError.http(401, "Incorrect username or password")


def _handler(endpoint: Endpoint, *, body: bool, auth: bool) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        node = request.app[_NODE_KEY]
        node.requests[f"{request.method} {request.path}"] += 1
        node.last_headers[f"{request.method} {request.path}"] = dict(request.headers)
        # FastAPI decodes the JSON body before dependencies run, so bad JSON beats a 401.
        payload = None
        if body:
            payload = parse_json_body(await request.read(), request.headers.get("Content-Type"))
        if auth:
            _check_auth(node.settings.api_auth, request.headers.get("Authorization"))
        result = await endpoint(node, request, payload)
        return result if isinstance(result, web.StreamResponse) else _json(result)

    return handle


@web.middleware
async def _webui_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """api_middleware: webui error bodies and X-Process-Time on every response."""
    started = time.perf_counter()
    response: web.StreamResponse
    try:
        response = await handler(request)
    except web.HTTPException as exc:  # routing errors keep starlette's plain shape
        response = _json({"detail": exc.reason}, status=exc.status)
        if isinstance(exc, web.HTTPMethodNotAllowed):
            response.headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
    except RequestValidationError as exc:
        response = _json({"detail": exc.errors}, status=422)
    except WebuiError as exc:
        response = _json(exc.body(), status=exc.status)
    except Exception as exc:  # the webui answers any other exception the same way
        error = {"error": type(exc).__name__, "detail": "", "body": "", "errors": str(exc)}
        response = _json(error, status=500)
    if not response.prepared:  # a streamed answer (a fault) has sent its headers already
        response.headers["X-Process-Time"] = str(round(time.perf_counter() - started, 4))
        _gzip(request, response)
    return response


def _gzip(request: web.Request, response: web.StreamResponse) -> None:
    """starlette's GZipMiddleware(minimum_size=1000), which the webui installs: gzip answers
    of 1000 bytes or more for clients that accept it."""
    accepts = "gzip" in request.headers.get("Accept-Encoding", "")
    body = response.body if isinstance(response, web.Response) else None
    if accepts and isinstance(body, bytes) and len(body) >= 1000:
        response.enable_compression(web.ContentCoding.gzip)


def create_fake_app(node: FakeNode) -> web.Application:
    """The node's aiohttp application: the /sdapi/v1 routes plus /internal/ping."""
    app = web.Application(middlewares=[_webui_middleware], client_max_size=1024**3)
    app[_NODE_KEY] = node
    add = app.router.add_route
    add("POST", "/sdapi/v1/{mode:txt2img|img2img}", _handler(generate, body=True, auth=True))
    for path, endpoint in _GETS.items():
        add("GET", f"/sdapi/v1/{path}", _handler(endpoint, body=False, auth=path not in _OPEN))
    for path, (endpoint, body) in _POSTS.items():
        add("POST", f"/sdapi/v1/{path}", _handler(endpoint, body=body, auth=path not in _OPEN))
    add("GET", "/internal/ping", _handler(_static(lambda _: {}), body=False, auth=False))
    # Not the webui's: what tests ask a subprocess node (max_concurrent_jobs, ...).
    add("GET", "/fake/stats", _handler(_static(FakeNode.stats), body=False, auth=False))
    # A small part of the ControlNet extension's routes, registered at the host root.
    for path, answer in _CONTROLNET.items():
        add("GET", f"/controlnet/{path}", _handler(_static(answer), body=False, auth=False))

    async def stop_jobs(_: web.Application) -> None:
        await node.aclose()

    app.on_shutdown.append(stop_jobs)
    return app


async def serve_fake_node(settings: FakeNodeSettings, host: str, port: int) -> None:
    """Run a fake node until cancelled (used by `sdproxy fake-node` and `sdproxy demo`)."""
    runner = web.AppRunner(create_fake_app(FakeNode(settings)), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
