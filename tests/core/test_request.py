"""Tests for request validation, seed resolution and node bodies."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

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


SEED_MAX = 2**64 - 1


def errors_of(body: Any, kind: str = "txt2img") -> list[dict[str, Any]]:
    with pytest.raises(RequestValidationError) as caught:
        parse(body, kind)
    return caught.value.errors


class TestNullWhereNeeded:
    """null where the webui's processing needs a value is a 422, not a 500 on every node."""

    @pytest.mark.parametrize(
        "field",
        [
            "height",
            "width",
            "steps",
            "batch_size",
            "n_iter",
            "cfg_scale",
            "prompt",
            "subseed_strength",
            "seed_resize_from_w",
            "firstphase_width",
        ],
    )
    def test_null_needed_field_is_422(self, field: str) -> None:
        """The model takes null (every field is Optional), processing raises: refuse it here."""
        (error,) = errors_of({field: None})
        assert error == {
            "loc": ["body", field],
            "msg": "none is not an allowed value",
            "type": "type_error.none.not_allowed",
        }

    def test_null_height_is_the_fuzz_case(self) -> None:
        """test_fuzz's hypothesis seed 6: a null height, which nodes answer 500 TypeError."""
        body = {"prompt": "x", "width": 64, "height": None, "steps": 20, "init_images": ["x"]}
        assert [e["loc"] for e in errors_of(body)] == [["body", "height"]]

    @pytest.mark.parametrize("field", ["hr_scale", "hr_resize_x", "hr_resize_y"])
    def test_null_hires_field_only_matters_with_hires(self, field: str) -> None:
        """calculate_target_resolution runs only with enable_hr."""
        parse({field: None})
        (error,) = errors_of({field: None, "enable_hr": True, **SMALL_HR})
        assert error["loc"] == ["body", field]

    @pytest.mark.parametrize("field", ["seed", "subseed", "enable_hr", "sampler_name"])
    def test_null_optional_field_means_default(self, field: str) -> None:
        """null seeds are random, a null enable_hr is off: processing handles these."""
        parse({field: None})


SMALL_HR = {"width": 64, "height": 64, "steps": 20}


class TestSeedRange:
    """Seeds and subseeds must stay in torch's generator range once each image's offset is added."""

    @pytest.mark.parametrize(
        ("body", "field", "limit"),
        [
            ({"seed": SEED_MAX, "batch_size": 2}, "seed", SEED_MAX - 1),
            ({"seed": SEED_MAX - 2, "n_iter": 2, "batch_size": 2}, "seed", SEED_MAX - 3),
            ({"seed": 1e20}, "seed", SEED_MAX),
            ({"subseed": 2**64}, "subseed", SEED_MAX),
            ({"subseed": float(2**64)}, "subseed", SEED_MAX),  # what orjson makes of 2**64
            (
                {"subseed": SEED_MAX, "batch_size": 3, "subseed_strength": 0.5},
                "subseed",
                SEED_MAX - 2,
            ),
        ],
    )
    def test_overflowing_seed_is_422(self, body: dict[str, Any], field: str, limit: int) -> None:
        """pydantic 1's not_le item, naming the field, with the largest seed that fits."""
        (error,) = errors_of(body)
        assert error["loc"] == ["body", field]
        assert error["type"] == "value_error.number.not_le"
        assert error["ctx"] == {"limit_value": limit}

    def test_seed_below_range_is_422(self) -> None:
        """Below -2**63 torch refuses the seed too."""
        (error,) = errors_of({"seed": -(2**63) - 1})
        assert (error["loc"], error["type"]) == (["body", "seed"], "value_error.number.not_ge")

    def test_largest_seeds_are_accepted(self) -> None:
        """The last image may use 2**64 - 1; with variation the seed itself is not offset."""
        assert parse({"seed": SEED_MAX - 1, "batch_size": 2}).seed == SEED_MAX - 1
        req = parse({"seed": SEED_MAX, "subseed": 5, "batch_size": 4, "subseed_strength": 0.2})
        assert req.seed == SEED_MAX

    @pytest.mark.parametrize(("seed", "images"), [(-2, 2), (-4, 4), (-3, 4)])
    def test_seed_reaching_minus_one_is_422(self, seed: int, images: int) -> None:
        """A share starting at the image whose seed is -1 would be random on its node."""
        (error,) = errors_of({"seed": seed, "batch_size": images})
        assert error["type"] == "value_error.seed.random"

    def test_negative_seeds_clear_of_minus_one_are_accepted(self) -> None:
        """-5 with 4 images runs -5..-2: every seed is a real one, as on one webui."""
        assert parse({"seed": -5, "batch_size": 4}).seed == -5

    @given(
        seed=st.integers(-(2**64), 2**65),
        subseed=st.integers(-(2**64), 2**65),
        strength=st.sampled_from([0, 0.5]),
        batch=st.integers(1, 8),
        n_iter=st.integers(1, 4),
    )
    def test_accepted_seeds_fit_every_share(
        self, seed: int, subseed: int, strength: float, batch: int, n_iter: int
    ) -> None:
        """Whatever is accepted gives every share seeds in torch's range and none of -1."""
        body = {"seed": seed, "subseed": subseed, "subseed_strength": strength}
        try:
            req = parse({**body, "batch_size": batch, "n_iter": n_iter})
        except RequestValidationError:
            return
        seeds = resolve_seeds(req, random.Random(0))
        for first in range(batch * n_iter):
            share = node_body(req, seeds, first, 1, 1)
            for key in ("seed", "subseed"):
                assert -(2**63) <= share[key] <= SEED_MAX
                assert share[key] != -1 or body[key] == -1
