"""The webui API beyond txt2img/img2img, made right for a cluster.

Reads that say what the cluster can do are merged over the healthy nodes; writes that concern
every node are sent to all of them; the rest is one node's work (reference section 1 has the
table). Interrupt, skip and progress, which concern the running requests, are in running.py.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiohttp import web

from sdproxy.cluster.scheduler import Cluster
from sdproxy.core.extension_paths import extension_path
from sdproxy.core.imageurls import any_url_errors
from sdproxy.core.inventory import (
    intersect_named,
    merge_embeddings,
    merge_scripts,
    redact_flags,
    union_named,
)
from sdproxy.errors import (
    NoNodeAvailable,
    NotSupported,
    RequestValidationError,
    validation_error,
)
from sdproxy.nodes.client import NodeClient
from sdproxy.nodes.fanout import NodeCall, call_each, combined_error, first_answer
from sdproxy.server.bodies import json_response, read_body, read_json
from sdproxy.server.keys import cluster_key, settings_key

Merge = Callable[[Sequence[Any]], Any]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _lists(answers: Sequence[Any]) -> list[list[Any]]:
    return [answer for answer in answers if isinstance(answer, list)]


def _dicts(answers: Sequence[Any]) -> list[dict[str, Any]]:
    return [answer for answer in answers if isinstance(answer, dict)]


def _intersection(key: str) -> Merge:
    return lambda answers: intersect_named(_lists(answers), key)


def _union(key: str) -> Merge:
    return lambda answers: union_named(_lists(answers), key)


# What every node can run: the intersection. What routing sends to the nodes that have it: the
# union (first node's entry wins).
MERGED_GETS: dict[str, Merge] = {
    "scripts": lambda answers: merge_scripts(_dicts(answers)),
    "samplers": _intersection("name"),
    "schedulers": _intersection("name"),
    "upscalers": _intersection("name"),
    "sd-models": _union("title"),
    "sd-vae": _union("model_name"),
    "loras": _union("name"),
    "embeddings": lambda answers: merge_embeddings(_dicts(answers)),
}
# Node settings and descriptions that are alike on every node: one healthy node answers.
ONE_NODE_GETS = (
    "options",
    "cmd-flags",
    "memory",
    "prompt-styles",
    "script-info",
    "extensions",
    "face-restorers",
    "realesrgan-models",
    "hypernetworks",
    "latent-upscale-modes",
    "sd-modules",
)
# State every node must share: sent to all healthy nodes at once (POST options has its own).
FAN_OUT_POSTS = (
    "refresh-checkpoints",
    "refresh-vae",
    "refresh-embeddings",
    "refresh-loras",
    "unload-checkpoint",
    "reload-checkpoint",
)
# One node's work, to the least busy node.
ONE_NODE_POSTS = ("extra-single-image", "extra-batch-images", "png-info", "interrogate")

Seen = Callable[[Cluster, dict[str, Any]], Awaitable[None]]  # answers by node


async def _record_models(cluster: Cluster, answers: dict[str, Any]) -> None:
    for node, models in answers.items():  # routing keeps what a client's read found
        cluster.router.record_entries(node, models)


async def _reread_models(cluster: Cluster, answers: dict[str, Any]) -> None:
    await cluster.router.refresh_all(list(answers))  # the nodes' lists changed


# What the cluster learns from the answers to some calls.
ANSWERS_SEEN: dict[str, Seen] = {
    "sd-models": _record_models,
    "refresh-checkpoints": _reread_models,
}
# For one-node reads: which nodes answer best (a node on the cluster's checkpoint tells its
# options right), and what a node's answer must lose before a client sees it.
PREFERRED: dict[str, Callable[[Cluster, NodeClient], bool]] = {
    "options": lambda cluster, client: cluster.router.on_cluster_checkpoint(client.name),
}
SCRUBBED: dict[str, Callable[[Any], Any]] = {
    "cmd-flags": lambda flags: redact_flags(flags) if isinstance(flags, dict) else flags,
}


def _as_is(answer: Any) -> Any:
    return answer


def _cluster(request: web.Request) -> Cluster:
    return request.app[cluster_key]


def _healthy(request: web.Request) -> list[NodeClient]:
    healthy = _cluster(request).usable_clients()
    if not healthy:
        raise NoNodeAvailable("no healthy node: every node is down or unreachable")
    return healthy


def _least_busy(request: web.Request) -> list[NodeClient]:
    """Healthy nodes, least loaded first (queued images for their weight)."""
    cluster = _cluster(request)
    return sorted(
        _healthy(request),
        key=lambda c: cluster.lanes[c.name].queued_images / c.settings.weight,
    )


def _read_timeout_s(request: web.Request) -> float:
    return request.app[settings_key].api.read_timeout_s


def _write_timeout_s(request: web.Request) -> float:
    return request.app[settings_key].api.write_timeout_s


async def _each(request: web.Request, clients: Sequence[NodeClient], call: NodeCall) -> Any:
    """``call`` on every client at once (fanout.call_each), failures told to the cluster."""
    return await call_each(clients, call, _cluster(request).note_failure)


async def _first(request: web.Request, clients: Sequence[NodeClient], call: NodeCall) -> Any:
    """``call`` on each client in turn until one answers (fanout.first_answer)."""
    return await first_answer(clients, call, _cluster(request).note_failure)


# --- reads ---------------------------------------------------------------------------------------


def merged_get(path: str, merge: Merge) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        healthy = _healthy(request)
        timeout_s = _read_timeout_s(request)
        answers, errors = await _each(
            request, healthy, lambda c: c.request("GET", f"sdapi/v1/{path}", timeout_s=timeout_s)
        )
        if not answers:
            raise combined_error(f"GET {path}", errors, answered=0)
        if path in ANSWERS_SEEN:
            await ANSWERS_SEEN[path](_cluster(request), answers)
        # Config order, so that "the first node's entry wins" is the same on every call.
        ordered = [answers[c.name] for c in healthy if c.name in answers]
        return json_response(merge(ordered))

    handler.__doc__ = f"GET /sdapi/v1/{path}, merged over the healthy nodes."
    return handler


def one_node_get(path: str) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        clients = _healthy(request)
        if path in PREFERRED:
            cluster, preferred = _cluster(request), PREFERRED[path]
            clients.sort(key=lambda c: not preferred(cluster, c))
        params = dict(request.query)
        timeout_s = _read_timeout_s(request)
        answer = await _first(
            request,
            clients,
            lambda c: c.request("GET", f"sdapi/v1/{path}", params=params, timeout_s=timeout_s),
        )
        return json_response(SCRUBBED.get(path, _as_is)(answer))

    handler.__doc__ = f"GET /sdapi/v1/{path}, from one healthy node."
    return handler


# --- writes to every node ------------------------------------------------------------------------


def fan_out_post(path: str) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        healthy = _healthy(request)
        timeout_s = _write_timeout_s(request)
        answers, errors = await _each(
            request, healthy, lambda c: c.request("POST", f"sdapi/v1/{path}", timeout_s=timeout_s)
        )
        succeeded = [c for c in healthy if c.name in answers]
        if path in ANSWERS_SEEN:
            await ANSWERS_SEEN[path](_cluster(request), answers)
        # unload-checkpoint leaves the node's sd_model_checkpoint option, which is what routing
        # goes by: its next generation loads that checkpoint again.
        if errors:
            raise combined_error(f"POST {path}", errors, answered=len(answers))
        return json_response(answers[succeeded[0].name])

    handler.__doc__ = f"POST /sdapi/v1/{path}, sent to every healthy node."
    return handler


async def set_options(request: web.Request) -> web.Response:
    """POST /sdapi/v1/options to every healthy node; a checkpoint becomes the cluster's."""
    body = await read_json(request)
    if not isinstance(body, dict):
        raise RequestValidationError(
            [validation_error(["body"], "value is not a valid dict", "type_error.dict")]
        )
    usable = [client.name for client in _healthy(request)]
    await _cluster(request).router.apply_options(body, usable)
    return json_response(None)


