"""Tests for merging node answers back into one webui response."""

from __future__ import annotations

import base64
import itertools
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sdproxy.core.answers import Asked, read_part
from sdproxy.core.merge import Part, dump_info, merge_parts, with_grid
from sdproxy.core.request import GenerationRequest, Seeds, parse_generation
from sdproxy.fakewebui.infotext import seed_lists
from sdproxy.fakewebui.pixels import b64_png, render_image, render_png
from tests.support import pixels


def image(name: object) -> str:
    """A base64 string that passes the node answer check: a PNG signature, then a name."""
    return base64.b64encode(b"\x89PNG\r\n\x1a\n" + str(name).encode()).decode()


def part_of(
    node: str, start: int, count: int, answer: dict[str, Any], *, allow_short: bool = False
) -> Part:
    """read_part for an answer built by node_answer, asked for the seeds it reports."""
    info = json.loads(answer["info"])
    asked = Asked(
        count=count,
        seeds=tuple(info["all_seeds"]),
        subseeds=tuple(info["all_subseeds"]),
        save_images=info["index_of_first_image"] == 1,
    )
    return read_part(node, start, answer, asked, allow_short=allow_short)


def single_node_info(total: int, seed: int, subseed: int, strength: float) -> dict[str, Any]:
    """An info dict shaped like one webui's for ``total`` images (keys in the webui's order)."""
    seeds = [seed + (k if strength == 0 else 0) for k in range(total)]
    subseeds = [subseed + k for k in range(total)]
    return {
        "prompt": "cat",
        "all_prompts": ["cat"] * total,
        "negative_prompt": "dog",
        "all_negative_prompts": ["dog"] * total,
        "seed": seeds[0],
        "all_seeds": seeds,
        "subseed": subseeds[0],
        "all_subseeds": subseeds,
        "subseed_strength": strength,
        "width": 64,
        "batch_size": 0,
        "index_of_first_image": 0,
        "infotexts": [
            f"cat, Seed: {s}, Variation seed: {v}" for s, v in zip(seeds, subseeds, strict=True)
        ],
        "job_timestamp": "20261128000000",
        "version": "v1.10.1",
    }


def node_answer(full: dict[str, Any], start: int, count: int, grid: bool) -> dict[str, Any]:
    """What a node asked for images start..start+count-1 answers, sliced from ``full``."""
    info = dict(full)
    for key in ("all_prompts", "all_negative_prompts", "all_seeds", "all_subseeds", "infotexts"):
        info[key] = full[key][start : start + count]
    info["seed"], info["subseed"] = info["all_seeds"][0], info["all_subseeds"][0]
    info["batch_size"] = count
    images = [image(k) for k in range(start, start + count)]
    if grid and count >= 2:
        images.insert(0, image("node-grid"))
        info["infotexts"] = info["infotexts"][:1] + info["infotexts"]
        info["index_of_first_image"] = 1
    return {
        "images": images,
        "parameters": {"seed": info["seed"], "n_iter": 1},
        "info": dump_info(info),
    }


def request(**body: Any) -> GenerationRequest:
    return parse_generation("txt2img", body, max_images=10_000)


@st.composite
def cuts(draw: st.DrawFn, total: int) -> list[tuple[int, int]]:
    """A random partition of range(total) into contiguous (start, count) pieces."""
    points = sorted(draw(st.sets(st.integers(1, total - 1), max_size=min(6, total - 1))))
    edges = [0, *points, total]
    return [(a, b - a) for a, b in itertools.pairwise(edges)]


