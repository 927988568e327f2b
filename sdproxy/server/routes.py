"""Thin HTTP handlers: parse the request, hand it to the cluster, answer as the webui would."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

from sdproxy import __version__
from sdproxy.cluster.benchmark import Benchmarker
from sdproxy.cluster.scheduler import Cluster
from sdproxy.config import ServerSettings
from sdproxy.core import images
from sdproxy.core.request import (
    GenerationRequest,
    InputLimits,
    Kind,
    decodable_images,
    parse_generation,
)
from sdproxy.errors import (
    BodyTimeout,
    ClientGone,
    NotFound,
    RequestValidationError,
    validation_error,
)
from sdproxy.nodes.client import NodeClient
from sdproxy.ops import metrics
from sdproxy.server.accesslog import Outcome, outcome_key
from sdproxy.server.dashboard import cluster_page, in_flight
from sdproxy.server.keys import (
    autosave_key,
    benchmarker_key,
    cluster_key,
    metrics_key,
    settings_key,
)

SHARES_HEADER = "X-Sdproxy-Shares"


def json_response(
    payload: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """A JSON response serialized with orjson (``null`` included, as the webui sends it)."""
    return web.Response(
        body=orjson.dumps(payload), status=status, headers=headers, content_type="application/json"
    )


async def read_body(request: web.Request) -> bytes:
    """The request's raw body; 408 when it takes longer than ``body_timeout_s`` to arrive.

    Handlers read bodies only through here (or read_json), so a slow client cannot hold a
    handler for longer than that.
    """
    timeout_s = request.app[settings_key].server.body_timeout_s
    try:
        async with asyncio.timeout(timeout_s):
            return await request.read()
    except TimeoutError:
        raise BodyTimeout(f"the request body did not arrive within {timeout_s:g} s") from None
    except ConnectionResetError:
        raise ClientGone("the client closed the connection before its body arrived") from None


async def read_json(request: web.Request) -> Any:
    """The request's JSON body; FastAPI's 422 shapes for a missing or malformed one."""
    raw = await read_body(request)
    if not raw.strip():
        raise RequestValidationError(
            [validation_error(["body"], "field required", "value_error.missing")]
        )
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RequestValidationError(
            [
                validation_error(
                    ["body", exc.pos],
                    f"{exc.msg}: line {exc.lineno} column {exc.colno} (char {exc.pos})",
                    "value_error.jsondecode",
                    msg=exc.msg,
                    pos=exc.pos,
                    lineno=exc.lineno,
                    colno=exc.colno,
                )
            ]
        ) from None


def format_shares(shares: list[tuple[str, int, int]]) -> str:
    """``gpu-a:0-3,gpu-b:4-5``: which node rendered which image indices (inclusive)."""
    return ",".join(f"{node}:{first}-{last}" for node, first, last in shares)


def input_limits(server: ServerSettings) -> InputLimits:
    return InputLimits(
        max_width=server.max_width,
        max_height=server.max_height,
        max_steps=server.max_steps,
        allow_image_urls=server.allow_image_urls,
    )


async def check_images(request: GenerationRequest, server: ServerSettings) -> None:
    """422 naming every init image or mask that does not decode, before any node sees it."""
    max_pixels = int(server.max_input_megapixels * 1e6)

    def check_all() -> list[dict[str, Any]]:
        errors = []
        for loc, data in decodable_images(request):
            reason = images.check_b64_image(data, max_pixels)
            if reason is not None:
                errors.append(validation_error(loc, reason, "value_error.image"))
        return errors

    errors = await asyncio.to_thread(check_all)
    if errors:
        raise RequestValidationError(errors)


async def _generate(request: web.Request, kind: Kind) -> web.Response:
    server = request.app[settings_key].server
    body = await read_json(request)
    generation = parse_generation(
        kind, body, max_images=server.max_images_per_request, limits=input_limits(server)
    )
    await check_images(generation, server)
    result = await request.app[cluster_key].generate(generation)
    headers = {SHARES_HEADER: format_shares(result.shares)} if result.shares else None
    # Tens of MB of base64 for a large batch: encode it off the event loop.
    encoded = await asyncio.to_thread(orjson.dumps, result.body)
    response = web.Response(body=encoded, headers=headers, content_type="application/json")
    request[outcome_key] = Outcome(generation.total_images, result.shares)
    if autosave_key in request.app:
        request.app[autosave_key].submit(result.body, result.shares)
    return response


async def txt2img(request: web.Request) -> web.Response:
    """POST /sdapi/v1/txt2img, split over the healthy nodes and merged."""
    return await _generate(request, "txt2img")


async def img2img(request: web.Request) -> web.Response:
    """POST /sdapi/v1/img2img, split over the healthy nodes and merged."""
    return await _generate(request, "img2img")


def node_status(
    cluster: Cluster, benchmarker: Benchmarker, client: NodeClient, now: float
) -> dict[str, Any]:
    """One node's entry in /cluster/status (times are Unix seconds)."""
    stats, health = client.stats, client.health
    lane = cluster.lanes[client.name]
    estimate = cluster.estimate(lane)
    result = benchmarker.results.get(client.name)
    models = cluster.models.nodes[client.name]  # what the last read of its lists found
    return {
        "name": client.name,
        "url": client.settings.base_url,
        "state": health.state,
        "state_reason": health.state_reason,
        "healthy": client.usable,
        "weight": client.settings.weight,
        "speed_estimate": round(metrics.speed_estimate(cluster, client), 4),
        "max_batch_size": client.settings.max_batch_size,
        "images_rendered": stats.images_rendered,
        "requests_sent": stats.requests_sent,
        "queued_images": lane.queued_images,
        "consecutive_failures": health.consecutive_failures,
        "last_error": health.last_error,
        "last_error_at": health.last_error_at,
        "last_ok_at": health.last_ok_at,
        "next_probe_at": None if health.up else health.next_probe_at,
        "models": [entry["title"] for entry in models.entries or () if "title" in entry],
        "current_model": models.loaded,
        "backlog_s": round(lane.backlog_s(now), 3),
        "speed": {
            "source": estimate.source,
            "overhead_s": round(estimate.overhead_s, 4),
            "per_image_s": round(estimate.per_unit_s, 4),  # 20 steps at 512x512
            "samples": estimate.samples,
        },
        "benchmark": {
            "running": client.name in benchmarker.running,
            "measured_at": result.measured_at if result else None,
            "checkpoint": result.checkpoint if result else None,
            "overhead_s": round(result.overhead_s, 4) if result else None,
            "per_image_s": round(result.per_image_s, 4) if result else None,
            "error": benchmarker.errors.get(client.name),
        },
    }


