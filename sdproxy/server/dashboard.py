"""The cluster dashboard: GET /cluster (one self-contained HTML page) and its in-flight view."""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

from aiohttp import web

from sdproxy.cluster.scheduler import Cluster
from sdproxy.cluster.work import Run


@cache
def page_html() -> bytes:
    """The dashboard page, shipped as package data (no external assets)."""
    return resources.files("sdproxy.server").joinpath("dashboard.html").read_bytes()


async def cluster_page(request: web.Request) -> web.Response:
    return web.Response(
        body=page_html(),
        content_type="text/html",
        charset="utf-8",
        headers={"Cache-Control": "no-cache", "Content-Security-Policy": _CSP},
    )


# Everything the page needs is inline; it may only fetch from its own origin.
_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'"
)


def in_flight(cluster: Cluster, now: float | None = None) -> list[dict[str, Any]]:
    """The requests running now, oldest first, with each node's share of their images."""
    now = cluster.clock.wall() if now is None else now
    return [
        _describe(run, cluster, now) for run in sorted(cluster.runs, key=lambda r: r.started_at)
    ]


def _describe(run: Run, cluster: Cluster, now: float) -> dict[str, Any]:
    shares: dict[str, dict[str, int]] = {}

    def share(node: str) -> dict[str, int]:
        return shares.setdefault(node, {"done": 0, "rendering": 0, "queued": 0})

    for part in run.parts:
        share(part.node)["done"] += part.count
    for name, lane in cluster.lanes.items():
        running = lane.running
        if running is not None and running.run is run:
            share(name)["rendering"] += running.images
        for job in lane.pending:
            if job.run is run:
                share(name)["queued"] += job.images
    request = run.request
    return {
        "id": run.request_id,
        "kind": request.kind,
        "images": request.total_images,
        "done": sum(part.count for part in run.parts),
        "age_s": round(max(0.0, now - run.started_at), 1),
        "failovers": run.redispatches,
        "client_left": run.abandoned,
        "shares": [{"node": node, **counts} for node, counts in shares.items()],
    }