class TestMergeParts:
    """Merging node slices restores what one webui would have said."""

    @given(
        data=st.data(),
        batch=st.integers(1, 8),
        n_iter=st.integers(1, 4),
        strength=st.sampled_from([0.0, 0.5]),
        save_images=st.booleans(),
    )
    def test_merge_inverts_any_split(
        self, data: st.DataObject, batch: int, n_iter: int, strength: float, save_images: bool
    ) -> None:
        """Cut one webui's answer into node slices (with their grids); merging restores it."""
        total = batch * n_iter
        req = request(
            batch_size=batch,
            n_iter=n_iter,
            seed=-1,
            subseed_strength=strength,
            save_images=save_images,
        )
        full = single_node_info(total, 1000, 77, strength)
        pieces = data.draw(cuts(total)) if total > 1 else [(0, 1)]
        parts = [
            part_of(f"n{i}", start, count, node_answer(full, start, count, save_images))
            for i, (start, count) in enumerate(pieces)
        ]
        data.draw(st.randoms()).shuffle(parts)
        merged = merge_parts(req, Seeds(1000, 77), parts)
        expected = dict(full, batch_size=batch)
        assert merged.info == expected
        assert merged.images == [image(k) for k in range(total)]
        assert merged.parameters["seed"] == -1
        assert merged.parameters["n_iter"] == n_iter
        assert merged.grid_wanted == (save_images and total >= 2)
        assert [first for _, first, _ in merged.shares] == [start for start, _ in pieces]

    def test_merge_rejects_gaps(self) -> None:
        """Parts that do not tile the request are a bug, never a silent short answer."""
        full = single_node_info(4, 1, 1, 0)
        part = part_of("a", 0, 2, node_answer(full, 0, 2, False))
        with pytest.raises(ValueError, match="cover 2 images"):
            merge_parts(request(batch_size=4), Seeds(1, 1), [part])

    def test_with_grid_goes_first(self) -> None:
        """The grid leads images and infotexts, and index_of_first_image becomes 1."""
        full = single_node_info(2, 1, 1, 0)
        part = part_of("a", 0, 2, node_answer(full, 0, 2, False))
        merged = with_grid(merge_parts(request(batch_size=2), Seeds(1, 1), [part]), "G")
        assert merged.images == ["G", image(0), image(1)]
        assert merged.info["infotexts"][0] == merged.info["infotexts"][1]
        assert merged.info["index_of_first_image"] == 1

    def test_dump_info_matches_python_json(self) -> None:
        """info is serialized like the webui's json.dumps: ASCII escapes, spaced separators."""
        text = dump_info({"prompt": "caf\u00e9", "all_seeds": [1, 2], "f": print})
        assert text == '{"prompt": "caf\\u00e9", "all_seeds": [1, 2], "f": null}'
        assert json.loads(text)["prompt"] == "caf\u00e9"


def interrupted_answer(full: dict[str, Any], start: int, asked: int, done: int) -> dict[str, Any]:
    """A node asked for ``asked`` images from ``start``, interrupted after ``done`` of them."""
    answer = node_answer(full, start, asked, False)
    info = json.loads(answer["info"])
    # As the webui: per-image lists keep every entry, infotexts and images only finished ones,
    # and one infotext when nothing finished.
    info["infotexts"] = info["infotexts"][: max(done, 1)]
    answer["info"] = dump_info(info)
    answer["images"] = answer["images"][:done]
    return answer


class TestInterrupted:
    """An interrupted request returns the images finished so far, as one webui does."""

    @given(
        data=st.data(),
        total=st.integers(2, 12),
        strength=st.sampled_from([0.0, 0.5]),
    )
    def test_merge_partial_keeps_finished_images_and_full_lists(
        self, data: st.DataObject, total: int, strength: float
    ) -> None:
        """Finished images in order with their infotexts; all_seeds still has every entry."""
        req = request(batch_size=total, seed=-1, subseed_strength=strength)
        full = single_node_info(total, 500, 9, strength)
        pieces = data.draw(cuts(total))
        parts = []
        for i, (start, count) in enumerate(pieces):
            if data.draw(st.booleans(), label=f"piece {i} answered"):
                done = data.draw(st.integers(0, count), label=f"piece {i} done")
                answer = interrupted_answer(full, start, count, done)
                parts.append(part_of(f"n{i}", start, count, answer, allow_short=True))
        if not parts:
            return
        merged = merge_parts(req, Seeds(500, 9), parts, partial=True)
        finished = sorted(k for part in parts for k in range(part.start, part.start + part.count))
        order = finished + [k for k in range(total) if k not in finished]
        assert merged.images == [image(k) for k in finished]
        assert merged.info["all_seeds"] == [full["all_seeds"][k] for k in order]
        assert merged.info["all_subseeds"] == [full["all_subseeds"][k] for k in order]
        assert merged.info["seed"] == merged.info["all_seeds"][0]
        assert len(merged.info["all_prompts"]) == total
        if finished:
            assert merged.info["infotexts"] == [full["infotexts"][k] for k in finished]
        else:
            assert len(merged.info["infotexts"]) == 1
        assert merged.rendered == len(finished)


