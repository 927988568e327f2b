"""Tests for request validation, seed resolution and node bodies."""

from __future__ import annotations

import random
from typing import Any

import pytest

from sdproxy.core.request import Seeds, node_body, parse_generation, resolve_seeds
from sdproxy.errors import NotFound, RequestValidationError


def parse(body: Any, kind: str = "txt2img", max_images: int = 100) -> Any:
    return parse_generation(kind, body, max_images=max_images)  # type: ignore[arg-type]


class TestParseGeneration:
    """parse_generation reads what sdproxy relies on, as the webui's models coerce it."""

    def test_parse_defaults(self) -> None:
        """An empty body gets the webui's API defaults."""
        req = parse({})
        assert (req.batch_size, req.n_iter, req.seed, req.subseed) == (1, 1, None, None)
        assert (req.steps, req.width, req.height) == (50, 512, 512)
        assert req.send_images is True
        assert req.save_images is False
        assert req.splittable

    def test_parse_coerces_like_pydantic_one(self) -> None:
        """Numeric strings and floats become ints, "yes" a bool."""
        req = parse({"seed": "12", "batch_size": 2.7, "save_images": "yes", "n_iter": "3"})
        assert (req.seed, req.batch_size, req.save_images, req.n_iter) == (12, 2, True, 3)
        assert req.echo == {"batch_size": 2, "n_iter": 3, "seed": 12, "subseed": -1}

    @pytest.mark.parametrize(
        ("body", "loc", "type_"),
        [
            ({"seed": "abc"}, ["body", "seed"], "type_error.integer"),
            ({"batch_size": 0}, ["body", "batch_size"], "value_error.number.not_ge"),
            ({"n_iter": -2}, ["body", "n_iter"], "value_error.number.not_ge"),
            ({"subseed_strength": "x"}, ["body", "subseed_strength"], "type_error.float"),
            ({"prompt": ["a", "b"]}, ["body", "prompt"], "type_error.str"),
            ({"send_images": None}, ["body", "send_images"], "type_error.none.not_allowed"),
            ({"batch_size": 20, "n_iter": 10}, ["body", "batch_size"], "value_error.number.not_le"),
            ([1, 2], ["body"], "type_error.dict"),
        ],
    )
    def test_parse_rejects_bad_fields(self, body: Any, loc: list[Any], type_: str) -> None:
        """Each bad field gives a 422 item naming it, in pydantic 1's vocabulary."""
        with pytest.raises(RequestValidationError) as caught:
            parse(body)
        assert caught.value.status == 422
        assert {"loc": loc, "type": type_}.items() <= caught.value.errors[0].items()

    def test_parse_collects_every_error(self) -> None:
        """Two bad fields give two items, like FastAPI."""
        with pytest.raises(RequestValidationError) as caught:
            parse({"seed": "x", "steps": "y"})
        assert [e["loc"][1] for e in caught.value.errors] == ["seed", "steps"]

    def test_parse_img2img_without_init_images_is_404(self) -> None:
        """The webui answers a missing init_images with 404 "Init image not found"."""
        with pytest.raises(NotFound, match="Init image not found"):
            parse({"prompt": "x"}, kind="img2img")

    def test_parse_img2img_more_init_images_than_batch(self) -> None:
        """More init images than batch_size is the client's mistake: 422, not the webui's 500."""
        with pytest.raises(RequestValidationError, match="bad number of images"):
            parse({"init_images": ["a", "b", "c"], "batch_size": 2}, kind="img2img")

    def test_parse_img2img_two_init_images_split_by_iteration(self) -> None:
        """With 2+ init images the webui's batch is their count: units are whole batches."""
        req = parse({"init_images": ["a", "b"], "batch_size": 3, "n_iter": 4}, kind="img2img")
        assert req.split_by_iteration
        assert (req.units, req.unit_size, req.total_images, req.reported_total) == (4, 2, 8, 12)

    def test_parse_script_requests_are_not_split(self) -> None:
        """A selectable script makes its own grids: the request goes whole to one node."""
        assert not parse({"script_name": "x/y/z plot"}).splittable


class TestSeeds:
    """Seeds are resolved once and offset per node like one webui's all_seeds."""

    def test_resolve_seeds_keeps_given_values(self) -> None:
        """Given seeds are used as they are."""
        assert resolve_seeds(parse({"seed": 5, "subseed": 9}), random.Random(0)) == Seeds(5, 9)

    def test_resolve_seeds_draws_minus_one_in_webui_range(self) -> None:
        """-1 draws from the webui's range, and the draw depends only on the rng."""
        seeds = resolve_seeds(parse({}), random.Random(1))
        again = resolve_seeds(parse({"seed": None}), random.Random(1))
        assert seeds == again
        assert 0 <= seeds.seed < 4294967294

    def test_node_body_offsets_seed(self) -> None:
        """Without variation the seed and subseed move with the first image."""
        body = node_body(parse({"prompt": "p", "x": 1}), Seeds(100, 7), 5, 2, 3)
        assert body == {
            "prompt": "p",
            "x": 1,
            "batch_size": 2,
            "n_iter": 3,
            "seed": 105,
            "subseed": 12,
        }

    def test_node_body_offsets_only_subseed_with_strength(self) -> None:
        """With a subseed strength every image shares the seed; only the subseed moves."""
        body = node_body(parse({"subseed_strength": 0.3}), Seeds(100, 7), 5, 1, 1)
        assert (body["seed"], body["subseed"]) == (100, 12)
