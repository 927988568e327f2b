"""Pure: how long a node takes for a share, fitted from its benchmark and every finished job.

The model of one node is a line: ``seconds = overhead_s + per_unit_s * work``, for one node
request of ``work`` units, where one unit is one image of 20 steps at 512x512. A request's work
per image counts the sampled steps times the pixels, plus hires fix's second pass at its upscaled
size; img2img samples only ``steps x denoising_strength`` of its steps, as the webui does.

Before anything is measured a node's line comes from its configured weight (no overhead, a
nominal seconds per unit divided by the weight), which reproduces a split by weight. A benchmark
at two batch sizes gives the intercept and the slope; every finished job then refines the line
by a least-squares fit over a window of recent jobs, each weighted by its recency, with the
benchmark kept in as the oldest, fading, evidence. A job far slower than predicted (a checkpoint
load, a node busy with something else) is left out, unless it happens three times in a row: then
the node itself has changed and the model starts over from what it does now.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from sdproxy.core.request import GenerationRequest

NOMINAL_STEPS = 20
NOMINAL_PIXELS = 512 * 512
NOMINAL_PER_UNIT_S = 1.0  # seconds per unit assumed for a node of weight 1 before any measurement

Source = Literal["weight", "benchmark", "measured"]


def work_per_image(request: GenerationRequest) -> float:
    """The work of one image of ``request``, in units of 20 steps at 512x512."""
    return image_work(
        steps=request.steps,
        width=request.width,
        height=request.height,
        denoising_strength=request.denoising_strength if request.kind == "img2img" else None,
        hr_steps=request.hr_steps,
        hr_width=request.hr_width,
        hr_height=request.hr_height,
    )


def image_work(
    *,
    steps: int,
    width: int,
    height: int,
    denoising_strength: float | None = None,
    hr_steps: int | None = None,
    hr_width: int = 0,
    hr_height: int = 0,
) -> float:
    """Work of one image: sampled steps times pixels, plus hires fix's second pass."""
    if denoising_strength is not None:
        # img2img samples int(steps * strength) steps, at least one (the webui's own rule).
        steps = max(1, int(steps * denoising_strength))
    work = steps * width * height
    if hr_steps is not None:
        work += hr_steps * hr_width * hr_height
    return work / (NOMINAL_STEPS * NOMINAL_PIXELS)


@dataclass(frozen=True)
class SpeedEstimate:
    """One node's predicted time for a node request: ``overhead_s + per_unit_s * work``."""

    overhead_s: float
    per_unit_s: float
    samples: int = 0  # benchmark runs and finished jobs behind the estimate
    source: Source = "weight"

    def predict_s(self, work: float, requests: int = 1) -> float:
        """Seconds for ``work`` units sent as ``requests`` node requests."""
        return requests * self.overhead_s + self.per_unit_s * work


_MIN_SLOPE = 1e-9  # per-unit seconds are kept positive, however flat the points


def fit_line(points: Iterable[tuple[float, float, float]]) -> tuple[float, float] | None:
    """Weighted least squares through ``(work, seconds, weight)``: ``(overhead_s, per_unit_s)``.

    The line is kept physical: no negative overhead (then it goes through the origin), a positive
    slope. None when the points do not determine a slope (all at one work, or none).
    """
    pts = [(x, y, w) for x, y, w in points if w > 0 and x > 0]
    total = math.fsum(w for _, _, w in pts)
    if not pts or total <= 0:
        return None
    mean_x = math.fsum(w * x for x, _, w in pts) / total
    mean_y = math.fsum(w * y for _, y, w in pts) / total
    sxx = math.fsum(w * (x - mean_x) ** 2 for x, _, w in pts)
    if sxx <= 1e-9 * total * mean_x * mean_x:
        return None
    sxy = math.fsum(w * (x - mean_x) * (y - mean_y) for x, y, w in pts)
    slope = sxy / sxx
    overhead = mean_y - slope * mean_x
    # Least squares within the physical bounds: on the boundary the unconstrained optimum left.
    if slope <= 0:
        return max(mean_y, 0.0), _MIN_SLOPE
    if overhead < 0:
        return 0.0, _through_origin(pts)
    return overhead, slope


