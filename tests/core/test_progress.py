"""Tests for aggregating the nodes' progress into one webui answer."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sdproxy.core.progress import (
    FinishedJob,
    NodeProgress,
    Shape,
    aggregate_progress,
    finished_job,
    idle_progress,
    shape_of,
)
from sdproxy.core.request import GenerationRequest, Kind, parse_generation


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


INIT = {"init_images": ["x"]}  # counted only: no node decodes it here


def request(kind: Kind = "txt2img", **body: Any) -> GenerationRequest:
    return parse_generation(kind, body, max_images=10_000)


def answer_body(
    images: int, *, timestamp: str = "20261128010203", grid: bool = False
) -> dict[str, Any]:
    """A merged response with ``images`` images (and a grid first if ``grid``)."""
    texts = [f"t{k}" for k in range(images)] or ["t0"]
    info: dict[str, Any] = {
        "infotexts": (texts[:1] if grid else []) + texts,
        "job_timestamp": timestamp,
        "index_of_first_image": 1 if grid else 0,
    }
    pictures = (["grid"] if grid else []) + [f"i{k}" for k in range(images)]
    return {"images": pictures, "parameters": {}, "info": json.dumps(info)}


class TestIdle:
    """Nothing running looks exactly like an idle webui: fresh, or stale after a job."""

    def test_idle_progress_is_the_webui_idle_shape(self) -> None:
        """progress 0, job_count 0, no image: what webuiapi's util_wait_for_ready waits for."""
        answer = idle_progress()
        assert answer["progress"] == 0.0
        assert answer["state"]["job_count"] == 0
        assert answer["state"]["job_timestamp"] == "0"
        assert list(answer) == ["progress", "eta_relative", "state", "current_image", "textinfo"]

    def test_idle_keeps_the_last_jobs_figures(self) -> None:
        """After a job: its job_timestamp, job_no, sampling_steps and interrupted stay."""
        last = FinishedJob("20261128111111", job_no=3, sampling_steps=25, interrupted=True)
        answer = idle_progress(last)
        assert answer["progress"] == 0.0
        assert answer["state"] == {
            "skipped": False,
            "interrupted": True,
            "stopping_generation": False,
            "job": "",
            "job_count": 0,
            "job_timestamp": "20261128111111",
            "job_no": 3,
            "sampling_step": 0,
            "sampling_steps": 25,
        }


class TestFinishedJob:
    """finished_job says what a webui's state shows after the request, from its answer."""

    @pytest.mark.parametrize(
        ("kind", "body", "job_no", "steps"),
        [
            ("txt2img", {"n_iter": 4, "batch_size": 2, "steps": 30}, 4, 30),
            ("txt2img", {"n_iter": 3, "enable_hr": True, "steps": 20}, 6, 20),
            (
                "txt2img",
                {"n_iter": 3, "enable_hr": True, "hr_second_pass_steps": 7, "steps": 20},
                6,
                7,
            ),
            ("img2img", {"n_iter": 2, "steps": 20, "denoising_strength": 0.75, **INIT}, 2, 16),
            ("img2img", {"n_iter": 1, "steps": 20, "denoising_strength": 1.0, **INIT}, 1, 20),
        ],
    )
    def test_finished_job_counts_every_batch(
        self, kind: Kind, body: dict[str, Any], job_no: int, steps: int
    ) -> None:
        """job_no is n_iter (twice with hires); sampling_steps the last pass's steps."""
        req = request(kind, **body)
        last = finished_job(req, answer_body(req.total_images), interrupted=False)
        assert last == FinishedJob("20261128010203", job_no, steps, interrupted=False)

    @pytest.mark.parametrize(
        ("body", "returned", "grid", "job_no"),
        [
            ({"n_iter": 12, "batch_size": 1}, 3, False, 3),
            ({"n_iter": 12, "batch_size": 1}, 0, False, 0),
            ({"n_iter": 3, "batch_size": 2, "save_images": True}, 4, True, 2),
            ({"n_iter": 3, "batch_size": 2}, 3, False, 2),  # split: a batch's worth, in part
            ({"n_iter": 3, "batch_size": 2, "enable_hr": True}, 2, False, 2),
        ],
    )
    def test_finished_job_interrupted_counts_batches_returned(
        self, body: dict[str, Any], returned: int, grid: bool, job_no: int
    ) -> None:
        """Interrupted: job_no is the client batches its returned images fill, grid excluded."""
        last = finished_job(request(**body), answer_body(returned, grid=grid), interrupted=True)
        assert (last.job_no, last.interrupted) == (job_no, True)

    def test_finished_job_of_an_unreadable_answer(self) -> None:
        """A script's answer without readable info still gives a stale state."""
        last = finished_job(request(n_iter=2), None, interrupted=False)
        assert last == FinishedJob("0", 2, 50, interrupted=False)


