"""Tests for the pure speed model: work per image, fitting, priors, changes of speed, outliers."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from sdproxy.core.request import parse_generation
from sdproxy.core.speed import (
    NOMINAL_OVERHEAD_S,
    Prior,
    SpeedEstimate,
    SpeedModel,
    cluster_prior,
    fit_benchmark,
    fit_line,
    work_per_image,
)

overheads = st.floats(0.05, 3)
per_units = st.floats(0.02, 5)
works = st.floats(0.05, 40)


def line(overhead: float, per_unit: float, work: float) -> float:
    return overhead + per_unit * work


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

    @given(
        overhead=overheads,
        per_unit=per_units,
        seed=st.integers(0, 2**32 - 1),
        noise=st.floats(0, 0.03),
    )
    def test_model_recovers_true_line_from_noisy_points(
        self, overhead: float, per_unit: float, seed: int, noise: float
    ) -> None:
        """Jobs of varied size with a few percent of noise give the node's line back."""
        rng = random.Random(seed)
        model = SpeedModel(weight=1.0)
        for _ in range(32):
            work = rng.choice([1.0, 2.0, 4.0, 6.0, 8.0])
            model.observe(work, line(overhead, per_unit, work) * (1 + rng.uniform(-noise, noise)))
        estimate = model.estimate()
        assert estimate.overhead_from == "measured"
        for work in (1.0, 8.0):
            truth = line(overhead, per_unit, work)
            assert estimate.predict_s(work) == pytest.approx(truth, rel=3 * noise + 1e-6)


class TestPriors:
    """What a node's own points leave open comes from its past, the other nodes, or a nominal."""

    @given(work=works, seconds=st.floats(0.01, 100), prior=st.floats(0, 5))
    @example(work=1.0, seconds=0.01, prior=0.0)
    def test_single_observation_never_yields_zero_overhead(
        self, work: float, seconds: float, prior: float
    ) -> None:
        """One job: the overhead is assumed (never 0 unless the prior is), within the job."""
        model = SpeedModel(weight=1.0)
        assert model.observe(work, seconds)
        estimate = model.estimate(Prior(prior, "other nodes"))
        assert estimate.overhead_s == pytest.approx(min(prior, 0.9 * seconds))
        assert estimate.overhead_from == "other nodes"
        assert estimate.per_unit_from == "one size"
        assert estimate.predict_s(work) == pytest.approx(seconds)
        nominal = model.estimate()
        assert nominal.overhead_s > 0
        assert nominal.overhead_s == pytest.approx(min(NOMINAL_OVERHEAD_S, 0.9 * seconds))

    def test_the_issue_warm_up_split(self) -> None:
        """Two images each on 0.1/0.2/0.4 s nodes with 0.3 s overhead: the lines come back."""
        models = [SpeedModel(weight=1.0) for _ in range(3)]
        for model, per_image in zip(models, (0.1, 0.2, 0.4), strict=True):
            model.observe(2.0, line(0.3, per_image, 2.0))
        prior = cluster_prior(models)
        assert prior.overhead_from == "nominal"
        got = [models[i].estimate(prior) for i in range(3)]
        assert [e.overhead_s for e in got] == pytest.approx([0.3, 0.3, 0.3])
        assert [e.per_unit_s for e in got] == pytest.approx([0.1, 0.2, 0.4])

    def test_other_nodes_overhead_is_the_median_of_measured_ones(self) -> None:
        """Nodes that measured their overhead lend its median to a node at one size."""
        measured = []
        for overhead in (0.2, 0.5, 0.9):
            model = SpeedModel(weight=1.0)
            model.observe(1.0, line(overhead, 1.0, 1.0))
            model.observe(4.0, line(overhead, 1.0, 4.0))
            measured.append(model)
        one_size = SpeedModel(weight=1.0)
        one_size.observe(3.0, 4.0)
        prior = cluster_prior([*measured, one_size])
        assert (prior.overhead_s, prior.per_unit_s) == pytest.approx((0.5, 1.0))
        assert prior.overhead_from == "other nodes"
        estimate = one_size.estimate(prior)
        assert estimate.overhead_s == pytest.approx(0.5)
        assert estimate.per_unit_s == pytest.approx(3.5 / 3.0)

    def test_unmeasured_node_scales_by_weight_with_the_cluster_overhead(self) -> None:
        """Nothing measured: per-unit time from the weight, overhead from the others."""
        model = SpeedModel(weight=4.0)
        assert not model.measured
        estimate = model.estimate(Prior(0.25, "other nodes", 2.0))
        assert estimate == SpeedEstimate(0.25, 0.5, 0, "weight", "other nodes", "weight")

    def test_benchmark_runs_as_they_finish_make_a_line(self) -> None:
        """Two benchmark runs at different batch sizes are enough for a measured line."""
        model = SpeedModel(weight=1.0)
        model.observe(1.0, 0.4, source="benchmark")
        first = model.estimate()
        assert (first.source, first.overhead_from) == ("benchmark", "nominal")
        model.observe(4.0, 0.7, source="benchmark")
        estimate = model.estimate()
        assert (estimate.overhead_s, estimate.per_unit_s) == pytest.approx((0.3, 0.1))
        assert (estimate.source, estimate.overhead_from, estimate.samples) == (
            "benchmark",
            "measured",
            2,
        )
        model.observe(2.0, 0.5)
        assert model.estimate().source == "measured"

    def test_stored_benchmark_is_measured_and_fades(self) -> None:
        """A stored benchmark stands as measured points until jobs take over."""
        model = SpeedModel(weight=1.0)
        model.set_benchmark(SpeedEstimate(0.5, 1.0, 6, "benchmark"), (1.0, 4.0))
        estimate = model.estimate()
        assert (estimate.overhead_s, estimate.per_unit_s) == pytest.approx((0.5, 1.0))
        assert (estimate.source, estimate.overhead_from, estimate.samples) == (
            "benchmark",
            "measured",
            6,
        )

    def test_single_work_only_while_one_size_is_seen(self) -> None:
        """single_work names the one size seen, and is None once two sizes are."""
        model = SpeedModel(weight=1.0)
        assert model.single_work is None
        model.observe(2.0, 1.0)
        model.observe(2.0, 1.0)
        assert model.single_work == pytest.approx(2.0)
        model.observe(4.0, 1.6)
        assert model.single_work is None


