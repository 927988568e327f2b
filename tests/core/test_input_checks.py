"""Pure input checks: configured bounds, image URLs refused, images that do not decode."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from typing import Any

import pytest
from PIL import Image

from sdproxy.core.images import check_b64_image
from sdproxy.core.imageurls import image_url_errors
from sdproxy.core.request import InputLimits, decodable_images, parse_generation
from sdproxy.errors import RequestValidationError

LIMITS = InputLimits(max_width=1024, max_height=768, max_steps=150)


def parse(body: Any, kind: str = "txt2img", limits: InputLimits = LIMITS) -> Any:
    return parse_generation(kind, body, max_images=100, limits=limits)  # type: ignore[arg-type]


def errors_of(body: Any, kind: str = "txt2img", limits: InputLimits = LIMITS) -> list[Any]:
    with pytest.raises(RequestValidationError) as caught:
        parse(body, kind, limits)
    return caught.value.errors


def png_bytes(size: tuple[int, int] = (8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb)."""
    raw = png_bytes((1, 1))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + header
    ihdr = struct.pack(">I", len(header)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return raw[:8] + ihdr + raw[8 + 25 :]


class TestBounds:
    """Width, height and steps beyond the configured bounds are 422 items naming the field."""

    @pytest.mark.parametrize(
        ("body", "field", "limit"),
        [
            ({"width": 1025}, "width", 1024),
            ({"height": "769"}, "height", 768),
            ({"steps": 151}, "steps", 150),
            ({"hr_resize_x": 5000}, "hr_resize_x", 1024),
            ({"hr_second_pass_steps": 1000}, "hr_second_pass_steps", 150),
        ],
    )
    def test_beyond_bound_is_422(self, body: dict[str, Any], field: str, limit: int) -> None:
        """pydantic 1's not_le item, with the limit in its context."""
        (error,) = errors_of(body)
        assert error == {
            "loc": ["body", field],
            "msg": f"ensure this value is less than or equal to {limit}",
            "type": "value_error.number.not_le",
            "ctx": {"limit_value": limit},
        }

    def test_hires_target_within_bounds(self) -> None:
        """With enable_hr, width x hr_scale must fit too; hr_resize_* replace the scale."""
        (error,) = errors_of({"enable_hr": True, "width": 512, "height": 512, "hr_scale": 2})
        assert error["loc"] == ["body", "hr_scale"]
        assert error["ctx"] == {"limit_value": 1.5}
        parse({"enable_hr": True, "width": 512, "height": 512, "hr_scale": 1.5})
        parse({"enable_hr": False, "width": 512, "height": 512, "hr_scale": 100})
        parse({"enable_hr": "yes", "width": 512, "height": 512, "hr_scale": 9, "hr_resize_x": 700})

    def test_at_bound_is_accepted(self) -> None:
        """The bound itself is allowed."""
        req = parse({"width": 1024, "height": 768, "steps": 150})
        assert (req.width, req.height, req.steps) == (1024, 768, 150)

    def test_defaults_count_against_bounds(self) -> None:
        """An unsent width is the webui's 512, which a smaller bound refuses."""
        limits = InputLimits(max_width=256, max_height=256)
        assert {e["loc"][1] for e in errors_of({}, limits=limits)} == {"width", "height"}

    def test_non_string_mask_and_prompt(self) -> None:
        """A prompt or mask that is a list or a dict is a type error naming the field."""
        errors = errors_of({"prompt": {"a": 1}, "mask": [1], "init_images": ["x"]}, "img2img")
        assert [e["loc"] for e in errors] == [["body", "prompt"], ["body", "mask"]]


class TestImageUrls:
    """No field may make a node fetch a URL, unless allow_image_urls says so."""

    def test_urls_in_image_fields_and_scripts_are_refused(self) -> None:
        """init_images, mask and any string nested in alwayson_scripts or script_args."""
        body = {
            "init_images": ["aGk=", "https://example.com/a.png"],
            "mask": " HTTP://10.0.0.1/m.png",
            "alwayson_scripts": {
                "ControlNet": {"args": [{"image": {"image": "http://169.254.169.254/x"}}]},
                "reactor": {"args": ["https://x/face.png", True]},
            },
            "script_args": [1, ["http://x"]],
            "prompt": "http://not-an-image-field",
        }
        locs = [e["loc"] for e in errors_of(body, "img2img")]
        assert sorted(map(str, locs)) == sorted(
            map(
                str,
                [
                    ["body", "init_images", 1],
                    ["body", "mask"],
                    ["body", "alwayson_scripts", "ControlNet", "args", 0, "image", "image"],
                    ["body", "alwayson_scripts", "reactor", "args", 0],
                    ["body", "script_args", 1, 0],
                ],
            )
        )

    def test_allow_image_urls(self) -> None:
        """With allow_image_urls the URLs pass, and are not decoded by sdproxy."""
        limits = InputLimits(allow_image_urls=True)
        req = parse({"init_images": ["https://x/a.png"], "mask": "aGk="}, "img2img", limits)
        assert decodable_images(req) == [(["body", "mask"], "aGk=")]

    def test_deep_nesting_does_not_recurse(self) -> None:
        """A script argument nested thousands deep is walked without a RecursionError."""
        nested: Any = "http://deep"
        for _ in range(5000):
            nested = [nested]
        (error,) = image_url_errors({"alwayson_scripts": {"x": nested}})
        assert len(error["loc"]) == 3 + 5000


class TestCheckImage:
    """check_b64_image says why data is no usable image, without decoding a bomb."""

    def test_valid_png_and_data_uri(self) -> None:
        """Raw base64 and a data URI of a real PNG pass."""
        data = b64(png_bytes())
        assert check_b64_image(data, 10**6) is None
        assert check_b64_image("data:image/png;base64," + data, 10**6) is None

    @pytest.mark.parametrize(
        ("data", "reason"),
        [
            ("abc", "not valid base64"),
            (b64(b"plain text, not an image"), "not an image"),
            (b64(png_bytes((64, 64))[:-40]), "corrupt or truncated"),
            (b64(png_claiming(5000, 5000)), "5000x5000, more than 1 megapixels"),
            (b64(png_claiming(10000, 10000)), "more than 1 megapixels"),
            (b64(png_claiming(60000, 60000)), "more than 1 megapixels"),
        ],
    )
    def test_bad_images(self, data: str, reason: str) -> None:
        """Garbage, truncation and oversized headers each get a reason."""
        result = check_b64_image(data, 10**6)
        assert result is not None
        assert reason in result

    def test_decodable_images_of_img2img(self) -> None:
        """Every init image and the mask (numbers coerced to text, as the webui does)."""
        req = parse({"init_images": ["a", "b"], "mask": 12, "batch_size": 2}, "img2img")
        assert decodable_images(req) == [
            (["body", "init_images", 0], "a"),
            (["body", "init_images", 1], "b"),
            (["body", "mask"], "12"),
        ]
