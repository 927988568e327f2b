"""Tests for checking a node's answer against what it was asked (core/answers.py)."""

from __future__ import annotations

import base64
import io
import json
import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from sdproxy.core.answers import (
    MAX_ANSWER_DEPTH,
    Asked,
    BadNodeResult,
    answer_budget,
    asked_of,
    check_script_answer,
    is_webui_error,
    nested_deeper_than,
    read_part,
    text_deeper_than,
)
from sdproxy.core.request import Seeds, node_body, parse_generation

PNG = b"\x89PNG\r\n\x1a\n"


def image(name: object, head: bytes = PNG) -> str:
    """Base64 of a file that starts like an image of its kind, then a name."""
    return base64.b64encode(head + str(name).encode()).decode()


def asked(count: int, seed: int = 100, subseed: int = 7, **flags: Any) -> Asked:
    return Asked(
        count=count,
        seeds=tuple(range(seed, seed + count)),
        subseeds=tuple(range(subseed, subseed + count)),
        **flags,
    )


def answer(
    count: int,
    seed: int = 100,
    subseed: int = 7,
    *,
    grid: bool = False,
    extra: int = 0,
    send_images: bool = True,
    **info_changes: Any,
) -> dict[str, Any]:
    """A webui's answer for ``count`` images from ``seed``; ``info_changes`` override info."""
    info: dict[str, Any] = {
        "prompt": "cat",
        "all_prompts": ["cat"] * count,
        "negative_prompt": "",
        "all_negative_prompts": [""] * count,
        "seed": seed,
        "all_seeds": list(range(seed, seed + count)),
        "subseed": subseed,
        "all_subseeds": list(range(subseed, subseed + count)),
        "index_of_first_image": 1 if grid else 0,
        "infotexts": [f"cat\nSeed: {seed + k}" for k in range(count)],
    }
    images = [image(k) for k in range(count)] + [image(f"map{k}") for k in range(extra)]
    if grid:
        info["infotexts"].insert(0, info["infotexts"][0])
        images.insert(0, image("grid"))
    info.update(info_changes)
    return {
        "images": images if send_images else [],
        "parameters": {"prompt": "cat"},
        "info": json.dumps(info),
    }


def a1111_error(error: str, *, detail: str = "", errors: str = "") -> dict[str, str]:
    """The body of the webui's api_middleware.handle_exception."""
    return {"error": error, "detail": detail, "body": "", "errors": errors}


def deep(levels: int) -> str:
    return "[" * levels + "]" * levels


