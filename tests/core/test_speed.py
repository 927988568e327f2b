"""Tests for the pure speed model: work per image, fitting, online updates, outliers."""

from __future__ import annotations

import math

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from sdproxy.core.request import parse_generation
from sdproxy.core.speed import SpeedEstimate, SpeedModel, fit_benchmark, fit_line, work_per_image


class TestWorkPerImage:
    """A request's work per image follows steps, pixels, hires fix and denoising."""

    @pytest.mark.parametrize(
        ("kind", "body", "expected"),
        [
            ("txt2img", {}, 50 / 20),  # the webui's default of 50 steps at 512x512
            ("txt2img", {"steps": 20, "width": 1024, "height": 512}, 2.0),
            ("txt2img", {"steps": 20, "enable_hr": True}, 1.0 + 4.0),  # hr_scale 2, same steps
            (
                "txt2img",
                {"steps": 20, "enable_hr": True, "hr_second_pass_steps": 10, "hr_scale": 1.5},
                1.0 + 10 * 768 * 768 / (20 * 512 * 512),
            ),
            (
                "txt2img",
                {"steps": 20, "enable_hr": True, "hr_resize_x": 1024, "hr_second_pass_steps": 20},
                1.0 + 4.0,  # hr_resize_y follows in proportion
            ),
            ("txt2img", {"steps": 20, "enable_hr": False, "hr_scale": 4}, 1.0),
            ("img2img", {"steps": 20}, 15 / 20),  # denoising_strength 0.75 by default
            ("img2img", {"steps": 20, "denoising_strength": 0.01}, 1 / 20),  # at least one step
        ],
    )
    def test_work_per_image_table(
        self, kind: str, body: dict[str, object], expected: float
    ) -> None:
        """Known requests against hand-computed work."""
        if kind == "img2img":
            body = {"init_images": ["x"], **body}
        request = parse_generation(kind, body, max_images=10)  # type: ignore[arg-type]
        assert work_per_image(request) == pytest.approx(expected)


class TestFit:
    """Fitting a line to timed runs recovers overhead and per-unit cost."""

    @given(
        overhead=st.floats(0, 10),
        per_unit=st.floats(0.01, 10),
        works=st.lists(st.floats(0.1, 100), min_size=2, max_size=8, unique=True),
    )
    def test_fit_line_recovers_exact_line(
        self, overhead: float, per_unit: float, works: list[float]
    ) -> None:
        """Points on a line give back that line."""
        if max(works) - min(works) < 0.05:
            return
        fitted = fit_line((x, overhead + per_unit * x, 1.0) for x in works)
        assert fitted is not None
        assert fitted[0] == pytest.approx(overhead, abs=1e-6 * (1 + per_unit * max(works)))
        assert fitted[1] == pytest.approx(per_unit, rel=1e-6)

    @given(points=st.lists(st.tuples(st.floats(0.1, 50), st.floats(0, 100)), min_size=1))
    def test_fit_line_is_always_physical(self, points: list[tuple[float, float]]) -> None:
        """Whatever the noise, overhead is never negative and the slope positive."""
        fitted = fit_line((x, y, 1.0) for x, y in points)
        if fitted is not None:
            assert fitted[0] >= 0
            assert fitted[1] > 0

    def test_fit_benchmark_two_batch_sizes(self) -> None:
        """Batch 1 in 1.5 s and batch 4 in 3 s: 0.5 s per image, 1 s overhead."""
        estimate = fit_benchmark([(1.0, 1.5), (1.0, 1.5), (4.0, 3.0), (4.0, 3.0)])
        assert estimate.overhead_s == pytest.approx(1.0)
        assert estimate.per_unit_s == pytest.approx(0.5)
        assert (estimate.samples, estimate.source) == (4, "benchmark")


class TestSpeedModel:
    """The online model starts from weight or benchmark and follows finished jobs."""

    def test_weight_prior_scales_with_weight(self) -> None:
        """Unmeasured: no overhead, nominal seconds divided by the weight."""
        model = SpeedModel(weight=4.0)
        assert not model.measured
        assert model.estimate(2.0) == SpeedEstimate(0.0, 0.5, 0, "weight")

    @given(overhead=st.floats(0, 3), per_unit=st.floats(0.05, 5), bench_scale=st.floats(0.2, 5))
    # Overhead-dominated, with a benchmark far off: its fading points once tipped the slope
    # negative, and the fit fell back to a line through the origin.
    @example(overhead=3.0, per_unit=0.05078125, bench_scale=4.0)
    def test_observations_pull_benchmark_towards_truth(
        self, overhead: float, per_unit: float, bench_scale: float
    ) -> None:
        """After many jobs of varied size the estimate is close to the node's true line."""
        model = SpeedModel(weight=1.0, outlier_ratio=math.inf)
        model.set_benchmark(
            SpeedEstimate(overhead * bench_scale, per_unit * bench_scale, 4, "benchmark"),
            (1.0, 4.0),
        )
        for i in range(40):
            work = 1.0 + i % 7
            model.observe(work, overhead + per_unit * work)
        estimate = model.estimate()
        assert estimate.predict_s(3.0) == pytest.approx(overhead + per_unit * 3.0, rel=0.1)
        assert estimate.source == "measured"

    def test_model_load_is_left_out(self) -> None:
        """A job ten times slower than predicted does not move the estimate."""
        model = SpeedModel(weight=1.0)
        model.set_benchmark(SpeedEstimate(0.5, 1.0, 4, "benchmark"), (1.0, 4.0))
        before = model.estimate()
        assert not model.observe(2.0, 40.0)
        assert model.estimate() == before

    def test_three_slow_jobs_in_a_row_mean_a_new_node(self) -> None:
        """Consistently slower: the model gives up its benchmark and follows."""
        model = SpeedModel(weight=1.0)
        model.set_benchmark(SpeedEstimate(0.0, 1.0, 4, "benchmark"), (1.0, 4.0))
        accepted = [model.observe(2.0, 20.0) for _ in range(3)]
        assert accepted == [False, False, True]
        assert model.benchmark is None
        assert model.estimate().predict_s(2.0) == pytest.approx(20.0)

    def test_same_work_jobs_keep_benchmark_overhead(self) -> None:
        """Jobs all of one size cannot tell overhead from slope; the weight prior has none."""
        model = SpeedModel(weight=1.0)
        model.observe(2.0, 4.0)
        model.observe(2.0, 4.0)
        assert model.estimate() == SpeedEstimate(0.0, 2.0, 2, "measured")
