"""Interrupt, skip and progress: the webui calls that concern the requests running now."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from sdproxy.cluster.published import Rendering, oldest_rendering
from sdproxy.cluster.scheduler import Cluster
from sdproxy.core.progress import NodeProgress, aggregate_progress, idle_progress
from sdproxy.core.request import parse_bool
from sdproxy.errors import RequestValidationError, validation_error
from sdproxy.nodes.fanout import call_each, combined_error
from sdproxy.server.bodies import json_response
from sdproxy.server.keys import cluster_key, settings_key


def _cluster(request: web.Request) -> Cluster:
    return request.app[cluster_key]


def _read_timeout_s(request: web.Request) -> float:
    return request.app[settings_key].api.read_timeout_s


async def _tell(request: web.Request, nodes: list[str], path: str) -> None:
    answers, errors = await _cluster(request).tell(nodes, path)
    if errors:
        raise combined_error(f"POST {path}", errors, answered=len(answers))


async def interrupt(request: web.Request) -> web.Response:
    """POST /sdapi/v1/interrupt: the running requests stop and return what is finished."""
    cluster = _cluster(request)
    cluster.state.broadcast("interrupt")  # the other replicas' requests too
    await _tell(request, cluster.interrupt_running(), "interrupt")
    return json_response({})


async def skip(request: web.Request) -> web.Response:
    """POST /sdapi/v1/skip: the nodes working for running requests skip their current batch."""
    cluster = _cluster(request)
    cluster.state.broadcast("skip")
    await _tell(request, cluster.running_nodes(), "skip")
    return json_response(None)


async def progress(request: web.Request) -> web.Response:
    """GET /sdapi/v1/progress: the running request as one webui shows its current job.

    With several requests rendering at once, the oldest is the job shown, as on a webui the
    others would wait in its queue. Idle, the state keeps the last request's figures.
    """
    raw = request.query.get("skip_current_image", "false")
    skip_image = parse_bool(raw)
    if skip_image is None:
        raise RequestValidationError(
            [
                validation_error(
                    ["query", "skip_current_image"],
                    "value could not be parsed to a boolean",
                    "type_error.bool",
                )
            ]
        )
    cluster = _cluster(request)
    params = {"skip_current_image": "true" if skip_image else "false"}
    # This replica's oldest request, then the others' (checked: they crossed Redis); the
    # oldest of all is shown, this replica's on a tie.
    candidates = [oldest_rendering(cluster.lanes)] + [
        Rendering.from_json(data, cluster.clients) for data in cluster.state.others_progress()
    ]
    rendering = [each for each in candidates if each is not None]
    shown = min(rendering, key=lambda each: each.started_at, default=None)
    if shown is None:
        return json_response(idle_progress(cluster.last_run.job))
    return json_response(await _render_progress(request, shown, params, skip_image))


async def _render_progress(
    request: web.Request, rendering: Rendering, params: dict[str, str], skip_image: bool
) -> Mapping[str, Any]:
    """Ask the nodes rendering the request for their progress and answer as one webui."""
    cluster = _cluster(request)
    timeout_s = _read_timeout_s(request)
    answers, _ = await call_each(
        [cluster.clients[node] for node in rendering.nodes],
        lambda c: c.request("GET", "sdapi/v1/progress", params=params, timeout_s=timeout_s),
        cluster.note_failure,
    )
    nodes = [
        NodeProgress(images, _dict_or_none(answers.get(node)))
        for node, images in rendering.nodes.items()
    ]
    whole = [node.answer for node in nodes if node.answer is not None]
    if not rendering.shape.splittable and whole:
        # A script request runs whole on one webui: its own progress is the job's (a script
        # such as X/Y/Z plot sets its own job_count).
        return whole[0]
    return aggregate_progress(
        rendering.shape,
        nodes,
        done_images=rendering.done_images,
        interrupted=rendering.interrupted,
        skip_current_image=skip_image,
    )


def _dict_or_none(value: Any) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None


def add_running_routes(app: web.Application) -> None:
    app.router.add_get("/sdapi/v1/progress", progress, allow_head=False)
    app.router.add_post("/sdapi/v1/interrupt", interrupt)
    app.router.add_post("/sdapi/v1/skip", skip)
