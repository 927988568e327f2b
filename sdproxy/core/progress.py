"""Pure: the nodes' GET /sdapi/v1/progress answers -> the one a single webui would give.

A request split over nodes is one job to its client: its progress is the share of its images
done, where images a node is rendering count by that node's progress; the ETA is the slowest
node's; job counts add up; the preview is the most advanced node's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

_FLAGS = ("skipped", "interrupted", "stopping_generation")


@dataclass(frozen=True)
class NodeProgress:
    """One node working for sdproxy: the images it is rendering and its /progress answer."""

    images: int
    answer: Mapping[str, Any] | None  # None when the node could not be asked


def idle_state() -> dict[str, Any]:
    """shared.state.dict() of a webui that has run nothing yet."""
    return {
        "skipped": False,
        "interrupted": False,
        "stopping_generation": False,
        "job": "",
        "job_count": 0,
        "job_timestamp": "0",
        "job_no": 0,
        "sampling_step": 0,
        "sampling_steps": 0,
    }


def idle_progress() -> dict[str, Any]:
    """The webui's answer while nothing runs (webuiapi's util_wait_for_ready waits for it)."""
    return {
        "progress": 0.0,
        "eta_relative": 0.0,
        "state": idle_state(),
        "current_image": None,
        "textinfo": None,
    }


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def _state(answer: Mapping[str, Any] | None) -> Mapping[str, Any]:
    state = answer.get("state") if answer is not None else None
    return state if isinstance(state, Mapping) else {}


def _node_progress(answer: Mapping[str, Any] | None) -> float:
    """How far a node is through its job, 0..1; 0 when it has not begun or cannot be asked."""
    if answer is None or _number(_state(answer).get("job_count")) == 0:
        return 0.0
    return min(max(_number(answer.get("progress")), 0.0), 1.0)


def aggregate_progress(
    nodes: Sequence[NodeProgress],
    *,
    done_images: int,
    total_images: int,
    skip_current_image: bool,
) -> dict[str, Any]:
    """The busy answer for work in flight; the idle answer when there is none.

    ``done_images`` of ``total_images`` are finished; ``nodes`` are rendering some of the rest.
    """
    if total_images <= 0 and not nodes:
        return idle_progress()
    rendering = sum(_number(n.images) * _node_progress(n.answer) for n in nodes)
    total = max(total_images, done_images + sum(n.images for n in nodes), 1)
    # Like the webui's 0.01 offset: a busy cluster never reports exactly 0 (= idle to clients).
    progress = min(max((done_images + rendering) / total, 0.01), 1.0)
    answered = [n for n in nodes if n.answer is not None]
    leader = max(answered, key=lambda n: _node_progress(n.answer), default=None)
    state = idle_state()
    if leader is not None:
        lead = _state(leader.answer)
        for key in ("job", "sampling_step", "sampling_steps"):
            if key in lead:
                state[key] = lead[key]
    for flag in _FLAGS:
        state[flag] = any(bool(_state(n.answer).get(flag)) for n in answered)
    counts = [_state(n.answer) for n in answered]
    job_count = sum(
        int(_number(s.get("job_count"))) for s in counts if _number(s.get("job_count")) > 0
    )
    state["job_count"] = job_count if job_count > 0 else -1  # -1: begun, as right after begin()
    state["job_no"] = sum(int(_number(s.get("job_no"))) for s in counts) if job_count > 0 else 0
    stamps = [s["job_timestamp"] for s in counts if s.get("job_timestamp") not in (None, "", "0")]
    state["job_timestamp"] = min(stamps) if stamps else "0"
    image = None
    if not skip_current_image:
        with_image = [n for n in answered if n.answer and n.answer.get("current_image")]
        best = max(with_image, key=lambda n: _node_progress(n.answer), default=None)
        image = best.answer.get("current_image") if best and best.answer else None
    return {
        "progress": progress,
        "eta_relative": max(
            (_number(n.answer.get("eta_relative")) for n in answered if n.answer), default=0.0
        ),
        "state": state,
        "current_image": image,
        "textinfo": leader.answer.get("textinfo") if leader and leader.answer else None,
    }
