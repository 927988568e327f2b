"""Pillow and base64 work. CPU-bound: callers in the event loop use asyncio.to_thread."""

from __future__ import annotations

import base64
import binascii
import ctypes
import ctypes.util
import functools
import io
import math
from collections.abc import Callable
from dataclasses import dataclass

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


def check_b64_image(data: str, max_pixels: int) -> str | None:
    """Why ``data`` (raw base64 or a data URI) is not an image a node can use; None if it is.

    The size is read from the header and checked before any pixel is decoded, so a small
    file that would expand to gigabytes is refused without being expanded.
    """
    found = image_header(data, max_pixels)
    return found if isinstance(found, str) else check_decodes(found.raw)


@dataclass(frozen=True)
class ImageHeader:
    """An encoded image whose header was read: its bytes and its size, nothing decoded yet."""

    raw: bytes
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def image_header(data: str, max_pixels: int) -> ImageHeader | str:
    """The image's size from its header (no pixel decoded), or why it is no usable image."""
    if data.startswith("data:"):
        _, _, data = data.partition(",")
    try:
        raw = base64.b64decode(data)
    except (binascii.Error, ValueError):
        return "not valid base64"
    try:
        with Image.open(io.BytesIO(raw)) as image:
            width, height = image.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return f"image is more than {max_pixels / 1e6:g} megapixels"
    except UnidentifiedImageError:
        return "not an image in a format Pillow reads"
    except Exception:  # Pillow's header parsers raise many kinds on corrupt data
        return "the image data is corrupt or truncated"
    if width * height > max_pixels:
        return f"image is {width}x{height}, more than {max_pixels / 1e6:g} megapixels"
    return ImageHeader(raw, width, height)


def check_decodes(raw: bytes) -> str | None:
    """Decode every pixel once (then drop them); why it fails, or None."""
    try:
        with Image.open(io.BytesIO(raw)) as image:
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return "image is too large to decode"
    except Exception:  # Pillow's decoders raise many kinds on corrupt data
        return "the image data is corrupt or truncated"
    return None


def release_memory() -> None:
    """Hand freed heap memory back to the system (glibc's malloc_trim; a no-op elsewhere).

    Decoding a large image in a worker thread leaves that thread's malloc arena holding the
    freed pixels: without this, a few requests of large init images keep hundreds of MB.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        trim: Callable[[int], int] = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    return trim


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
