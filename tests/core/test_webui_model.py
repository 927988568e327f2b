"""Tests for the webui's request-model table and its pydantic-1 coercion, shared with the fake."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdproxy.core import webui_model
from sdproxy.core.request import parse_generation
from sdproxy.core.webui_model import (
    IMG2IMG_FIELDS,
    TXT2IMG_FIELDS,
    InvalidValue,
    coerce,
    read_model,
    validate_model,
)
from sdproxy.errors import NotFound, RequestValidationError
from sdproxy.fakewebui import model as fake_model


class TestCoerce:
    """coerce() is pydantic 1.10's validators, quirks included."""

    @pytest.mark.parametrize(
        ("kind", "sent", "expected"),
        [
            ("int", "12", 12),
            ("int", " 12 ", 12),
            ("int", 2.7, 2),
            ("int", True, 1),
            ("int", 1e20, 100000000000000000000),
            ("float", "7.5", 7.5),
            ("float", 7, 7.0),
            ("float", "inf", float("inf")),
            ("str", 123, "123"),
            ("str", True, "True"),
            ("bool", "YES", True),
            ("bool", 1.0, True),
            ("bool", "off", False),
            ("list", (1, 2), [1, 2]),
            ("list_str", ["a", 1], ["a", "1"]),
            ("dict", [], {}),
            ("dict", "", {}),
            ("dict", [["a", 1]], {"a": 1}),
        ],
    )
    def test_coerce_accepts_like_pydantic_one(self, kind: str, sent: Any, expected: Any) -> None:
        """Values pydantic 1 accepts come out as it would convert them."""
        value = coerce(kind, sent)
        assert value == expected
        assert type(value) is type(expected)

    @pytest.mark.parametrize(
        ("kind", "sent"),
        [
            ("int", "1.5"),
            ("int", ""),
            ("int", float("inf")),
            ("int", "1" * 4301),  # pydantic refuses long digit strings before int()
            ("int", [1]),
            ("float", "x"),
            ("float", None),
            ("str", ["a"]),
            ("bool", " yes"),  # no stripping
            ("bool", 2),
            ("bool", [1]),
            ("list", "ab"),
            ("dict", "ab"),
            ("dict", 3),
        ],
    )
    def test_coerce_rejects_like_pydantic_one(self, kind: str, sent: Any) -> None:
        """Values pydantic 1 refuses raise InvalidValue naming the type."""
        with pytest.raises(InvalidValue) as caught:
            coerce(kind, sent)
        assert caught.value.kind == ("list" if kind == "list" else kind)


class TestReadModel:
    """read_model() collects one error per field in schema order, as FastAPI reports them."""

    def test_errors_come_in_schema_order(self) -> None:
        """width is before steps... in the body, but the model orders steps first."""
        with pytest.raises(RequestValidationError) as caught:
            validate_model(TXT2IMG_FIELDS, {"width": "x", "steps": "y", "prompt": []})
        assert [e["loc"][1] for e in caught.value.errors] == ["prompt", "steps", "width"]

    def test_defaults_are_copies(self) -> None:
        """A mutable default (script_args []) is a fresh copy on every read."""
        first = read_model(TXT2IMG_FIELDS, {}).values["script_args"]
        first.append(1)
        assert read_model(TXT2IMG_FIELDS, {}).values["script_args"] == []

    def test_one_error_per_field(self) -> None:
        """A second failure of the same field is not reported: pydantic stops at the first."""
        read = read_model(TXT2IMG_FIELDS, {"seed": "x"})
        read.fail("seed", webui_model.none_not_allowed(["body", "seed"]))
        assert read.sorted_errors() == [
            {
                "loc": ["body", "seed"],
                "msg": "value is not a valid integer",
                "type": "type_error.integer",
            }
        ]

    def test_fake_webui_uses_the_same_table(self) -> None:
        """The fake node validates with sdproxy's own table and emitter: they cannot drift."""
        assert fake_model.TXT2IMG_FIELDS is TXT2IMG_FIELDS
        assert fake_model.IMG2IMG_FIELDS is IMG2IMG_FIELDS
        assert fake_model.RequestValidationError is RequestValidationError


values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**65), 2**65),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=6),
    st.sampled_from(["1", "yes", "2.5", "-1"]),
    st.lists(st.integers(0, 3), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


class TestProxyAgreesWithModel:
    """Whatever the webui's model refuses, sdproxy refuses with the same item."""

    @settings(max_examples=300, deadline=None)
    @given(
        kind=st.sampled_from(["txt2img", "img2img"]),
        body=st.dictionaries(
            st.sampled_from([spec.name for spec in TXT2IMG_FIELDS + IMG2IMG_FIELDS]),
            values,
            max_size=4,
        ),
    )
    def test_model_errors_are_proxy_errors(self, kind: str, body: dict[str, Any]) -> None:
        """Every item of the model's 422 is among sdproxy's; sdproxy may refuse more."""
        fields = TXT2IMG_FIELDS if kind == "txt2img" else IMG2IMG_FIELDS
        try:
            validate_model(fields, body)
        except RequestValidationError as exc:
            model_errors = exc.errors
        else:
            model_errors = []
        try:
            parse_generation(kind, body, max_images=10**6)  # type: ignore[arg-type]
        except RequestValidationError as exc:
            proxy_errors = exc.errors
        except NotFound:  # img2img without init_images: the 404 comes after the model passed
            proxy_errors = []
            assert model_errors == []
        else:
            proxy_errors = []
        for item in model_errors:
            assert item in proxy_errors