class TestBusy:
    """Work in flight: one job's progress over its shares, counted in the client's batches."""

    def test_progress_weighted_by_images(self) -> None:
        """Three images half done and one image done of eight: (1.5 + 1 + 2 done) / 8."""
        nodes = [NodeProgress(3, busy(0.5)), NodeProgress(1, busy(1.0))]
        answer = aggregate_progress(
            request(batch_size=8), nodes, done_images=2, skip_current_image=False
        )
        assert answer["progress"] == (1.5 + 1 + 2) / 8

    def test_eta_steps_and_preview(self) -> None:
        """Largest ETA, the most advanced node's preview and steps."""
        nodes = [
            NodeProgress(2, busy(0.3, eta=9.0, job_count=2, job_no=0, step=3, image="slow")),
            NodeProgress(2, busy(0.8, eta=2.0, job_count=2, job_no=1, step=16, image="fast")),
        ]
        answer = aggregate_progress(
            request(batch_size=1, n_iter=4), nodes, done_images=0, skip_current_image=False
        )
        assert answer["eta_relative"] == 9.0
        assert answer["state"]["sampling_step"] == 16
        assert answer["current_image"] == "fast"

    def test_job_counts_are_the_clients_batches(self) -> None:
        """n_iter 4 on two nodes of 2 iterations each: job_count 4, batches counted overall.

        One batch is done (job_no 1) and two more are being rendered at once: "Batch 2", as a
        webui would say after one batch.
        """
        req = request(batch_size=1, n_iter=4)
        nodes = [
            NodeProgress(2, busy(0.6, job_count=2, job_no=1)),
            NodeProgress(2, busy(0.3, job_count=2, job_no=0)),
        ]
        answer = aggregate_progress(req, nodes, done_images=0, skip_current_image=False)
        state = answer["state"]
        assert (state["job_count"], state["job_no"], state["job"]) == (4, 1, "Batch 2 out of 4")
        nodes = [NodeProgress(2, busy(0.6, job_count=2, job_no=1))]
        answer = aggregate_progress(req, nodes, done_images=2, skip_current_image=False)
        state = answer["state"]
        assert (state["job_count"], state["job_no"], state["job"]) == (4, 3, "Batch 4 out of 4")

    def test_single_iteration_job_is_the_script_name(self) -> None:
        """With n_iter 1 the webui's job stays scripts_txt2img / scripts_img2img."""
        nodes = [NodeProgress(2, busy(0.5, job_count=1)), NodeProgress(2, busy(0.5, job_count=1))]
        answer = aggregate_progress(
            request("img2img", batch_size=4, **INIT),
            nodes,
            done_images=0,
            skip_current_image=False,
        )
        assert answer["state"]["job"] == "scripts_img2img"
        assert answer["state"]["job_count"] == 1

    def test_hires_counts_two_jobs_a_batch(self) -> None:
        """With hires fix the webui counts each pass: job_count 2 x n_iter."""
        req = request(batch_size=1, n_iter=3, enable_hr=True)
        nodes = [NodeProgress(3, busy(0.5, job_count=6, job_no=3))]
        state = aggregate_progress(req, nodes, done_images=0, skip_current_image=False)["state"]
        assert (state["job_count"], state["job_no"], state["job"]) == (6, 3, "Batch 2 out of 3")

    @given(
        n_iter=st.integers(1, 6),
        batch=st.integers(1, 4),
        hires=st.booleans(),
        data=st.data(),
    )
    def test_one_node_with_the_whole_request_is_that_node(
        self, n_iter: int, batch: int, hires: bool, data: st.DataObject
    ) -> None:
        """One node rendering every image: the answer is the node's own, field by field."""
        passes = 2 if hires else 1
        count = n_iter * passes
        job_no = data.draw(st.integers(0, count - 1), label="job_no")
        step = data.draw(st.integers(0, 20), label="step")
        fraction = min(0.01 + job_no / count + step / 20 / count, 1.0)  # Api.progressapi
        node = busy(fraction, job_count=count, job_no=job_no, step=step)
        # The batch begun last: job_no's, or (between a batch's end and the next one's start)
        # the one just finished.
        begun = job_no // passes + data.draw(st.sampled_from([0, 1] if job_no else [1]))
        node["state"]["job"] = (
            f"Batch {min(max(begun, 1), n_iter)} out of {n_iter}"
            if n_iter > 1
            else "scripts_txt2img"
        )
        req = request(batch_size=batch, n_iter=n_iter, enable_hr=hires)
        answer = aggregate_progress(
            req, [NodeProgress(batch * n_iter, node)], done_images=0, skip_current_image=False
        )
        assert answer == node

    def test_skip_current_image_drops_the_preview(self) -> None:
        """skip_current_image=true gives current_image null even if nodes sent one."""
        nodes = [NodeProgress(1, busy(0.5, image="preview"))]
        answer = aggregate_progress(request(), nodes, done_images=0, skip_current_image=True)
        assert answer["current_image"] is None

    def test_flags_are_ored(self) -> None:
        """One interrupted node, or the client's interrupt, makes the job interrupted."""
        req = request(batch_size=2)
        nodes = [NodeProgress(1, busy(0.5)), NodeProgress(1, busy(0.5, interrupted=True))]
        answer = aggregate_progress(req, nodes, done_images=0, skip_current_image=False)
        assert answer["state"]["interrupted"] is True
        assert answer["state"]["skipped"] is False
        nodes = [NodeProgress(1, busy(0.5))]
        answer = aggregate_progress(
            req, nodes, done_images=1, interrupted=True, skip_current_image=False
        )
        assert answer["state"]["interrupted"] is True

    def test_unanswered_node_counts_as_not_started(self) -> None:
        """A node that could not be asked adds nothing; the job is begun (-1), as on a webui."""
        nodes = [NodeProgress(4, None)]
        answer = aggregate_progress(
            request(batch_size=4), nodes, done_images=0, skip_current_image=False
        )
        assert answer["progress"] == 0.01
        assert answer["state"]["job_count"] == -1
        assert answer["state"]["job"] == "scripts_txt2img"

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
        """While work runs, progress is within (0, 1], job_no within job_count, never idle."""
        nodes = [
            NodeProgress(images, busy(p, job_count=count if started else 0, job_no=count // 2))
            for images, p, count in shares
        ]
        total = done + sum(images for images, _, _ in shares)
        answer = aggregate_progress(
            request(batch_size=1, n_iter=total), nodes, done_images=done, skip_current_image=False
        )
        assert 0.01 <= answer["progress"] <= 1.0
        state = answer["state"]
        assert state["job_count"] != 0
        assert 0 <= state["job_no"] <= max(state["job_count"], 0)


class TestShape:
    """What another replica publishes of a request is enough to show its progress."""

    @given(n_iter=st.integers(1, 8), batch_size=st.integers(1, 8), hires=st.booleans())
    def test_a_shape_survives_json_and_answers_the_same(
        self, n_iter: int, batch_size: int, hires: bool
    ) -> None:
        body: dict[str, Any] = {"n_iter": n_iter, "batch_size": batch_size}
        if hires:
            body |= {"enable_hr": True, "hr_second_pass_steps": 5}
        req = request(**body)
        shape = Shape.from_json(json.loads(json.dumps(shape_of(req).to_json())))
        assert shape == shape_of(req)
        nodes = [NodeProgress(req.total_images, busy(0.4, job_count=shape.job_count, job_no=1))]
        via_request = aggregate_progress(req, nodes, done_images=0, skip_current_image=True)
        via_shape = aggregate_progress(shape, nodes, done_images=0, skip_current_image=True)
        assert via_shape == via_request

    @given(
        st.dictionaries(
            st.sampled_from(["kind", "total_images", "n_iter", "job_count", "splittable"]),
            st.none()
            | st.booleans()
            | st.integers(-3, 10**12)
            | st.sampled_from(["txt2img", "img2img", "", "Txt2img"]),
        )
    )
    def test_anything_else_is_refused_not_raised(self, data: dict[str, Any]) -> None:
        shape = Shape.from_json(data)
        if shape is not None:
            assert shape.kind in ("txt2img", "img2img")
            assert 0 < shape.n_iter <= shape.total_images
            assert shape.job_count % shape.n_iter == 0
