"""Tests for the sizes a txt2img job renders at, and the bounds checked on them."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdproxy.core.hires import old_first_pass, plan_passes, resize_limits
from sdproxy.core.request import InputLimits, parse_generation
from sdproxy.errors import RequestValidationError

LIMITS = InputLimits(max_width=4096, max_height=4096, max_steps=150)
HIRES_FIELDS = {"hr_scale", "hr_resize_x", "hr_resize_y", "override_settings"}


def parse(body: dict[str, Any], limits: InputLimits = LIMITS) -> Any:
    return parse_generation("txt2img", body, max_images=100, limits=limits)


def errors_of(body: dict[str, Any], limits: InputLimits = LIMITS) -> list[dict[str, Any]]:
    with pytest.raises(RequestValidationError) as caught:
        parse(body, limits)
    return caught.value.errors


class TestPlanPasses:
    """plan_passes() is StableDiffusionProcessingTxt2Img's sizing, case by case."""

    @pytest.mark.parametrize(
        ("args", "first", "hires"),
        [
            ({}, (512, 512), None),
            ({"enable_hr": True}, (512, 512), (1024, 1024)),
            ({"enable_hr": True, "hr_scale": 1.3}, (512, 512), (665, 665)),  # int() truncates
            ({"enable_hr": True, "hr_resize": (1000, 0)}, (512, 512), (1000, 1000)),
            ({"enable_hr": True, "hr_resize": (0, 700)}, (512, 512), (700, 700)),
            # Both set: the first pass's ratio, covering the target, cropped afterwards.
            ({"enable_hr": True, "hr_resize": (1024, 512)}, (512, 512), (1024, 1024)),
            ({"enable_hr": True, "hr_resize": (512, 1024)}, (512, 512), (1024, 1024)),
            ({"firstphase": (256, 320)}, (256, 320), None),
            ({"firstphase": (256, 320), "enable_hr": True}, (256, 320), (512, 640)),
            ({"enable_hr": True, "old_sizing": True}, (512, 512), (512, 512)),
        ],
    )
    def test_sizes(
        self, args: dict[str, Any], first: tuple[int, int], hires: tuple[int, int] | None
    ) -> None:
        """First and second pass sizes for hr_scale, hr_resize_x/y, firstphase_*, old sizing."""
        passes = plan_passes(512, 512, **args)
        assert passes.first.size == first
        assert (passes.hires.size if passes.hires else None) == hires

    def test_wide_image_resized_by_height_renders_very_wide(self) -> None:
        """The issue's case: 4096x64 with hr_resize_y 512 renders a 32768x512 second pass."""
        passes = plan_passes(4096, 64, enable_hr=True, hr_resize=(0, 512))
        assert passes.hires is not None
        assert (passes.hires.size, passes.hires.driver) == ((32768, 512), "hr_resize_y")

    def test_old_first_pass_is_about_512_squared(self) -> None:
        """old_hires_fix_first_pass_dimensions rounds up to multiples of 64."""
        assert old_first_pass(1024, 1024) == (512, 512)
        assert old_first_pass(4000, 4096) == (512, 576)

    @given(
        width=st.integers(1, 5000),
        height=st.integers(1, 5000),
        driver=st.sampled_from(["hr_resize_x", "hr_resize_y"]),
        max_side=st.integers(1, 5000),
    )
    def test_resize_limits_are_exact(
        self, width: int, height: int, driver: str, max_side: int
    ) -> None:
        """The highest resize value keeps both sides in bounds; one more does not."""
        lowest, highest = resize_limits(driver, width, height, max_side, max_side)

        def fits(value: int) -> bool:
            resize = (value, 0) if driver == "hr_resize_x" else (0, value)
            hires = plan_passes(width, height, enable_hr=True, hr_resize=resize).hires
            assert hires is not None
            return min(hires.size) >= 1 and max(hires.size) <= max_side

        if lowest <= highest:
            assert fits(lowest)
            assert fits(highest)
        assert not fits(highest + 1)
        assert lowest == 1 or not fits(lowest - 1)


