"""What a replica publishes of its oldest rendering request, and what it takes from others."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from sdproxy.cluster.published import Rendering
from sdproxy.core.progress import Shape

SHAPE = Shape("txt2img", total_images=8, n_iter=4, job_count=4, splittable=True)
GOOD = Rendering(SHAPE, 1_700_000_000.25, 2, False, {"a": 3, "b": 3})


class TestRendering:
    def test_it_survives_the_trip_through_redis(self) -> None:
        assert Rendering.from_json(GOOD.to_json(), {"a", "b"}) == GOOD

    def test_nodes_this_replica_does_not_know_are_left_out(self) -> None:
        taken = Rendering.from_json(GOOD.to_json(), {"a"})
        assert taken is not None
        assert taken.nodes == {"a": 3}
        assert Rendering.from_json(GOOD.to_json(), {"c"}) is None  # nothing left to ask

    @given(
        field=st.sampled_from(["started_at", "done_images", "interrupted", "nodes", "n_iter"]),
        value=st.none() | st.booleans() | st.integers(-2, 10**9) | st.sampled_from(["x", {}]),
    )
    def test_a_wrong_field_is_refused_not_raised(self, field: str, value: Any) -> None:
        taken = Rendering.from_json({**GOOD.to_json(), field: value}, {"a", "b"})
        if taken is not None:
            assert 0 <= taken.done_images <= taken.shape.total_images
            assert all(0 < images <= taken.shape.total_images for images in taken.nodes.values())
