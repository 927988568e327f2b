"""Prometheus metrics: one registry per app, recorded by the access log and the scheduler."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Requests range from a status call (ms) to big batches on slow GPUs (many minutes).
_REQUEST_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
_JOB_BUCKETS_S = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 900)


@dataclass(frozen=True)
class NodeGauges:
    """One node's gauges as the cluster sees them when metrics are scraped."""

    name: str
    healthy: bool
    queued_images: int
    speed: float  # images per second of 20 steps at 512x512, overhead aside


class Metrics:
    """The app's Prometheus collectors; counters are recorded as things happen, node gauges
    are set from the cluster's view when scraped."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "sdproxy_http_requests",
            "HTTP requests answered, by route and status.",
            ["method", "route", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "sdproxy_http_request_duration_seconds",
            "Time from request received to response ready, by route.",
            ["route"],
            buckets=_REQUEST_BUCKETS_S,
            registry=r,
        )
        self.images_rendered = Counter(
            "sdproxy_node_images_rendered",
            "Images a node rendered into client responses.",
            ["node"],
            registry=r,
        )
        self.job_duration = Histogram(
            "sdproxy_node_job_duration_seconds",
            "Duration of one request (a share, or part of one) to a node, by outcome.",
            ["node", "outcome"],
            buckets=_JOB_BUCKETS_S,
            registry=r,
        )
        self.failovers = Counter(
            "sdproxy_failovers",
            "Jobs re-planned onto other nodes after a node failed them, by failed node.",
            ["node"],
            registry=r,
        )
        self.node_failures = Counter(
            "sdproxy_node_failures",
            "Jobs and API calls that failed on the node's side and took it out (probes not"
            " counted), by node and kind (unreachable, timeout, bad_response, unexpected_status,"
            " too_large, wrong_answer, raised, auth_failed).",
            ["node", "kind"],
            registry=r,
        )
        self.node_healthy = Gauge(
            "sdproxy_node_healthy", "1 when the node is healthy, else 0.", ["node"], registry=r
        )
        self.queued_images = Gauge(
            "sdproxy_node_queued_images",
            "Images waiting or rendering on the node.",
            ["node"],
            registry=r,
        )
        self.node_speed = Gauge(
            "sdproxy_node_speed_estimate",
            "The node's estimated images per second (20 steps, 512x512), from its speed model.",
            ["node"],
            registry=r,
        )
        self.shared_mode = Gauge(
            "sdproxy_shared_state",
            "1 for the state mode this process is in: single (no Redis configured), shared"
            " (Redis answers) or local (Redis configured but unreachable), else 0.",
            ["mode"],
            registry=r,
        )
        self.redis_round_trips = Gauge(
            "sdproxy_redis_round_trips",
            "Calls this process has made to Redis since it started.",
            registry=r,
        )
        self.autosave_errors = Counter(
            "sdproxy_autosave_errors",
            "Images autosave could not write, by error kind.",
            ["kind"],
            registry=r,
        )

    def observe_request(self, method: str, route: str, status: int, duration_s: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.request_duration.labels(route).observe(duration_s)

    def observe_job(self, node: str, outcome: str, duration_s: float, images: int = 0) -> None:
        """One node job ended (``ok``, ``error`` or ``rejected``), ``images`` rendered."""
        self.job_duration.labels(node, outcome).observe(duration_s)
        if images:
            self.images_rendered.labels(node).inc(images)

    def observe_failover(self, node: str) -> None:
        self.failovers.labels(node).inc()

    def observe_node_failure(self, node: str, kind: str) -> None:
        self.node_failures.labels(node, kind).inc()

    def render(self, nodes: Iterable[NodeGauges], shared: Mapping[str, Any] | None = None) -> bytes:
        """The text exposition, with the node gauges set from ``nodes`` and the shared-state
        gauges from ``shared`` (the ClusterState's status)."""
        if shared is not None:
            for mode in ("single", "shared", "local"):
                self.shared_mode.labels(mode).set(1 if shared.get("mode") == mode else 0)
            trips = shared.get("round_trips")
            self.redis_round_trips.set(trips if isinstance(trips, int) else 0)
        for node in nodes:
            self.node_healthy.labels(node.name).set(1 if node.healthy else 0)
            self.queued_images.labels(node.name).set(node.queued_images)
            self.node_speed.labels(node.name).set(node.speed)
            # Nodes with nothing yet still show up, at zero, so dashboards see them.
            self.images_rendered.labels(node.name)
            self.failovers.labels(node.name)
        return generate_latest(self.registry)