class TestHiresBounds:
    """A hires pass beyond max_width x max_height is a 422 naming the field that causes it."""

    def test_resize_y_on_a_wide_image_is_422(self) -> None:
        """hr_resize_y 512 on 4096x64 would render 32768 wide: hr_resize_y names the limit."""
        body = {"width": 4096, "height": 64, "enable_hr": True, "hr_resize_y": 512}
        (error,) = errors_of(body)
        assert error["loc"] == ["body", "hr_resize_y"]
        assert error["type"] == "value_error.number.not_le"
        assert error["ctx"] == {"limit_value": 64}  # 64 * 4096 // 64 = 4096

    def test_both_resizes_cover_the_target(self) -> None:
        """Both set on 4096x64: the cover is driven by hr_resize_y, 32768 wide."""
        body = {"width": 4096, "height": 64, "enable_hr": True}
        (error,) = errors_of({**body, "hr_resize_x": 512, "hr_resize_y": 512})
        assert error["loc"] == ["body", "hr_resize_y"]

    def test_huge_scale_is_422_not_overflow(self) -> None:
        """hr_scale 1e308 makes an infinite size: a 422, never an OverflowError."""
        (error,) = errors_of({"enable_hr": True, "hr_scale": 1e308})
        assert error["loc"] == ["body", "hr_scale"]
        assert error["ctx"] == {"limit_value": 8.0}

    @pytest.mark.parametrize("scale", [0, -2, 0.001])
    def test_empty_second_pass_is_422(self, scale: float) -> None:
        """A second pass of less than one pixel would fail on the node."""
        (error,) = errors_of({"enable_hr": True, "hr_scale": scale})
        assert (error["loc"], error["type"]) == (["body", "hr_scale"], "value_error.number.not_ge")

    def test_firstphase_replaces_the_first_pass(self) -> None:
        """firstphase_* is the first pass size, bounded like width and height."""
        req = parse({"firstphase_width": 256, "firstphase_height": 128})
        assert (req.width, req.height) == (256, 128)
        (error,) = errors_of({"firstphase_width": 5000, "firstphase_height": 64})
        assert error["loc"] == ["body", "firstphase_width"]
        (error,) = errors_of({"firstphase_width": 512})
        assert (error["loc"], error["type"]) == (
            ["body", "firstphase_height"],
            "value_error.number.not_ge",
        )

    def test_old_sizing_override_is_checked(self) -> None:
        """use_old_hires_fix_width_height makes a narrow image's first pass wider than asked."""
        body = {"width": 4096, "height": 8, "enable_hr": True}
        limits = InputLimits(max_width=8192, max_height=8192)
        assert parse(body, limits).hr_width == 8192  # the new sizing: 4096x8, then 8192x16
        with_old = {**body, "override_settings": {"use_old_hires_fix_width_height": True}}
        (error,) = errors_of(with_old, limits)  # the old: 11648x64 first
        assert error["loc"] == ["body", "override_settings", "use_old_hires_fix_width_height"]

    @settings(max_examples=300, deadline=None)
    @given(
        width=st.integers(1, 4096),
        height=st.integers(1, 4096),
        scale=st.floats(-4, 1e308, allow_nan=False),
        resize_x=st.one_of(st.just(0), st.integers(-100, 5000)),
        resize_y=st.one_of(st.just(0), st.integers(-100, 5000)),
        firstphase=st.sampled_from([(0, 0), (0, 0), (256, 256), (4096, 64)]),
    )
    def test_accepted_requests_render_within_bounds(
        self,
        width: int,
        height: int,
        scale: float,
        resize_x: int,
        resize_y: int,
        firstphase: tuple[int, int],
    ) -> None:
        """Any accepted combination renders both passes inside the bounds; refusals name hires."""
        body = {
            "width": width,
            "height": height,
            "enable_hr": True,
            "hr_scale": scale,
            "hr_resize_x": resize_x,
            "hr_resize_y": resize_y,
            "firstphase_width": firstphase[0],
            "firstphase_height": firstphase[1],
        }
        refused: list[dict[str, Any]] = []
        try:
            req = parse(body)
        except RequestValidationError as exc:
            refused = exc.errors
        if refused:
            assert {e["loc"][1] for e in refused} <= HIRES_FIELDS
            return
        assert 1 <= req.width <= 4096
        assert 1 <= req.height <= 4096
        assert 1 <= req.hr_width <= 4096
        assert 1 <= req.hr_height <= 4096