class TestChanges:
    """A node whose speed changed is refit from what it does now; one-offs leave no trace."""

    @given(
        overhead=overheads,
        before=per_units,
        factor=st.one_of(st.floats(0.05, 0.6), st.floats(1.7, 20)),
        sizes=st.lists(st.sampled_from([1.0, 2.0, 3.0, 5.0, 8.0]), min_size=6, max_size=6),
    )
    def test_changed_node_is_refit_within_two_observations(
        self, overhead: float, before: float, factor: float, sizes: list[float]
    ) -> None:
        """After a change its jobs show (20% and 0.1 s), two jobs later it predicts the new line."""
        after = before * factor
        for work in sizes[:2]:
            new, old = line(overhead, after, work), line(overhead, before, work)
            assume(abs(new - old) >= 0.1 and (new >= 1.2 * old or old >= 1.2 * new))
            assume(overhead <= 0.85 * new)  # else one size cannot tell the images from overhead
        model = SpeedModel(weight=1.0)
        for work in (1.0, 4.0, 2.0, 8.0):
            model.observe(work, line(overhead, before, work))
        for work in sizes[:2]:
            model.observe(work, line(overhead, after, work))
        estimate = model.estimate()
        for work in sizes:
            assert estimate.predict_s(work) == pytest.approx(line(overhead, after, work), rel=0.02)

    def test_the_issue_speed_change_and_back(self) -> None:
        """0.1 -> 0.4 s per image and back, 0.3 s overhead: refit after one job each way."""
        model = SpeedModel(weight=1.0)
        model.observe(2.0, line(0.3, 0.1, 2.0))
        model.observe(16.0, line(0.3, 0.1, 16.0))
        assert model.observe(16.0, line(0.3, 0.4, 16.0))
        estimate = model.estimate()
        assert (estimate.overhead_s, estimate.per_unit_s) == pytest.approx((0.3, 0.4))
        assert estimate.overhead_from == "earlier"
        model.observe(7.0, line(0.3, 0.4, 7.0))
        assert model.estimate().overhead_from == "measured"
        model.observe(7.0, line(0.3, 0.1, 7.0))
        estimate = model.estimate()
        assert (estimate.overhead_s, estimate.per_unit_s) == pytest.approx((0.3, 0.1))
        assert model.changes == 2

    @given(overhead=overheads, per_unit=per_units, extra_s=st.floats(5, 60))
    def test_one_off_slow_job_is_ignored(
        self, overhead: float, per_unit: float, extra_s: float
    ) -> None:
        """A checkpoint load (far slower, once) is left out and the estimate stays."""
        model = SpeedModel(weight=1.0)
        for work in (1.0, 4.0, 2.0):
            model.observe(work, line(overhead, per_unit, work))
        before = model.estimate()
        predicted = before.predict_s(2.0)
        slow = 4 * predicted + 1 + extra_s
        assert not model.observe(2.0, slow)
        assert model.estimate() == before
        assert model.observe(3.0, line(overhead, per_unit, 3.0))
        assert model.estimate().predict_s(3.0) == pytest.approx(line(overhead, per_unit, 3.0))
        assert model.changes == 0

    def test_two_far_slower_jobs_in_a_row_mean_a_new_node(self) -> None:
        """Consistently far slower: the second one starts the model over."""
        model = SpeedModel(weight=1.0)
        model.set_benchmark(SpeedEstimate(0.0, 1.0, 4, "benchmark"), (1.0, 4.0))
        accepted = [model.observe(2.0, 20.0) for _ in range(2)]
        assert accepted == [False, True]
        assert model.estimate().predict_s(2.0) == pytest.approx(20.0)

    def test_moderate_one_off_is_taken_back(self) -> None:
        """A job twice as slow once moves the model; the next normal job restores it."""
        model = SpeedModel(weight=1.0)
        for work in (1.0, 4.0, 2.0):
            model.observe(work, line(0.3, 0.5, work))
        before = model.estimate()
        model.observe(2.0, 2 * line(0.3, 0.5, 2.0))
        assert model.estimate().predict_s(2.0) == pytest.approx(2 * line(0.3, 0.5, 2.0))
        model.observe(3.0, line(0.3, 0.5, 3.0))
        after = model.estimate()
        assert (after.overhead_s, after.per_unit_s) == pytest.approx(
            (before.overhead_s, before.per_unit_s)
        )
        assert after.samples == before.samples + 1

    def test_drift_twice_in_a_row_refits(self) -> None:
        """20% slower twice in a row on one side: the model follows at once."""
        model = SpeedModel(weight=1.0)
        for work in (1.0, 4.0, 2.0, 8.0):
            model.observe(work, line(0.3, 0.5, work))
        model.observe(4.0, 1.2 * line(0.3, 0.5, 4.0))
        assert model.changes == 0
        model.observe(2.0, 1.2 * line(0.3, 0.5, 2.0))
        assert model.changes == 1
        for work in (2.0, 4.0):
            assert model.estimate().predict_s(work) == pytest.approx(1.2 * line(0.3, 0.5, work))

    def test_noise_within_the_band_is_no_change(self) -> None:
        """Jobs within 10% either way never count as a change of speed."""
        rng = random.Random(7)
        model = SpeedModel(weight=1.0)
        for _ in range(200):
            work = rng.choice([1.0, 2.0, 4.0])
            model.observe(work, line(0.3, 0.5, work) * rng.uniform(0.9, 1.1))
        assert model.changes == 0

    @pytest.mark.parametrize(
        ("work", "seconds"), [(0.0, 1.0), (-1.0, 1.0), (1.0, -1.0), (1.0, math.nan)]
    )
    def test_nonsense_observations_are_refused(self, work: float, seconds: float) -> None:
        """Non-positive work or negative or NaN time teaches nothing."""
        model = SpeedModel(weight=1.0)
        assert not model.observe(work, seconds)
        assert not model.measured
