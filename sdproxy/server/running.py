"""Interrupt, skip and progress: the webui calls that concern the requests running now."""

from __future__ import annotations

from typing import Any

from aiohttp import web

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
    running = cluster.running_jobs()
    if not running:
        return json_response(idle_progress(cluster.last_run.job))
    run = min((job.run for _, job in running), key=lambda r: r.started_at)
    mine = [(node, job) for node, job in running if job.run is run]
    params = {"skip_current_image": "true" if skip_image else "false"}
    timeout_s = _read_timeout_s(request)
    answers, _ = await call_each(
        [cluster.clients[node] for node, _ in mine],
        lambda c: c.request("GET", "sdapi/v1/progress", params=params, timeout_s=timeout_s),
        cluster.note_failure,
    )
    nodes = [NodeProgress(job.images, _dict_or_none(answers.get(node))) for node, job in mine]
    whole = [node.answer for node in nodes if node.answer is not None]
    if not run.request.splittable and whole:
        # A script request runs whole on one webui: its own progress is the job's (a script
        # such as X/Y/Z plot sets its own job_count).
        return json_response(whole[0])
    # Images still to come (rendering or queued) are the run's remaining ones.
    done = run.request.total_images - max(run.remaining, 0)
    body = aggregate_progress(
        run.request,
        nodes,
        done_images=max(done, 0),
        interrupted=run.interrupted,
        skip_current_image=skip_image,
    )
    return json_response(body)


def _dict_or_none(value: Any) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None


def add_running_routes(app: web.Application) -> None:
    app.router.add_get("/sdapi/v1/progress", progress, allow_head=False)
    app.router.add_post("/sdapi/v1/interrupt", interrupt)
    app.router.add_post("/sdapi/v1/skip", skip)
