"""The cluster's speed wiring: priors lent between nodes, the benchmark teaching run by run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sdproxy.cluster.forecast import Forecast
from sdproxy.cluster.state import MemoryState
from sdproxy.config import Settings
from sdproxy.core.request import parse_generation
from sdproxy.core.speed import NOMINAL_OVERHEAD_S
from sdproxy.fakewebui import FakeNodeSettings
from tests.cluster.fakes import FakeClock
from tests.cluster.test_benchmark import QUICK
from tests.support import SMALL, fake_nodes, post_json, proxy, wait_for_status


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


class TestLiveBenchmark:
    """The start-up benchmark teaches the model run by run, and keeps the jobs seen meanwhile."""

    async def test_benchmark_end_keeps_jobs_seen_meanwhile(self, tmp_path: Path) -> None:
        """A request during the benchmark still counts in each node's samples afterwards."""
        bench = {**QUICK, "state_file": str(tmp_path / "state.json")}
        async with (
            fake_nodes(*(FakeNodeSettings(name=n, per_image_s=0.5) for n in "ab")) as nodes,
            proxy(nodes, benchmark=bench) as url,
            aiohttp.ClientSession() as session,
        ):
            status, answer, headers = await post_json(
                session, f"{url}/sdapi/v1/txt2img", {"batch_size": 4, "seed": 3, **SMALL}
            )
            assert status == 200, answer
            rendered = {share.partition(":")[0] for share in headers["X-Sdproxy-Shares"].split(",")}

            def benchmarked(s: dict[str, Any]) -> bool:
                done = all(n["benchmark"]["measured_at"] for n in s["nodes"])
                return done and not any(n["benchmark"]["running"] for n in s["nodes"])

            final = await wait_for_status(session, url, benchmarked)
            for node in final["nodes"]:
                jobs = 1 if node["name"] in rendered else 0
                assert node["speed"]["samples"] == 3 + jobs  # a warm-up, a timed run per size
                assert node["speed"]["identified"]["overhead_s"] == "measured"