# --- one node's work ----------------------------------------------------------------------------


def refuse_urls(request: web.Request, body: Any) -> None:
    """422 for URLs in a forwarded body: nodes fetch nothing for clients (allow_image_urls)."""
    if not request.app[settings_key].server.allow_image_urls:
        errors = any_url_errors(body)
        if errors:
            raise RequestValidationError(errors)


def one_node_post(path: str) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        body = await read_json(request)
        refuse_urls(request, body)
        timeout_s = request.app[settings_key].scheduler.share_timeout_floor_s
        answer = await _first(
            request,
            _least_busy(request),
            lambda c: c.request("POST", f"sdapi/v1/{path}", body, timeout_s=timeout_s),
        )
        return json_response(answer)

    handler.__doc__ = f"POST /sdapi/v1/{path}, to the least busy healthy node."
    return handler


async def extension(request: web.Request) -> web.Response:
    """An extension's own route (e.g. /controlnet/model_list), forwarded to one node.

    A path with a dot segment, or an encoded slash or backslash, is refused with FastAPI's 404
    (what a webui answers for a path it has no route for) before its body is read.
    """
    resource = request.match_info.route.resource
    prefix = resource.canonical.split("/")[1] if resource is not None else ""
    path = extension_path(request.raw_path, prefix)
    if path is None:
        raise web.HTTPNotFound()
    raw = await read_body(request)
    body = await read_json(request) if raw.strip() else None
    refuse_urls(request, body)
    params = dict(request.query)
    timeout_s = request.app[settings_key].scheduler.share_timeout_floor_s
    answer = await _first(
        request,
        _least_busy(request),
        lambda c: c.request(request.method, path, body, params=params, timeout_s=timeout_s),
    )
    return json_response(answer)


async def not_supported(request: web.Request) -> web.Response:
    """create/* and train/*: files and training on one node only, which sdproxy will not do."""
    raise NotSupported(
        f"{request.path} is not supported by sdproxy: it would change one node's local files; "
        "call that node directly"
    )


async def ping(_: web.Request) -> web.Response:
    """GET /internal/ping: sdproxy is up."""
    return json_response({})


def add_webui_routes(app: web.Application) -> None:
    """Register every route of this module; extension prefixes come from the settings."""
    router = app.router
    for path, merge in MERGED_GETS.items():
        router.add_get(f"/sdapi/v1/{path}", merged_get(path, merge), allow_head=False)
    for path in ONE_NODE_GETS:
        router.add_get(f"/sdapi/v1/{path}", one_node_get(path), allow_head=False)
    router.add_post("/sdapi/v1/options", set_options)
    for path in FAN_OUT_POSTS:
        router.add_post(f"/sdapi/v1/{path}", fan_out_post(path))
    for path in ONE_NODE_POSTS:
        router.add_post(f"/sdapi/v1/{path}", one_node_post(path))
    for kind in ("embedding", "hypernetwork"):
        router.add_post(f"/sdapi/v1/create/{kind}", not_supported)
        router.add_post(f"/sdapi/v1/train/{kind}", not_supported)
    router.add_get("/internal/ping", ping, allow_head=False)
    for prefix in app[settings_key].api.extension_prefixes:
        for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):  # not "*": a bounded set
            router.add_route(method, f"/{prefix}/{{tail:.*}}", extension)
