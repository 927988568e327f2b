"""Tests for aggregating the nodes' progress into one webui answer."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from sdproxy.core.progress import NodeProgress, aggregate_progress, idle_progress


def busy(
    progress: float,
    *,
    eta: float = 1.0,
    job_count: int = 2,
    job_no: int = 0,
    step: int = 5,
    image: str | None = None,
    **flags: bool,
) -> dict[str, Any]:
    """A node's GET /progress answer while it renders."""
    return {
        "progress": progress,
        "eta_relative": eta,
        "state": {
            "skipped": flags.get("skipped", False),
            "interrupted": flags.get("interrupted", False),
            "stopping_generation": False,
            "job": "scripts_txt2img",
            "job_count": job_count,
            "job_timestamp": "20261128010203",
            "job_no": job_no,
            "sampling_step": step,
            "sampling_steps": 20,
        },
        "current_image": image,
        "textinfo": None,
    }


class TestIdle:
    """Nothing running looks exactly like an idle webui."""

    def test_idle_progress_is_the_webui_idle_shape(self) -> None:
        """progress 0, job_count 0, no image: what webuiapi's util_wait_for_ready waits for."""
        answer = aggregate_progress([], done_images=0, total_images=0, skip_current_image=False)
        assert answer == idle_progress()
        assert answer["progress"] == 0.0
        assert answer["state"]["job_count"] == 0
        assert list(answer) == ["progress", "eta_relative", "state", "current_image", "textinfo"]


class TestBusy:
    """Work in flight: one job's progress over its shares."""

    def test_progress_weighted_by_images(self) -> None:
        """Three images half done and one image done of eight: (1.5 + 1 + 2 done) / 8."""
        nodes = [NodeProgress(3, busy(0.5)), NodeProgress(1, busy(1.0))]
        answer = aggregate_progress(nodes, done_images=2, total_images=8, skip_current_image=False)
        assert answer["progress"] == (1.5 + 1 + 2) / 8

    def test_eta_counts_and_preview(self) -> None:
        """Largest ETA, summed job counts, the most advanced node's preview and steps."""
        nodes = [
            NodeProgress(2, busy(0.3, eta=9.0, job_count=2, job_no=0, step=3, image="slow")),
            NodeProgress(2, busy(0.8, eta=2.0, job_count=3, job_no=2, step=16, image="fast")),
        ]
        answer = aggregate_progress(nodes, done_images=0, total_images=4, skip_current_image=False)
        assert answer["eta_relative"] == 9.0
        assert answer["state"]["job_count"] == 5
        assert answer["state"]["job_no"] == 2
        assert answer["state"]["sampling_step"] == 16
        assert answer["current_image"] == "fast"

    def test_skip_current_image_drops_the_preview(self) -> None:
        """skip_current_image=true gives current_image null even if nodes sent one."""
        nodes = [NodeProgress(1, busy(0.5, image="preview"))]
        answer = aggregate_progress(nodes, done_images=0, total_images=1, skip_current_image=True)
        assert answer["current_image"] is None

    def test_flags_are_ored(self) -> None:
        """One interrupted node makes the job interrupted."""
        nodes = [NodeProgress(1, busy(0.5)), NodeProgress(1, busy(0.5, interrupted=True))]
        answer = aggregate_progress(nodes, done_images=0, total_images=2, skip_current_image=False)
        assert answer["state"]["interrupted"] is True
        assert answer["state"]["skipped"] is False

    def test_unanswered_node_counts_as_not_started(self) -> None:
        """A node that could not be asked adds nothing, but the job is still busy."""
        nodes = [NodeProgress(4, None)]
        answer = aggregate_progress(nodes, done_images=0, total_images=4, skip_current_image=False)
        assert answer["progress"] == 0.01
        assert answer["state"]["job_count"] == -1

    @given(
        st.lists(
            st.tuples(st.integers(1, 8), st.floats(0, 1), st.integers(0, 4)),
            min_size=1,
            max_size=4,
        ),
        st.integers(0, 20),
        st.booleans(),
    )
    def test_busy_is_never_idle(
        self, shares: list[tuple[int, float, int]], done: int, started: bool
    ) -> None:
        """While work runs, progress is within (0, 1] and the answer is not the idle one."""
        nodes = [
            NodeProgress(images, busy(p, job_count=count if started else 0))
            for images, p, count in shares
        ]
        total = done + sum(images for images, _, _ in shares)
        answer = aggregate_progress(
            nodes, done_images=done, total_images=total, skip_current_image=False
        )
        assert 0.01 <= answer["progress"] <= 1.0
        assert answer["state"]["job_count"] != 0