class TestReadPart:
    """A node's answer is taken only when it holds exactly what was asked."""

    @given(
        count=st.integers(1, 12),
        seed=st.integers(0, 2**40),
        send_images=st.booleans(),
        save_images=st.booleans(),
        extra=st.integers(0, 2),
    )
    def test_read_part_takes_a_right_answer(
        self, count: int, seed: int, send_images: bool, save_images: bool, extra: int
    ) -> None:
        """A webui's answer (grid and extension images as the request allows) is read whole."""
        grid = save_images and count >= 2
        extra = extra if send_images else 0
        got = answer(count, seed, grid=grid, extra=extra, send_images=send_images)
        want = asked(count, seed, send_images=send_images, save_images=save_images, extensions=True)
        part = read_part("n", 3, got, want)
        assert (part.start, part.count, part.grid_returned) == (3, count, grid)
        assert part.images == ([image(k) for k in range(count)] if send_images else [])
        assert part.extra_images == [image(f"map{k}") for k in range(extra)]
        assert part.infotexts == [f"cat\nSeed: {seed + k}" for k in range(count)]

    @pytest.mark.parametrize(
        ("got", "reason"),
        [
            ([], "the response is not a JSON object"),
            ({"images": "x", "parameters": {}, "info": "{}"}, "'images' is not a list of strings"),
            ({"images": [], "parameters": [], "info": "{}"}, "'parameters' is not an object"),
            ({"images": [], "parameters": {}, "info": "{not json"}, "'info' is not a JSON object"),
            ({"images": [], "parameters": {}, "info": "[1]"}, "'info' is not a JSON object"),
            ({"images": [], "parameters": {}, "info": {}}, "'info' is not a JSON object"),
            ({"images": [], "parameters": {}, "info": "{}"}, "info has no 'infotexts' list"),
            (answer(2, all_seeds=[5, 6]), "all_seeds [5, 6] where [100, 101] were sent"),
            (answer(2, all_seeds=[100, 100]), "all_seeds [100, 100] (repeating 100) where"),
            (answer(2, all_subseeds=[7, 9]), "all_subseeds [7, 9] where [7, 8] were sent"),
            (answer(2, all_seeds=[100]), "all_seeds [100] where [100, 101] were sent"),
            (answer(2, all_seeds=[100, 101.0]), "info 'all_seeds' is not a list of integers"),
            (answer(2, all_seeds=[True, 101]), "info 'all_seeds' is not a list of integers"),
            (answer(2, all_seeds=None), "info 'all_seeds' is not a list of integers"),
            (answer(2, all_prompts=["cat"]), "info 'all_prompts' is not a list of 2 prompts"),
            (answer(2, all_negative_prompts=[1, 2]), "info 'all_negative_prompts' holds a prompt"),
            (answer(2, infotexts=["a"]), "infotexts for 1 images where 2 were asked"),
            (answer(2, infotexts=["a", "b", "c"]), "infotexts for 3 images where 2 were asked"),
            (answer(2, index_of_first_image=2), "index_of_first_image is 2, not 0 or 1"),
            (answer(2, index_of_first_image=True), "index_of_first_image is True"),
            (answer(2, grid=True), "a grid (index_of_first_image 1) where save_images is off"),
            (answer(2, extra=1), "3 images where 2 were asked (and no alwayson script"),
            ({**answer(2), "images": [image(0)]}, "1 images where 2 were asked"),
        ],
    )
    def test_read_part_rejects(self, got: Any, reason: str) -> None:
        """Each wrong answer is a BadNodeResult whose message says what is wrong."""
        with pytest.raises(BadNodeResult) as caught:
            read_part("n", 0, got, asked(2))
        assert str(caught.value).startswith(reason)

    def test_read_part_rejects_one_rendered_image_too_many(self) -> None:
        """An extra image with its own infotext and seed is wrong even with extensions on."""
        with pytest.raises(BadNodeResult, match="infotexts for 3 images where 2"):
            read_part("n", 0, answer(3), asked(2, extensions=True))

    def test_read_part_rejects_images_nobody_asked_for(self) -> None:
        """With send_images off any image is wrong; so is a grid with save_images off."""
        with pytest.raises(BadNodeResult, match="2 images where send_images is off"):
            read_part("n", 0, answer(2), asked(2, send_images=False))
        with pytest.raises(BadNodeResult, match="where save_images is off"):
            read_part("n", 0, answer(2, grid=True, send_images=False), asked(2, send_images=False))

    @given(
        count=st.integers(1, 8),
        index=st.integers(0, 7),
        delta=st.integers(-5, 5).filter(bool),
        key=st.sampled_from(["all_seeds", "all_subseeds"]),
        short=st.booleans(),
    )
    def test_read_part_catches_any_changed_seed(
        self, count: int, index: int, delta: int, key: str, short: bool
    ) -> None:
        """Changing any one seed of a right answer makes it wrong, interrupted or not."""
        got = answer(count)
        info = json.loads(got["info"])
        info[key][index % count] += delta
        got["info"] = json.dumps(info)
        with pytest.raises(BadNodeResult, match=f"{key} .* were sent"):
            read_part("n", 0, got, asked(count), allow_short=short)

    @given(count=st.integers(1, 8), seed=st.integers(0, 2**63))
    def test_read_part_checks_variation_seeds(self, count: int, seed: int) -> None:
        """With a subseed strength every image has the seed sent; the subseeds count up."""
        request = parse_generation(
            "txt2img", {"batch_size": count, "subseed_strength": 0.5}, max_images=64
        )
        want = asked_of(request, node_body(request, Seeds(seed, 9), 0, count, 1))
        assert want.seeds == (seed,) * count
        assert want.subseeds == tuple(range(9, 9 + count))
        good = answer(count, seed, 9, all_seeds=[seed] * count)
        assert read_part("n", 0, good, want).count == count
        if count >= 2:
            with pytest.raises(BadNodeResult, match="all_seeds"):
                read_part("n", 0, answer(count, seed, 9), want)
            repeated = answer(count, seed, 9, all_seeds=[seed] * count, all_subseeds=[9] * count)
            with pytest.raises(BadNodeResult, match=r"all_subseeds .* \(repeating 9\)"):
                read_part("n", 0, repeated, want)


