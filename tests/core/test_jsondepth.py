"""Tests for the nesting limit of request bodies, checked without recursion."""

from __future__ import annotations

from typing import Any

from sdproxy.core.jsondepth import MAX_DEPTH, depth_error


def nested(depth: int, leaf: Any = 1) -> Any:
    """``leaf`` inside ``depth`` lists."""
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


class TestDepthError:
    """depth_error() finds the first container nested deeper than the limit."""

    def test_limit_is_inclusive(self) -> None:
        """A body and 63 more containers inside it pass; one more is refused where it starts."""
        assert depth_error({"a": nested(MAX_DEPTH - 1)}) is None
        error = depth_error({"a": nested(MAX_DEPTH)})
        assert error is not None
        assert error["loc"] == ["body", "a", *[0] * (MAX_DEPTH - 1)]
        assert error["type"] == "value_error.json.depth"

    def test_far_deeper_than_recursion_allows(self) -> None:
        """100 000 levels are walked without a RecursionError."""
        assert depth_error(nested(100_000)) is not None