async def cluster_status(request: web.Request) -> web.Response:
    """GET /cluster/status: every node, its health and what it rendered."""
    cluster = request.app[cluster_key]
    benchmarker = request.app[benchmarker_key]
    now = asyncio.get_running_loop().time()
    nodes = [node_status(cluster, benchmarker, client, now) for client in cluster.clients]
    return json_response(
        {
            "version": __version__,
            "queued_images": cluster.queued_images(),
            "max_queued_images": cluster.settings.scheduler.max_queued_images,
            "waiting_images": cluster.waiting_images,
            "nodes": nodes,
            "in_flight": in_flight(cluster),
        }
    )


async def _one_node(request: web.Request, client: NodeClient) -> web.Response:
    now = asyncio.get_running_loop().time()
    cluster, benchmarker = request.app[cluster_key], request.app[benchmarker_key]
    return json_response(node_status(cluster, benchmarker, client, now))


async def disable_node(request: web.Request) -> web.Response:
    """POST /cluster/nodes/{name}/disable: no new work for the node until enabled."""
    client = request.app[cluster_key].disable(request.match_info["name"])
    return await _one_node(request, client)


async def enable_node(request: web.Request) -> web.Response:
    """POST /cluster/nodes/{name}/enable: the node takes work again (probed at once)."""
    client = request.app[cluster_key].enable(request.match_info["name"])
    return await _one_node(request, client)


async def cluster_benchmark(request: web.Request) -> web.Response:
    """Re-run the benchmark of every node, or of ``?node=NAME``, in the background: 202."""
    cluster = request.app[cluster_key]
    wanted = request.query.get("node")
    if wanted is not None and wanted not in cluster.lanes:
        raise NotFound(f"no node named {wanted!r}")
    names = [wanted] if wanted is not None else list(cluster.lanes)
    benchmarker = request.app[benchmarker_key]
    started = benchmarker.start(names)
    running = sorted(benchmarker.running)
    return json_response({"started": started, "running": running}, status=202)


async def prometheus_metrics(request: web.Request) -> web.Response:
    text = request.app[metrics_key].render(request.app.get(cluster_key))
    return web.Response(body=text, headers={"Content-Type": metrics.CONTENT_TYPE})


def add_routes(app: web.Application) -> None:
    # Imported here: those modules build on this one's helpers (json_response, read_json).
    from sdproxy.server import openapi
    from sdproxy.server import webui as webui_routes

    app.router.add_post("/sdapi/v1/txt2img", txt2img)
    app.router.add_post("/sdapi/v1/img2img", img2img)
    app.router.add_get("/cluster/status", cluster_status)
    app.router.add_post("/cluster/nodes/{name}/disable", disable_node)
    app.router.add_post("/cluster/nodes/{name}/enable", enable_node)
    app.router.add_get("/cluster", cluster_page)
    app.router.add_get("/metrics", prometheus_metrics)
    webui_routes.add_webui_routes(app)
    app.router.add_get("/openapi.json", openapi.openapi_json, allow_head=False)
    app.router.add_post("/cluster/benchmark", cluster_benchmark)
