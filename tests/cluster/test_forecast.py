"""Forecast: a node's predicted seconds for a share, its batch limit, and the share deadline."""

from __future__ import annotations

import pytest

from sdproxy.cluster.forecast import Forecast
from sdproxy.cluster.state import MemoryState
from sdproxy.config import Settings
from sdproxy.core.request import parse_generation
from sdproxy.core.speed import SpeedEstimate
from tests.cluster.fakes import FakeClock
from tests.support import SMALL


def forecast_for(settings: Settings) -> tuple[Forecast, MemoryState]:
    state = MemoryState(settings.nodes, settings.scheduler, FakeClock())
    nodes = {node.name: node for node in settings.nodes}
    return Forecast(state, nodes, settings.scheduler), state


class TestPredictJob:
    """predict_job_s: the speed model's time for a share, or None before any measurement."""

    def test_predict_job_s_follows_the_model(self) -> None:
        """None unmeasured; then overhead per node request plus per-image work."""
        settings = Settings.model_validate(
            {"nodes": [{"name": "a", "url": "http://127.0.0.1:1", "max_batch_size": 2}]}
        )
        request = parse_generation("txt2img", {"batch_size": 3, **SMALL}, max_images=10)
        forecast, state = forecast_for(settings)
        assert forecast.predict_job_s("a", request, 3) is None
        assert forecast.predict_job_s("nope", request, 3) is None
        state.set_benchmark("a", SpeedEstimate(0.5, 6.4, 4, "benchmark"), (1 / 64, 4 / 64))
        # 3 images in batches of at most 2: two node requests, 0.1 s per 64x64 image.
        assert forecast.predict_job_s("a", request, 3) == pytest.approx(2 * 0.5 + 3 * 0.1)
        assert forecast.predict_job_s("a", request, 2) == pytest.approx(0.5 + 2 * 0.1)


class TestDeadlines:
    """The per-share deadline follows the speed model's prediction, with a floor."""

    @pytest.mark.parametrize(
        ("per_image_s", "expected"), [(None, 60.0), (2.5, 60.0), (15.0, 90.0), (50.0, 300.0)]
    )
    def test_share_deadline_is_factor_times_prediction_above_floor(
        self, per_image_s: float | None, expected: float
    ) -> None:
        """max(floor, factor x predicted); the floor alone when nothing is predicted."""
        settings = Settings.model_validate(
            {
                "scheduler": {"share_timeout_factor": 3, "share_timeout_floor_s": 60},
                "nodes": [{"name": "a", "url": "http://127.0.0.1:1"}],
            }
        )
        request = parse_generation("txt2img", {"batch_size": 2, "steps": 20}, max_images=10)
        forecast, state = forecast_for(settings)
        if per_image_s is not None:  # two 512x512 images of 20 steps: predicted 2 x per_image_s
            state.set_benchmark("a", SpeedEstimate(0.0, per_image_s, 4, "benchmark"), (1, 4))
        assert forecast.share_deadline_s("a", request, 2) == pytest.approx(expected)

    def test_batch_limit_takes_the_smallest_bound(self) -> None:
        """The client's batch_size, the node's max_batch_size and its max_pixels all bound it."""
        settings = Settings.model_validate(
            {
                "nodes": [
                    {"name": "a", "url": "http://127.0.0.1:1", "max_batch_size": 3},
                    {"name": "b", "url": "http://127.0.0.1:2", "max_pixels": 2 * 64 * 64},
                    {"name": "c", "url": "http://127.0.0.1:3"},
                ]
            }
        )
        request = parse_generation("txt2img", {"batch_size": 4, **SMALL}, max_images=10)
        forecast, _ = forecast_for(settings)
        assert [forecast.batch_limit(n, request) for n in "abc"] == [3, 2, 4]
