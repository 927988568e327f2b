"""The fake webui's pixels: deterministic images, PNG encoding and decoding.

A picture is a few rectangles on a background, all drawn from a digest of the image's own
inputs. A realistic one adds seeded grain that PNG cannot compress away, so its PNG is about as
large as a webui's (about 400 KB at 512x512, 1.6 MB at 1024x1024) and as slow to encode.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import math
from collections.abc import Sequence

from PIL import Image, ImageChops, ImageDraw, PngImagePlugin

from sdproxy.fakewebui.model import WebuiError


def render_image(
    *,
    seed: int,
    subseed: int,
    subseed_strength: float,
    prompt: str,
    width: int,
    height: int,
    init_image_digest: bytes | None,
    realistic: bool = False,
) -> Image.Image:
    """A picture determined by the image's own inputs only, never by its batch position."""
    key = json.dumps(
        [
            seed,
            subseed if subseed_strength != 0 else None,
            float(subseed_strength),
            prompt,
            width,
            height,
            init_image_digest.hex() if init_image_digest is not None else None,
        ]
    )
    digest = hashlib.blake2b(key.encode(), digest_size=32).digest()
    image = Image.new("RGB", (width, height), (digest[0], digest[1], digest[2]))
    draw = ImageDraw.Draw(image)
    for offset in range(3, 31, 7):
        x0, y0, w, h, r, g, b = digest[offset : offset + 7]
        left, top = x0 * width // 256, y0 * height // 256
        draw.rectangle(
            (left, top, left + w * width // 400, top + h * height // 400), fill=(r, g, b)
        )
    if realistic:
        image = ImageChops.add_modulo(image, _grain(digest, width, height))
    return image


# Seven levels of grain per channel (2.8 bits): PNG then keeps about as many bytes as a
# webui's PNGs of the same size have (measured: 418 KB at 512x512, 1.67 MB at 1024x1024).
_GRAIN_LEVELS = bytes((value * 7) >> 8 for value in range(256))


def _grain(digest: bytes, width: int, height: int) -> Image.Image:
    """Seeded noise: SHAKE-256 of the image's digest, the same on every Python version."""
    noise = hashlib.shake_256(digest + b"grain").digest(width * height * 3)
    return Image.frombytes("RGB", (width, height), noise.translate(_GRAIN_LEVELS))


def encode_png(image: Image.Image, infotext_: str | None) -> bytes:
    """PNG bytes with the webui's tEXt ``parameters`` chunk."""
    metadata = None
    if infotext_ is not None:
        metadata = PngImagePlugin.PngInfo()
        metadata.add_text("parameters", infotext_)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=metadata, compress_level=1)
    return buffer.getvalue()


def render_png(
    *,
    seed: int,
    subseed: int,
    subseed_strength: float,
    prompt: str,
    width: int,
    height: int,
    init_image_digest: bytes | None,
    infotext: str,
    realistic: bool = False,
) -> bytes:
    """One generated image as PNG bytes carrying its infotext."""
    image = render_image(
        seed=seed,
        subseed=subseed,
        subseed_strength=subseed_strength,
        prompt=prompt,
        width=width,
        height=height,
        init_image_digest=init_image_digest,
        realistic=realistic,
    )
    return encode_png(image, infotext)


def image_grid(images: Sequence[Image.Image]) -> Image.Image:
    """images.image_grid with the default n_rows=-1: round(sqrt(n)) rows."""
    rows = min(max(round(math.sqrt(len(images))), 1), len(images))
    cols = math.ceil(len(images) / rows)
    width, height = images[0].size
    grid = Image.new("RGB", (cols * width, rows * height), "black")
    for index, image in enumerate(images):
        grid.paste(image, (index % cols * width, index // cols * height))
    return grid


def decode_image(encoding: object) -> Image.Image:
    """api.decode_base64_to_image for raw base64 or data: URIs (this node fetches no URLs)."""
    if not isinstance(encoding, str):
        name = type(encoding).__name__
        raise WebuiError(
            500, "AttributeError", errors=f"'{name}' object has no attribute 'startswith'"
        )
    if encoding.startswith(("http://", "https://")):
        raise WebuiError.http(500, "Invalid image url")
    if encoding.startswith("data:image/"):
        encoding = encoding.split(";")[1].split(",")[1]
    try:
        image = Image.open(io.BytesIO(base64.b64decode(encoding)))
        image.load()
    except (OSError, ValueError, binascii.Error, Image.DecompressionBombError) as exc:
        raise WebuiError.http(500, "Invalid encoded image") from exc
    return image


def image_digest(image: Image.Image) -> bytes:
    """What an init image contributes to the pixels: its RGB content, not its encoding."""
    rgb = image.convert("RGB")
    return hashlib.sha256(f"{rgb.size}".encode() + rgb.tobytes()).digest()


def b64_png(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