def _through_origin(pts: Sequence[tuple[float, float, float]]) -> float:
    """Slope of the weighted line through the origin, kept positive."""
    sxy = math.fsum(w * x * y for x, y, w in pts)
    sxx = math.fsum(w * x * x for x, _, w in pts)
    return max(sxy / sxx, _MIN_SLOPE)


def fit_benchmark(runs: Sequence[tuple[float, float]]) -> SpeedEstimate:
    """The estimate from benchmark runs ``(work, seconds)`` at two or more batch sizes."""
    fitted = fit_line((x, y, 1.0) for x, y in runs)
    if fitted is None:
        fitted = 0.0, _through_origin([(x, y, 1.0) for x, y in runs if x > 0] or [(1.0, 1.0, 1.0)])
    return SpeedEstimate(fitted[0], fitted[1], samples=len(runs), source="benchmark")


class SpeedModel:
    """One node's speed, learnt online. Deterministic: times are passed in, never read."""

    def __init__(
        self,
        weight: float,
        *,
        window: int = 32,
        decay: float = 0.9,
        prior_weight: float = 2.0,
        outlier_ratio: float = 3.0,
        outlier_floor_s: float = 1.0,
    ) -> None:
        self.weight = weight
        self.benchmark: SpeedEstimate | None = None
        self._prior_works: tuple[float, float] = (1.0, 4.0)
        self._observations: deque[tuple[float, float]] = deque(maxlen=window)
        self._decay = decay
        self._prior_weight = prior_weight
        self._outlier_ratio = outlier_ratio
        self._outlier_floor_s = outlier_floor_s
        self._rejected_in_a_row = 0
        self._accepted = 0
        self._cache: dict[float, SpeedEstimate] = {}

    @property
    def measured(self) -> bool:
        """True once a benchmark or a finished job stands behind the estimate."""
        return self.benchmark is not None or bool(self._observations)

    def set_benchmark(self, estimate: SpeedEstimate, works: tuple[float, float]) -> None:
        """Start over from a benchmark fitted at the total works ``works`` (two batch sizes)."""
        self.benchmark = estimate
        self._prior_works = works
        self._observations.clear()
        self._rejected_in_a_row = 0
        self._accepted = 0
        self._cache.clear()

    def observe(self, work: float, seconds: float) -> bool:
        """Learn from one finished node request; False when it was left out as an outlier."""
        if work <= 0 or seconds < 0 or not math.isfinite(seconds):
            return False
        if self.measured:
            predicted = self.estimate().predict_s(work)
            if seconds > self._outlier_ratio * predicted + self._outlier_floor_s:
                self._rejected_in_a_row += 1
                if self._rejected_in_a_row < 3:
                    return False
                # Three in a row is no accident: the node changed. Forget what it was.
                self.benchmark = None
                self._observations.clear()
                self._accepted = 0
        self._rejected_in_a_row = 0
        self._observations.append((work, seconds))
        self._accepted += 1
        self._cache.clear()
        return True

    def estimate(self, nominal_per_unit_s: float = NOMINAL_PER_UNIT_S) -> SpeedEstimate:
        """The current line. ``nominal_per_unit_s`` scales the weight-only guess."""
        cached = self._cache.get(nominal_per_unit_s)
        if cached is None:
            cached = self._cache[nominal_per_unit_s] = self._fit(nominal_per_unit_s)
        return cached

    def _fit(self, nominal_per_unit_s: float) -> SpeedEstimate:
        prior = self.benchmark
        if not self._observations:
            if prior is not None:
                return prior
            return SpeedEstimate(0.0, nominal_per_unit_s / self.weight, 0, "weight")
        count = len(self._observations)
        points = [
            (work, seconds, self._decay ** (count - 1 - age))
            for age, (work, seconds) in enumerate(self._observations)
        ]
        samples = self._accepted
        if prior is not None:
            # The benchmark counts as the oldest jobs: it fades as jobs come in.
            weight = self._prior_weight * self._decay ** min(count, self._accepted)
            points += [(x, prior.predict_s(x), weight) for x in self._prior_works]
            samples += prior.samples
        fitted = fit_line(points)
        if fitted is None:
            # Every job had the same work: the overhead can't be told from the slope.
            overhead = prior.overhead_s if prior is not None else 0.0
            per_unit = _through_origin([(x, max(y - overhead, 0.0), w) for x, y, w in points])
            fitted = overhead, per_unit
        return SpeedEstimate(fitted[0], fitted[1], samples, "measured")
