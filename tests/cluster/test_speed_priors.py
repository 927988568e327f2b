"""The cluster's speed wiring: Forecast lends what nodes measured to the nodes that have not."""

from __future__ import annotations

import pytest

from sdproxy.cluster.forecast import Forecast
from sdproxy.cluster.state import MemoryState
from sdproxy.config import Settings
from sdproxy.core.request import parse_generation
from sdproxy.core.speed import NOMINAL_OVERHEAD_S
from tests.cluster.fakes import FakeClock
from tests.support import SMALL


def forecast_for(*names: str) -> tuple[Forecast, MemoryState]:
    settings = Settings.model_validate(
        {
            "nodes": [
                {"name": name, "url": f"http://127.0.0.1:{i + 1}"} for i, name in enumerate(names)
            ]
        }
    )
    state = MemoryState(settings.nodes, settings.scheduler, FakeClock())
    nodes = {node.name: node for node in settings.nodes}
    return Forecast(state, nodes, settings.scheduler), state


class TestClusterPrior:
    """A node's unknown terms come from the other nodes' models, through Forecast.estimate."""

    def test_one_size_node_takes_the_measured_overhead(self) -> None:
        """a measured 0.5 s overhead at two sizes; b, seen at one size, uses it too."""
        forecast, state = forecast_for("a", "b", "c")
        state.observe("a", 1.0, 1.5, "benchmark")
        state.observe("a", 4.0, 4.5, "benchmark")
        state.observe("b", 2.0, 2.5)
        a, b, c = (forecast.estimate(name) for name in "abc")
        assert (a.overhead_from, a.source) == ("measured", "benchmark")
        assert (b.overhead_from, b.per_unit_from) == ("other nodes", "one size")
        assert (b.overhead_s, b.per_unit_s) == pytest.approx((0.5, 1.0))
        assert c.per_unit_from == "weight"
        assert (c.overhead_s, c.per_unit_s) == pytest.approx((0.5, 1.0))

    def test_nothing_measured_assumes_the_nominal_overhead(self) -> None:
        """No node measured: the nominal overhead, not zero, for every node."""
        forecast, _ = forecast_for("a", "b")
        for name in "ab":
            estimate = forecast.estimate(name)
            assert (estimate.overhead_s, estimate.overhead_from) == (NOMINAL_OVERHEAD_S, "nominal")

    def test_predict_job_s_uses_the_lent_overhead(self) -> None:
        """A share's deadline prediction counts the overhead the others measured."""
        forecast, state = forecast_for("a", "b")
        state.observe("a", 1 / 64, 0.6)
        state.observe("a", 4 / 64, 0.9)  # 0.5 s overhead, 6.4 s per 512x512 unit
        state.observe("b", 2 / 64, 0.7)
        request = parse_generation("txt2img", {"batch_size": 4, **SMALL}, max_images=10)
        assert forecast.predict_job_s("b", request, 4) == pytest.approx(0.5 + 4 * 0.1)
