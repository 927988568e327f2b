"""Pure: the nodes' GET /sdapi/v1/progress answers -> the one a single webui would give.

A request split over nodes is one job to its client, counted in the client's own batches: its
``job_count`` is the client's n_iter (twice that with hires fix, as the webui counts each pass),
``job_no`` and ``job`` ("Batch k out of N") follow the images done so far, wherever they were
rendered. Its progress is the share of its images done, where images a node is rendering count
by that node's progress; the ETA is the slowest node's; the preview is the most advanced
node's. When nothing runs, the state keeps the last job's figures, as a webui's does.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, TypeGuard

from sdproxy.core.request import GenerationRequest

_FLAGS = ("skipped", "interrupted", "stopping_generation")


@dataclass(frozen=True)
class NodeProgress:
    """One node working for sdproxy: the images it is rendering and its /progress answer."""

    images: int
    answer: Mapping[str, Any] | None  # None when the node could not be asked


@dataclass(frozen=True)
class Shape:
    """What progress needs to know of a request: enough for another replica to show it."""

    kind: str
    total_images: int
    n_iter: int
    job_count: int  # the webui's: n_iter, doubled with hires fix
    splittable: bool  # False: a script request, run whole on one node

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Shape | None:
        """The shape in ``data`` (from another replica), or None if it is not a valid one."""
        kind, splittable = data.get("kind"), data.get("splittable")
        total, n_iter, count = data.get("total_images"), data.get("n_iter"), data.get("job_count")
        if kind not in ("txt2img", "img2img") or not isinstance(splittable, bool):
            return None
        if not (_positive_int(total) and _positive_int(n_iter) and _positive_int(count)):
            return None
        if n_iter > total or count % n_iter:
            return None
        return cls(kind, total, n_iter, count, splittable)


def _positive_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def shape_of(request: GenerationRequest) -> Shape:
    return Shape(
        request.kind, request.total_images, request.n_iter, job_count(request), request.splittable
    )


@dataclass(frozen=True)
class FinishedJob:
    """What a webui's state still shows of its last job once idle (``end()`` resets the rest)."""

    job_timestamp: str
    job_no: int
    sampling_steps: int
    interrupted: bool


def idle_state(last: FinishedJob | None = None) -> dict[str, Any]:
    """shared.state.dict() of an idle webui: fresh, or stale with its last job's figures."""
    return {
        "skipped": False,
        "interrupted": last.interrupted if last else False,
        "stopping_generation": False,
        "job": "",
        "job_count": 0,
        "job_timestamp": last.job_timestamp if last else "0",
        "job_no": last.job_no if last else 0,
        "sampling_step": 0,  # nextjob() after each batch leaves 0
        "sampling_steps": last.sampling_steps if last else 0,
    }


def idle_progress(last: FinishedJob | None = None) -> dict[str, Any]:
    """The webui's answer while nothing runs (webuiapi's util_wait_for_ready waits for it)."""
    return {
        "progress": 0.0,
        "eta_relative": 0.0,
        "state": idle_state(last),
        "current_image": None,
        "textinfo": None,
    }


def job_count(request: GenerationRequest) -> int:
    """The webui's job_count for ``request``: n_iter, doubled with hires fix (two passes)."""
    return request.n_iter * (1 if request.hr_steps is None else 2)


def last_sampling_steps(request: GenerationRequest) -> int:
    """state.sampling_steps after the request's last pass, as the webui's samplers set it.

    Hires fix's second pass samples its own steps; img2img samples int(denoising x steps) + 1
    (``setup_img2img_steps``, then ``launch_sampling(t_enc + 1)``).
    """
    if request.hr_steps is not None:
        return request.hr_steps
    if request.kind == "img2img":
        return int(min(request.denoising_strength, 0.999) * request.steps) + 1
    return request.steps


