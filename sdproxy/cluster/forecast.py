"""Forecast: how long a node takes for a job, and how large a batch it may be sent.

The speed models live in the cluster state; this turns them into the seconds the planner, the
lanes' backlogs and the share deadlines work with. What a node's own measurements leave open
(its overhead while it has run one size of job, its speed before anything was measured) comes
from the other nodes' models (core/speed.py cluster_prior), a node of its weight scaled like the
measured ones.
"""

from __future__ import annotations

from collections.abc import Mapping

from sdproxy.cluster.state import ClusterState
from sdproxy.config import NodeSettings, SchedulerSettings
from sdproxy.core.planner import Share, chunk_share
from sdproxy.core.request import GenerationRequest
from sdproxy.core.speed import Prior, SpeedEstimate, cluster_prior, work_per_image


class Forecast:
    """Predicted seconds per node, from the speed models in the cluster state."""

    def __init__(
        self,
        state: ClusterState,
        nodes: Mapping[str, NodeSettings],
        scheduler: SchedulerSettings,
    ) -> None:
        self._state = state
        self._nodes = nodes
        self._scheduler = scheduler

    def estimate(self, node: str) -> SpeedEstimate:
        """The node's speed line; what its own measurements leave open, from the others'."""
        return self._state.speed(node).estimate(self._prior())

    def predict_s(self, node: str, work: float, requests: int = 1) -> float:
        return self.estimate(node).predict_s(work, requests)

    def predict_job_s(self, node: str, request: GenerationRequest, images: int) -> float | None:
        """Predicted seconds ``node`` takes to render ``images`` of ``request``.

        The share's own running time (as the one or two node requests it is cut into), not the
        wait for the work queued before it. None while nothing was measured on the node
        (neither a benchmark nor a finished job): then only the configured weight is known.
        """
        if node not in self._nodes or images <= 0 or not self._state.speed(node).measured:
            return None
        limit = self.batch_limit(node, request)
        units = images // request.unit_size
        requests = 1 if limit is None else max(1, len(chunk_share(Share(node, 0, units), limit)))
        return self.estimate(node).predict_s(images * work_per_image(request), requests)

    def share_deadline_s(self, node: str, request: GenerationRequest, images: int) -> float:
        """How long one node request may take before the node counts as failed."""
        scheduler = self._scheduler
        predicted = self.predict_job_s(node, request, images)
        if predicted is None:
            return scheduler.share_timeout_floor_s
        return max(scheduler.share_timeout_floor_s, scheduler.share_timeout_factor * predicted)

    def batch_limit(self, node: str, request: GenerationRequest) -> int | None:
        """Units one node request may carry: None for whole-batch units, 0 for none.

        Single images go in batches no larger than the client's batch_size (what the client
        knows fits in VRAM), the node's max_batch_size, nor its max_pixels.
        """
        if request.split_by_iteration:
            return None
        settings = self._nodes[node]
        limit = request.batch_size
        if settings.max_batch_size is not None:
            limit = min(limit, settings.max_batch_size)
        if settings.max_pixels is not None:
            pixels = max(request.width * request.height, request.hr_width * request.hr_height)
            limit = min(limit, settings.max_pixels // pixels)
        return limit

    def requests_for(self, node: str, request: GenerationRequest, units: int) -> int:
        """How many node requests ``units`` of ``request`` take on ``node``."""
        if units <= 0:
            return 0
        limit = self.batch_limit(node, request)
        if limit is None:
            return 1
        return len(chunk_share(Share(node, 0, units), max(limit, 1)))

    def _prior(self) -> Prior:
        """Overhead and seconds per unit at weight 1 as the measured nodes show them."""
        return cluster_prior(self._state.speed(node) for node in self._nodes)
