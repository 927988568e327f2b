"""Pure: how long a node takes for a share, learnt from its benchmark runs and finished jobs.

The model of one node is a line: ``seconds = overhead_s + per_unit_s * work``, for one node
request of ``work`` units, where one unit is one image of 20 steps at 512x512. A request's work
per image counts the sampled steps times the pixels, plus hires fix's second pass at its upscaled
size; img2img samples only ``steps x denoising_strength`` of its steps, as the webui does.

The line is fitted to the node's *segment*: what it did since its speed last changed (benchmark
runs as each finishes, a stored benchmark, finished jobs), newest first in weight. Points at two
or more works fix both terms. Points at one work fix only the time at that work, so the overhead
comes from what else is known, never an invented zero: the node's own overhead before its speed
last changed, else the median overhead of the nodes that measured theirs (``cluster_prior``),
else a nominal ``NOMINAL_OVERHEAD_S``. With nothing measured, the per-unit time is the configured
weight's share of what the measured nodes show. Each estimate says where each term came from.

Each observation is first held against what the segment predicts (for a segment at one work:
any physical line through it):

- within ``drift_band`` (or ``band_floor_s``): it joins the segment;
- far slower (``outlier_ratio`` times and ``outlier_floor_s`` more): a one-off, such as a
  checkpoint load, is left out; a second slow one in a row means the node changed;
- off by ``jump_band`` or more: the node changed, and a new segment starts from it at once; if
  the next observation fits the old segment again, the old one is taken back (a one-off);
- off by ``drift_band`` twice in a row on the same side: a new segment starts from the two.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from sdproxy.core.request import GenerationRequest

NOMINAL_STEPS = 20
NOMINAL_PIXELS = 512 * 512
NOMINAL_PER_UNIT_S = 1.0  # seconds per unit assumed for a node of weight 1 before any measurement
# A guess at a webui's fixed time per API request on a GPU (text encoding, sampler set-up, the
# HTTP round trip), used only until some node has measured its own.
NOMINAL_OVERHEAD_S = 0.3
MAX_OVERHEAD_SHARE = 0.9  # an assumed overhead leaves a tenth of a job to its images

Source = Literal["weight", "benchmark", "measured"]
OverheadFrom = Literal["measured", "earlier", "other nodes", "nominal"]
PerUnitFrom = Literal["measured", "one size", "weight"]
ObservationSource = Literal["job", "benchmark"]


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
    overhead_from: OverheadFrom = "measured"  # how the overhead is known
    per_unit_from: PerUnitFrom = "measured"  # how the per-unit time is known

    def predict_s(self, work: float, requests: int = 1) -> float:
        """Seconds for ``work`` units sent as ``requests`` node requests."""
        return requests * self.overhead_s + self.per_unit_s * work


@dataclass(frozen=True)
class Prior:
    """What the cluster knows of nodes in general, for what a node has not measured itself."""

    overhead_s: float = NOMINAL_OVERHEAD_S
    overhead_from: Literal["other nodes", "nominal"] = "nominal"
    per_unit_s: float = NOMINAL_PER_UNIT_S  # at weight 1


NOMINAL = Prior()

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


@dataclass(frozen=True)
class _Point:
    work: float
    seconds: float
    weight: float = 1.0
    benchmark: bool = False
    count: int = 1  # observations it stands for (a stored benchmark's runs)


Verdict = Literal["fits", "drift", "jump", "outlier"]


class SpeedModel:
    """One node's speed, learnt online. Deterministic: times are passed in, never read."""

    def __init__(
        self,
        weight: float,
        *,
        window: int = 32,
        decay: float = 0.9,
        prior_weight: float = 2.0,
        outlier_ratio: float = 4.0,
        outlier_floor_s: float = 1.0,
        drift_band: float = 0.15,
        jump_band: float = 0.5,
        band_floor_s: float = 0.05,
        min_spread: float = 0.2,
    ) -> None:
        self.weight = weight
        self.changes = 0  # times a change of speed started a new segment
        self._segment: deque[_Point] = deque(maxlen=window)
        self._previous: deque[_Point] | None = None  # the segment before the last change
        self._pending: list[tuple[_Point, int]] = []  # off-band points in a row, with their side
        self._earlier_overhead_s: float | None = None
        self._decay = decay
        self._prior_weight = prior_weight
        self._outlier_ratio = outlier_ratio
        self._outlier_floor_s = outlier_floor_s
        self._drift_band = drift_band
        self._jump_band = jump_band
        self._band_floor_s = band_floor_s
        self._min_spread = min_spread
        self._cache: dict[Prior, SpeedEstimate] = {}
        self._own: tuple[float, float] | None = None  # the segment's own fit, once computed
        self._own_known = False

    @property
    def measured(self) -> bool:
        """True once a benchmark run or a finished job stands behind the estimate."""
        return bool(self._segment)

    @property
    def measured_overhead_s(self) -> float | None:
        """The overhead the node's own points fix (they span two works), else None."""
        fitted = self._own_fit()
        return fitted[0] if fitted is not None else None

    @property
    def single_work(self) -> float | None:
        """While every point is at (about) one work, that work; else None."""
        if not self._segment or self._own_fit() is not None:
            return None
        return _means(self._weighted(self._segment))[0]

    def set_benchmark(self, estimate: SpeedEstimate, works: tuple[float, float]) -> None:
        """Start over from a stored benchmark fitted at the total works ``works`` (two sizes)."""
        count = max(estimate.samples // 2, 1)
        points = [
            _Point(work, estimate.predict_s(work), self._prior_weight, True, count)
            for work in works
        ]
        self._restart(points, keep_previous=False)
        self._earlier_overhead_s = estimate.overhead_s

    def observe(self, work: float, seconds: float, source: ObservationSource = "job") -> bool:
        """Learn from one finished node request or benchmark run; False when left out."""
        if work <= 0 or seconds < 0 or not math.isfinite(seconds) or not math.isfinite(work):
            return False
        point = _Point(work, seconds, benchmark=source == "benchmark")
        if not self._segment:
            self._add(point)
            return True
        verdict, side = self._judge(self._segment, point)
        previous = self._previous
        self._previous = None  # the first observation after a change settles it
        if previous is not None and verdict != "fits" and self._judge(previous, point)[0] == "fits":
            self._segment, self._pending = previous, []  # the change was a one-off
            self._add(point)
            return True
        if verdict == "fits":
            # A drift point before this one was noise: it joins the segment too.
            for held, _ in self._pending:
                if self._judge(self._segment, held)[0] == "drift":
                    self._segment.append(held)
            self._pending = []
            self._add(point)
            return True
        same_side = [p for p, s in self._pending if s == side]
        if not same_side and verdict in ("outlier", "drift"):
            # Held out until the next observation: a one-off, or the first of a change.
            self._pending = [(point, side)]
            return verdict == "drift"
        self._restart([*same_side, point], keep_previous=True)
        return True

    def estimate(self, prior: Prior = NOMINAL) -> SpeedEstimate:
        """The current line; what the node's own points leave open comes from ``prior``."""
        cached = self._cache.get(prior)
        if cached is None:
            cached = self._cache[prior] = self._estimate(prior)
        return cached

    def _estimate(self, prior: Prior) -> SpeedEstimate:
        overhead_from: OverheadFrom
        if self._earlier_overhead_s is not None:
            overhead, overhead_from = self._earlier_overhead_s, "earlier"
        else:
            overhead, overhead_from = prior.overhead_s, prior.overhead_from
        if not self._segment:
            per_unit = prior.per_unit_s / self.weight
            return SpeedEstimate(overhead, per_unit, 0, "weight", overhead_from, "weight")
        samples = sum(p.count for p in self._segment)
        source: Source = "benchmark" if all(p.benchmark for p in self._segment) else "measured"
        fitted = self._own_fit()
        if fitted is not None:
            return SpeedEstimate(fitted[0], fitted[1], samples, source, "measured", "measured")
        mean_x, mean_y = _means(self._weighted(self._segment))
        overhead = min(overhead, MAX_OVERHEAD_SHARE * mean_y)
        per_unit = max((mean_y - overhead) / mean_x, _MIN_SLOPE)
        return SpeedEstimate(overhead, per_unit, samples, source, overhead_from, "one size")

    # --- the segment -----------------------------------------------------------------------

    def _add(self, point: _Point) -> None:
        self._segment.append(point)
        self._changed()

    def _restart(self, points: list[_Point], *, keep_previous: bool) -> None:
        """A new segment from ``points``: the node's speed changed."""
        own = self.measured_overhead_s
        if own is not None:
            self._earlier_overhead_s = own
        self._previous = self._segment if keep_previous and self._segment else None
        self._segment = deque(points, maxlen=self._segment.maxlen)
        self._pending = []
        self.changes += 1
        self._changed()

    def _changed(self) -> None:
        self._cache.clear()
        self._own_known = False

    def _weighted(self, points: Sequence[_Point]) -> list[tuple[float, float, float]]:
        newest = len(points) - 1
        return [
            (p.work, p.seconds, p.weight * self._decay ** (newest - age))
            for age, p in enumerate(points)
        ]

    def _own_fit(self) -> tuple[float, float] | None:
        if not self._own_known:
            self._own, self._own_known = self._fit(self._segment), True
        return self._own

    def _fit(self, points: Sequence[_Point]) -> tuple[float, float] | None:
        """The segment's own line when its works differ enough (``min_spread``) to fix both."""
        if not points:
            return None
        works = [p.work for p in points]
        if max(works) < (1 + self._min_spread) * min(works):
            return None
        return fit_line(self._weighted(points))

    def _judge(self, points: Sequence[_Point], point: _Point) -> tuple[Verdict, int]:
        """How ``point`` compares with what ``points`` predict; side +1 slower, -1 faster."""
        low, high = self._expected(points, point.work)
        seconds = point.seconds
        if low <= seconds <= high:
            return "fits", 0
        side = 1 if seconds > high else -1
        excess = seconds - high if side > 0 else low - seconds
        if excess <= self._band_floor_s:
            return "fits", 0
        if side > 0 and seconds > self._outlier_ratio * high + self._outlier_floor_s:
            return "outlier", side
        ratio = seconds / high if side > 0 else low / max(seconds, 1e-9)
        if ratio >= 1 + self._jump_band:
            return "jump", side
        if ratio >= 1 + self._drift_band:
            return "drift", side
        return "fits", 0

    def _expected(self, points: Sequence[_Point], work: float) -> tuple[float, float]:
        """The seconds ``points`` allow at ``work``: the fitted line's, or every physical one's.

        At one work only, any line with a non-negative overhead and a positive slope through the
        points is possible: from the flat one to the one through the origin.
        """
        fitted = self._fit(points)
        if fitted is not None:
            predicted = fitted[0] + fitted[1] * work
            return predicted, predicted
        mean_x, mean_y = _means(self._weighted(points))
        through_origin = mean_y * work / mean_x
        return min(mean_y, through_origin), max(mean_y, through_origin)


def _means(pts: Sequence[tuple[float, float, float]]) -> tuple[float, float]:
    total = math.fsum(w for _, _, w in pts)
    return (
        math.fsum(w * x for x, _, w in pts) / total,
        math.fsum(w * y for _, y, w in pts) / total,
    )


def cluster_prior(models: Iterable[SpeedModel]) -> Prior:
    """What the nodes' own measurements say of nodes in general.

    The overhead is the median of the overheads the nodes' own points fix; while none does, the
    median of what the measured nodes assume (the nominal overhead, within their jobs' times),
    so an unmeasured node is not handicapped against them; with nothing measured, the nominal
    one. The per-unit time at weight 1 is the median of the measured nodes' times per unit
    times their weights (else the nominal one). Pure: the same models give the same prior.
    """
    models = list(models)
    overheads = [o for o in (m.measured_overhead_s for m in models) if o is not None]
    prior = Prior()
    if overheads:
        prior = Prior(statistics.median(overheads), "other nodes")
    elif assumed := [m.estimate(prior).overhead_s for m in models if m.measured]:
        prior = Prior(statistics.median(assumed), "nominal")
    per_units = [m.estimate(prior).per_unit_s * m.weight for m in models if m.measured]
    if per_units:
        prior = Prior(prior.overhead_s, prior.overhead_from, statistics.median(per_units))
    return prior