def finished_job(request: GenerationRequest, body: Any, *, interrupted: bool) -> FinishedJob:
    """The stale state a webui would show after answering ``body`` for ``request``.

    Each client batch rendered ran its passes and one ``nextjob()`` each: an uninterrupted
    request ends at job_no = job_count; an interrupted one at the batches its images fill
    (the batch being sampled when the interrupt came is returned too).
    """
    if not isinstance(body, Mapping):  # a script request's raw answer, checked by nobody
        body = {}
    info = _info(body.get("info"))
    stamp = info.get("job_timestamp")
    count = job_count(request)
    if interrupted:
        texts = info.get("infotexts")
        first = info.get("index_of_first_image")
        returned = len(texts) if isinstance(texts, list) else 0
        returned -= first if isinstance(first, int) and not isinstance(first, bool) else 0
        images = body.get("images")
        if isinstance(images, list) and not images and request.send_images:
            returned = 0  # one infotext and no image: nothing was finished
        batch = max(request.total_images // request.n_iter, 1)
        passes = count // request.n_iter
        job_no = min(math.ceil(max(returned, 0) / batch) * passes, count)
    else:
        job_no = count
    return FinishedJob(
        job_timestamp=stamp if isinstance(stamp, str) else "0",
        job_no=job_no,
        sampling_steps=last_sampling_steps(request),
        interrupted=interrupted,
    )


def _info(raw: Any) -> Mapping[str, Any]:
    if isinstance(raw, Mapping):
        return raw
    try:
        info = json.loads(raw) if isinstance(raw, str) else None
    except ValueError:
        return {}
    return info if isinstance(info, Mapping) else {}


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


def _batches_done(answer: Mapping[str, Any] | None) -> Fraction:
    """The share of its own job a node has finished, by its job_no / job_count (0..1)."""
    state = _state(answer)
    count, done = state.get("job_count"), state.get("job_no")
    if not isinstance(count, int) or not isinstance(done, int) or count <= 0:
        return Fraction(0)
    return min(max(Fraction(done, count), Fraction(0)), Fraction(1))


def aggregate_progress(
    request: GenerationRequest | Shape,
    nodes: Sequence[NodeProgress],
    *,
    done_images: int,
    interrupted: bool = False,
    skip_current_image: bool,
) -> dict[str, Any]:
    """The busy answer for ``request`` in flight.

    ``done_images`` of its images are back from the nodes; ``nodes`` are rendering some of the
    rest. ``interrupted``: the client interrupted it (the nodes may not say so yet).
    """
    request = request if isinstance(request, Shape) else shape_of(request)
    total = max(request.total_images, done_images + sum(n.images for n in nodes), 1)
    # Each node's progress weighted by its share of the images (one node with every image
    # reports exactly its own figure); like the webui's 0.01 offset, a busy cluster never
    # reports exactly 0, which clients take for idle.
    rendering = sum(_number(n.images) / total * _node_progress(n.answer) for n in nodes)
    progress = min(max(done_images / total + rendering, 0.01), 1.0)
    answered = [n for n in nodes if n.answer is not None]
    leader = max(answered, key=lambda n: _node_progress(n.answer), default=None)
    state = idle_state()
    if leader is not None:
        lead = _state(leader.answer)
        for key in ("sampling_step", "sampling_steps"):
            if key in lead:
                state[key] = lead[key]
    for flag in _FLAGS:
        state[flag] = any(bool(_state(n.answer).get(flag)) for n in answered)
    state["interrupted"] = state["interrupted"] or interrupted
    state.update(_client_batches(request, nodes, done_images, total))
    stamps = [
        s["job_timestamp"]
        for s in map(_state, (n.answer for n in answered))
        if isinstance(s.get("job_timestamp"), str) and s["job_timestamp"] not in ("", "0")
    ]
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


def _client_batches(
    request: Shape, nodes: Sequence[NodeProgress], done_images: int, total: int
) -> dict[str, Any]:
    """job, job_count and job_no counted in the client's batches, as one webui counts them.

    job_no is the batches finished: the images back from the nodes plus, on each node, the
    share of its job its own job_no says is finished. ``job`` is "Batch job_no + 1", as on a
    webui while it samples, but no further than the batches the nodes have begun: between a
    batch's end (job_no moves on) and the next one's start, the webui still names the batch
    just finished. Until a node has begun (job_count still 0 or -1 everywhere) and nothing is
    back, job_count is -1, as right after the webui's ``begin()``.
    """
    started = any(_number(_state(n.answer).get("job_count")) > 0 for n in nodes)
    count = request.job_count
    if not started and done_images == 0:
        return {"job": f"scripts_{request.kind}", "job_count": -1, "job_no": 0}
    passes = count // request.n_iter
    finished = Fraction(done_images) + sum(
        (n.images * _batches_done(n.answer) for n in nodes), Fraction(0)
    )
    job_no = min(math.floor(finished * count / total), count)
    begun = Fraction(done_images) + sum((_images_begun(n, passes) for n in nodes), Fraction(0))
    batch_size = Fraction(total, request.n_iter)
    batch = min(job_no // passes + 1, max(math.ceil(begun / batch_size), 1), request.n_iter)
    job = f"Batch {batch} out of {request.n_iter}" if request.n_iter > 1 else ""
    return {"job": job or f"scripts_{request.kind}", "job_count": count, "job_no": job_no}


_BATCH = re.compile(r"Batch (\d+) out of (\d+)")


def _images_begun(node: NodeProgress, passes: int) -> Fraction:
    """Images in the batches a node has begun: its "Batch k out of N", else its job_no."""
    state = _state(node.answer)
    count, done = state.get("job_count"), state.get("job_no")
    if not isinstance(count, int) or count <= 0:
        return Fraction(0)
    iterations = max(count // passes, 1)
    job = state.get("job")
    match = _BATCH.fullmatch(job) if isinstance(job, str) else None
    if match is not None and int(match[2]) > 0:
        begun, iterations = int(match[1]), int(match[2])
    else:
        begun = (done // passes if isinstance(done, int) else 0) + 1
    return Fraction(node.images * min(max(begun, 0), iterations), iterations)