def image_inputs(seed: int, subseed: int, strength: float, prompt: str) -> dict[str, Any]:
    """What the fake webui renders one image from: its own seed, subseed and prompt."""
    return {
        "seed": seed,
        "subseed": subseed,
        "subseed_strength": strength,
        "prompt": prompt,
        "width": 8,
        "height": 8,
        "init_image_digest": None,
    }


def rendered_answer(
    seed: int, subseed: int, strength: float, prompts: list[str], start: int, asked: int, done: int
) -> dict[str, Any]:
    """A node's answer for images start..start+asked-1, interrupted after ``done``, real pixels.

    Prompts differ per image (as a wildcard extension makes them), so a wrong pairing of
    images with all_prompts shows as well as one with all_seeds.
    """
    seeds, subseeds = seed_lists(seed, subseed, strength, len(prompts))
    ks = range(start, start + asked)
    texts = [f"{prompts[k]}, Seed: {seeds[k]}, Variation seed: {subseeds[k]}" for k in ks]
    images = [
        b64_png(render_png(**image_inputs(seeds[k], subseeds[k], strength, prompts[k]), infotext=t))
        for k, t in zip(ks[:done], texts, strict=False)
    ]
    info = {
        "prompt": prompts[start],
        "all_prompts": [prompts[k] for k in ks],
        "negative_prompt": f"not {prompts[start]}",
        "all_negative_prompts": [f"not {prompts[k]}" for k in ks],
        "seed": seeds[start],
        "all_seeds": [seeds[k] for k in ks],
        "subseed": subseeds[start],
        "all_subseeds": [subseeds[k] for k in ks],
        "subseed_strength": strength,
        "batch_size": asked,
        "index_of_first_image": 0,
        # As the webui: one infotext when no image was finished.
        "infotexts": texts[: max(done, 1)],
    }
    return {"images": images, "parameters": {}, "info": dump_info(info)}


