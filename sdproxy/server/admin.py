"""The /cluster routes and /metrics: node status, node controls, benchmarks, Prometheus."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from sdproxy import __version__
from sdproxy.cluster.benchmark import Benchmarker
from sdproxy.cluster.scheduler import Cluster
from sdproxy.errors import NotFound
from sdproxy.nodes.client import NodeClient
from sdproxy.ops import metrics
from sdproxy.server.bodies import json_response
from sdproxy.server.dashboard import in_flight
from sdproxy.server.keys import benchmarker_key, cluster_key, metrics_key


def node_speed(cluster: Cluster, node: str) -> float:
    """A node's estimated speed: images per second of 20 steps at 512x512, overhead aside.

    Before anything is measured on any node this is the configured weight.
    """
    return 1.0 / cluster.forecast.estimate(node).per_unit_s


def node_status(cluster: Cluster, benchmarker: Benchmarker, node: str) -> dict[str, Any]:
    """One node's entry in /cluster/status (times are Unix seconds)."""
    settings = cluster.clients[node].settings
    health, counters = cluster.state.health(node), cluster.state.counters(node)
    estimate = cluster.forecast.estimate(node)
    result = benchmarker.results.get(node)
    models = cluster.router.nodes[node]  # what the last read of its lists found
    return {
        "name": node,
        "url": settings.base_url,
        "state": health.state,
        "state_reason": health.state_reason,
        "healthy": health.usable,
        "weight": settings.weight,
        "speed_estimate": round(node_speed(cluster, node), 4),
        "max_batch_size": settings.max_batch_size,
        "images_rendered": counters.images_rendered,
        "requests_sent": counters.requests_sent,
        "queued_images": cluster.lanes[node].queued_images,
        "consecutive_failures": health.consecutive_failures,
        "last_error": health.last_error,
        "last_error_at": health.last_error_at,
        "last_ok_at": health.last_ok_at,
        "next_probe_at": None if health.up else health.next_probe_at,
        "models": [entry["title"] for entry in models.entries or () if "title" in entry],
        "current_model": models.loaded,
        "backlog_s": round(cluster.backlog_s(node), 3),
        "speed": {
            "source": estimate.source,
            "overhead_s": round(estimate.overhead_s, 4),
            "per_image_s": round(estimate.per_unit_s, 4),  # 20 steps at 512x512
            "samples": estimate.samples,
            # How each term is known: measured, earlier, other nodes, nominal / one size, weight.
            "identified": {
                "overhead_s": estimate.overhead_from,
                "per_image_s": estimate.per_unit_from,
            },
        },
        "benchmark": {
            "running": node in benchmarker.running,
            "measured_at": result.measured_at if result else None,
            "checkpoint": result.checkpoint if result else None,
            "overhead_s": round(result.overhead_s, 4) if result else None,
            "per_image_s": round(result.per_image_s, 4) if result else None,
            "error": benchmarker.errors.get(node),
        },
    }


async def cluster_status(request: web.Request) -> web.Response:
    """GET /cluster/status: every node, its health and what it rendered."""
    cluster = request.app[cluster_key]
    benchmarker = request.app[benchmarker_key]
    nodes = [node_status(cluster, benchmarker, node) for node in cluster.clients]
    return json_response(
        {
            "version": __version__,
            "queued_images": cluster.queued_images(),
            "max_queued_images": cluster.settings.scheduler.max_queued_images,
            "waiting_images": cluster.parking.waiting_images,
            "nodes": nodes,
            "in_flight": in_flight(cluster),
            "shared": cluster.state.status(),
        }
    )


async def _one_node(request: web.Request, client: NodeClient) -> web.Response:
    cluster, benchmarker = request.app[cluster_key], request.app[benchmarker_key]
    return json_response(node_status(cluster, benchmarker, client.name))


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
    cluster = request.app.get(cluster_key)
    gauges, shared = [], None
    if cluster is not None:
        shared = cluster.state.status()
        gauges = [
            metrics.NodeGauges(
                node,
                cluster.state.usable(node),
                cluster.lanes[node].queued_images,
                node_speed(cluster, node),
            )
            for node in cluster.clients
        ]
    text = request.app[metrics_key].render(gauges, shared)
    return web.Response(body=text, headers={"Content-Type": metrics.CONTENT_TYPE})
