"""Pillow and base64 work. CPU-bound: callers in the event loop use asyncio.to_thread."""

from __future__ import annotations

import base64
import binascii
import io
import math

from PIL import Image, PngImagePlugin, UnidentifiedImageError


class BadImage(ValueError):
    """Data that should be an encoded image is not one."""


def decode_b64_image(data: str) -> Image.Image:
    """Open raw base64 or a ``data:image/...;base64,`` URI as an image (fully loaded)."""
    if data.startswith("data:"):
        _, _, data = data.partition(",")
    try:
        raw = base64.b64decode(data, validate=False)
        image = Image.open(io.BytesIO(raw))
        image.load()
    except (binascii.Error, UnidentifiedImageError, OSError, ValueError) as exc:
        raise BadImage("not a base64-encoded image") from exc
    return image


def encode_png(image: Image.Image, infotext: str | None) -> str:
    """Encode ``image`` as base64 PNG, with the webui's ``parameters`` text chunk."""
    return base64.b64encode(png_bytes(image, infotext)).decode("ascii")


def png_bytes(image: Image.Image, infotext: str | None) -> bytes:
    """``image`` as PNG file bytes, with the webui's ``parameters`` text chunk."""
    info = PngImagePlugin.PngInfo()
    if infotext is not None:
        info.add_text("parameters", infotext)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def grid_shape(count: int) -> tuple[int, int]:
    """(rows, cols) of the webui's ``image_grid`` with default options (``n_rows = -1``)."""
    rows = max(1, min(count, round(math.sqrt(count))))
    return rows, math.ceil(count / rows)


def build_grid(images_b64: list[str], infotext: str | None) -> str:
    """One grid image of ``images_b64`` laid out like the webui's, as base64 PNG."""
    images = [decode_b64_image(data) for data in images_b64]
    rows, cols = grid_shape(len(images))
    width, height = images[0].size
    grid = Image.new("RGB", (cols * width, rows * height), color="black")
    for index, image in enumerate(images):
        grid.paste(image, box=(index % cols * width, index // cols * height))
    return encode_png(grid, infotext)