class TestInterruptedAnswers:
    """An interrupted answer may be short, but its seeds are still the ones sent."""

    @given(count=st.integers(1, 8), data=st.data())
    def test_short_answer_keeps_seed_prefix(self, count: int, data: st.DataObject) -> None:
        """Finished images with a prefix of the seeds (covering them) are read as a short part."""
        done = data.draw(st.integers(0, count))
        listed = data.draw(st.integers(max(done, 1), count))
        info = {
            "all_seeds": list(range(100, 100 + listed)),
            "all_subseeds": list(range(7, 7 + listed)),
            "all_prompts": ["cat"] * listed,
            "all_negative_prompts": [""] * listed,
            "infotexts": [f"t{k}" for k in range(max(done, 1))],
        }
        got = {**answer(done), "info": json.dumps(info)}
        part = read_part("n", 0, got, asked(count), allow_short=True)
        assert part.count == done
        assert part.images == [image(k) for k in range(done)]

    def test_short_answer_needs_allow_short(self) -> None:
        """Without an interrupt a short answer is the node's fault, not a smaller result."""
        got = {**answer(4), "images": [image(0)]}
        info = json.loads(got["info"])
        info["infotexts"] = info["infotexts"][:1]
        got["info"] = json.dumps(info)
        with pytest.raises(BadNodeResult, match="infotexts for 1 images where 4"):
            read_part("n", 0, got, asked(4))
        assert read_part("n", 0, got, asked(4), allow_short=True).count == 1

    def test_short_answer_must_cover_its_images(self) -> None:
        """Seed lists shorter than the images returned do not describe them."""
        got = answer(3, all_seeds=[100, 101], all_subseeds=[7, 8])
        with pytest.raises(BadNodeResult, match="all_seeds"):
            read_part("n", 0, got, asked(3), allow_short=True)