class TestInterruptedPairing:
    """After an interrupt, entry i of every per-image list describes images[i]."""

    @given(
        data=st.data(),
        total=st.integers(2, 12),
        strength=st.sampled_from([0.0, 0.5]),
    )
    def test_merge_partial_pairs_each_image_with_its_seed_and_prompt(
        self, data: st.DataObject, total: int, strength: float
    ) -> None:
        """zip(images, all_seeds, all_subseeds, all_prompts) re-renders each image exactly."""
        prompts = [f"owl {k}" for k in range(total)]
        req = request(batch_size=1, n_iter=total, seed=-1, subseed_strength=strength)
        parts = []
        for i, (start, count) in enumerate(data.draw(cuts(total), label="pieces")):
            if data.draw(st.booleans(), label=f"piece {i} answered"):
                done = data.draw(st.integers(0, count), label=f"piece {i} done")
                answer = rendered_answer(200, 50, strength, prompts, start, count, done)
                parts.append(part_of(f"n{i}", start, count, answer, allow_short=True))
        if not parts:
            return
        merged = merge_parts(req, Seeds(200, 50), parts, partial=True)
        info = merged.info
        rendered = merged.rendered
        assert len(merged.images) == rendered == sum(part.count for part in parts)
        for i, image in enumerate(merged.images):
            seed, subseed, prompt = (
                info["all_seeds"][i],
                info["all_subseeds"][i],
                info["all_prompts"][i],
            )
            clean = render_image(**image_inputs(seed, subseed, strength, prompt))
            assert pixels(image) == clean.tobytes(), f"image {i} is not seed {seed}'s"
            assert info["infotexts"][i] == f"{prompt}, Seed: {seed}, Variation seed: {subseed}"
            assert info["all_negative_prompts"][i] == f"not {prompt}"
        # Every image of the request keeps its entry: rendered ones first, then the rest, each
        # group in seed order (subseeds count up in both modes, so they name the image).
        seeds, subseeds = seed_lists(200, 50, strength, total)
        ks = [subseeds.index(s) for s in info["all_subseeds"]]
        assert sorted(ks) == list(range(total))
        assert ks[:rendered] == sorted(ks[:rendered])
        assert ks[rendered:] == sorted(ks[rendered:])
        assert info["all_seeds"] == [seeds[k] for k in ks]
        for key in ("all_prompts", "all_negative_prompts"):
            assert len(info[key]) == total
        assert (info["seed"], info["subseed"]) == (info["all_seeds"][0], info["all_subseeds"][0])
        assert merged.shares[-1][2] == rendered - 1 if rendered else merged.shares == []

    @given(total=st.integers(1, 10), data=st.data())
    def test_merge_partial_one_node_is_the_webuis_answer(
        self, total: int, data: st.DataObject
    ) -> None:
        """One node interrupted after k images: its lists come back exactly as it sent them."""
        done = data.draw(st.integers(0, total), label="done")
        prompts = [f"owl {k}" for k in range(total)]
        answer = rendered_answer(7, 3, 0.0, prompts, 0, total, done)
        part = part_of("only", 0, total, answer, allow_short=True)
        req = request(batch_size=1, n_iter=total, seed=7, subseed=3)
        merged = merge_parts(req, Seeds(7, 3), [part], partial=True)
        sent = json.loads(answer["info"])
        for key in (
            "all_seeds",
            "all_subseeds",
            "all_prompts",
            "all_negative_prompts",
            "infotexts",
        ):
            assert merged.info[key] == sent[key]
        assert merged.images == answer["images"]

    def test_merge_partial_issue_example(self) -> None:
        """seed=200, 12 images on two nodes, 0-2 and 6-8 done: seeds 200-202, 206-208 first."""
        prompts = ["cat"] * 12
        parts = [
            part_of("a", 0, 6, rendered_answer(200, 1, 0, prompts, 0, 6, 3), allow_short=True),
            part_of("b", 6, 6, rendered_answer(200, 1, 0, prompts, 6, 6, 3), allow_short=True),
        ]
        req = request(batch_size=1, n_iter=12, seed=200)
        merged = merge_parts(req, Seeds(200, 1), parts, partial=True)
        seeds = [200, 201, 202, 206, 207, 208, 203, 204, 205, 209, 210, 211]
        assert merged.info["all_seeds"] == seeds
        assert [t.split("Seed: ")[1].split(",")[0] for t in merged.info["infotexts"]] == [
            str(s) for s in seeds[:6]
        ]
        assert merged.shares == [("a", 0, 2), ("b", 3, 5)]


class TestShares:
    """Merged.shares names one range per node run, over the response's image positions."""

    def test_shares_merge_a_nodes_adjacent_requests(self) -> None:
        """A node's range sent as full batches plus a rest (0-3, 4-4) is one share, 0-4."""
        full = single_node_info(7, 1, 1, 0)
        parts = [
            part_of(node, start, count, node_answer(full, start, count, False))
            for node, start, count in [("fast", 0, 4), ("fast", 4, 1), ("slow", 5, 2)]
        ]
        merged = merge_parts(request(batch_size=7), Seeds(1, 1), parts)
        assert merged.shares == [("fast", 0, 4), ("slow", 5, 6)]