class TestImages:
    """Images are strict base64 of an image file."""

    @pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
    def test_real_image_files_pass(self, fmt: str) -> None:
        """What Pillow writes as PNG, JPEG, WEBP or GIF is taken."""
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), "red").save(buffer, format=fmt)
        got = {**answer(1), "images": [base64.b64encode(buffer.getvalue()).decode()]}
        assert read_part("n", 0, got, asked(1)).images == got["images"]

    @pytest.mark.parametrize(
        ("encoded", "reason"),
        [
            ("data:image/png;base64," + image(0), "images[0] is not base64"),
            (image(0)[:-2] + "\n" + image(0)[-2:], "images[0] is not base64"),
            (image("ab") + "=", "images[0] is not base64"),
            (image("ab").rstrip("="), "images[0] is not base64"),
            (image("ab") + "AAAA", "images[0] is not base64"),
            ("caf\u00e9", "images[0] is not base64"),
            ("", "images[0] is not a PNG, JPEG or WEBP image"),
            (base64.b64encode(b"<html>502</html>").decode(), "images[0] is not a PNG"),
            (image(0, b"RIFF\0\0\0\0WAVE"), "images[0] is not a PNG"),
        ],
    )
    def test_not_an_image_is_a_wrong_answer(self, encoded: str, reason: str) -> None:
        """A data URI, whitespace, bad padding or bytes of another kind are refused."""
        got = {**answer(1), "images": [encoded]}
        with pytest.raises(BadNodeResult) as caught:
            read_part("n", 0, got, asked(1))
        assert str(caught.value).startswith(reason)

    @given(data=st.binary(max_size=64))
    def test_random_bytes_are_not_images(self, data: bytes) -> None:
        """Bytes without an image signature are refused, whatever they are."""
        signed = data.startswith((PNG, b"\xff\xd8\xff", b"GIF87a", b"GIF89a")) or (
            data[:4] == b"RIFF" and data[8:12] == b"WEBP"
        )
        got = {**answer(1), "images": [base64.b64encode(data).decode()]}
        if signed:
            read_part("n", 0, got, asked(1))
        else:
            with pytest.raises(BadNodeResult, match="not a PNG, JPEG or WEBP"):
                read_part("n", 0, got, asked(1))

    def test_script_answer_checks_images_and_info(self) -> None:
        """A script's own answer is not counted, but its images and info are checked."""
        check_script_answer(answer(5, grid=True), send_images=True)
        with pytest.raises(BadNodeResult, match=r"images\[1\] is not base64"):
            check_script_answer({**answer(2), "images": [image(0), "!"]}, send_images=True)
        with pytest.raises(BadNodeResult, match="nested deeper"):
            check_script_answer({**answer(1), "info": deep(10_000)}, send_images=True)


class TestDepth:
    """Deep JSON is refused by counting, never by recursing."""

    def test_deep_info_is_a_wrong_answer_not_a_recursion_error(self) -> None:
        """info nested 100000 deep (json.loads would raise RecursionError) is a BadNodeResult."""
        info = '{"infotexts": ["t"], "x": ' + deep(100_000) + "}"
        with pytest.raises(BadNodeResult, match=f"nested deeper than {MAX_ANSWER_DEPTH}"):
            read_part("n", 0, {**answer(1), "info": info}, asked(1))

    def test_info_at_the_limit_is_read(self) -> None:
        """info nested exactly MAX_ANSWER_DEPTH deep is fine, one more level is not."""
        good = json.loads(answer(1)["info"])
        good["x"] = json.loads(deep(MAX_ANSWER_DEPTH - 1))
        read_part("n", 0, {**answer(1), "info": json.dumps(good)}, asked(1))
        good["x"] = json.loads(deep(MAX_ANSWER_DEPTH))
        with pytest.raises(BadNodeResult, match="nested deeper"):
            read_part("n", 0, {**answer(1), "info": json.dumps(good)}, asked(1))

    @given(
        st.recursive(
            st.none() | st.integers() | st.text(alphabet='[]{}"\\ab,:'),
            lambda inner: (
                st.lists(inner, max_size=3)
                | st.dictionaries(st.text(alphabet='[]{}"\\a'), inner, max_size=3)
            ),
            max_leaves=30,
        ),
        st.integers(0, 8),
    )
    def test_depth_checks_agree_with_a_recursive_count(self, value: Any, limit: int) -> None:
        """Both depth checks (on text and on decoded JSON) match the plain recursive depth."""

        def depth(item: Any) -> int:
            if isinstance(item, dict):
                item = list(item.values())
            if isinstance(item, list):
                return 1 + max(map(depth, item), default=0)
            return 0

        expected = depth(value) > limit
        assert nested_deeper_than(value, limit) == expected
        assert text_deeper_than(json.dumps(value), limit) == expected


class TestWebuiErrors:
    """Which error statuses and bodies are the webui's own answer."""

    @pytest.mark.parametrize(
        ("status", "body", "webui"),
        [
            (404, {"detail": "Not Found"}, True),
            (405, {"detail": "Method Not Allowed"}, True),
            (404, a1111_error("HTTPException", detail="Init image not found"), True),
            (422, a1111_error("HTTPException", detail="Script 'x' not found"), True),
            (422, {"detail": [{"loc": ["body", "seed"], "msg": "bad", "type": "int"}]}, True),
            (422, {"detail": [{"type": "int", "loc": ["body"], "msg": "m", "input": 1}]}, True),
            (500, {"error": "KeyError", "detail": "", "body": "", "errors": "'x'"}, True),
            (500, {"error": "KeyError", "detail": "", "body": "", "message": "'x'"}, True),
            (500, {"detail": "Invalid image format"}, True),
            (400, {"detail": [{"loc": [], "msg": "m", "type": "t"}]}, False),
            (422, {"detail": [{"msg": "no loc"}]}, False),
            (422, {"detail": None}, False),
            (404, {"detail": "x", "extra": 1}, False),
            (404, {"error": 1, "detail": "", "body": "", "errors": ""}, False),
            (404, "<html>404 Not Found</html>", False),
            (404, ["detail"], False),
            (429, {"detail": "Too Many Requests"}, False),
            (413, {"detail": "Request Entity Too Large"}, False),
            (408, {"detail": "Request Timeout"}, False),
            (502, {"error": "x", "detail": "", "body": "", "errors": ""}, False),
            (503, {"detail": "Service Unavailable"}, False),
            (307, {"detail": "moved"}, False),
            (200, {"detail": "ok"}, False),
        ],
    )
    def test_is_webui_error(self, status: int, body: Any, webui: bool) -> None:
        """Only the shapes of the webui's handlers, at statuses the webui answers, count."""
        assert is_webui_error(status, body) == webui


class TestAnswerBudget:
    """The byte limit for an answer covers the largest answer a webui can give, and no more."""

    def request(self, **body: Any) -> Any:
        return parse_generation("txt2img", {"width": 256, "height": 256, **body}, max_images=64)

    @pytest.mark.parametrize(("fmt", "mode"), [("PNG", "RGBA"), ("JPEG", "RGB"), ("WEBP", "RGB")])
    def test_worst_case_images_fit_the_default_budget(self, fmt: str, mode: str) -> None:
        """Pure noise, the least compressible image, fits 8 bytes per pixel in base64."""
        rng = random.Random(1)
        noise = Image.frombytes(mode, (256, 256), rng.randbytes(256 * 256 * len(mode)))
        buffer = io.BytesIO()
        options: dict[str, Any] = {"quality": 100} if fmt == "JPEG" else {}
        options |= {"lossless": True} if fmt == "WEBP" else {}
        noise.save(buffer, format=fmt, **options)
        encoded = len(base64.b64encode(buffer.getvalue()))
        budget = answer_budget(self.request(), 1)
        assert encoded <= budget.pixels * 8.0 < budget.limit_bytes(0, 8.0, 0)

    def test_budget_counts_grid_extensions_hires_and_prompts(self) -> None:
        """A grid, alwayson scripts, hires fix and long prompts each raise the limit."""
        plain = answer_budget(self.request(), 4).limit_bytes(0, 8.0, 0)
        changes: dict[str, Any]
        for changes in (
            {"save_images": True},
            {"alwayson_scripts": {"ControlNet": {"args": []}}},
            {"enable_hr": True, "hr_scale": 2},
            {"prompt": "x" * 10_000},
        ):
            assert answer_budget(self.request(**changes), 4).limit_bytes(0, 8.0, 0) > plain

    def test_budget_without_images_is_info_only(self) -> None:
        """send_images off: no pixels counted; a script gets at least the fixed cap."""
        budget = answer_budget(self.request(send_images=False), 16)
        assert budget.pixels == 0
        assert budget.limit_bytes(100, 8.0, 10**9) < 10**7
        script = answer_budget(self.request(), 1, script=True)
        assert script.limit_bytes(0, 8.0, 10**9) == 10**9
