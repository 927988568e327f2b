"""POST /sdapi/v1/txt2img and img2img: parse, check images, run on the cluster, answer."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

from sdproxy.config import ServerSettings
from sdproxy.core import images
from sdproxy.core.request import (
    GenerationRequest,
    InputLimits,
    Kind,
    decodable_images,
    parse_generation,
)
from sdproxy.errors import RequestValidationError, validation_error
from sdproxy.server.accesslog import Outcome, outcome_key
from sdproxy.server.bodies import read_json
from sdproxy.server.keys import autosave_key, cluster_key, image_gate_key, settings_key

SHARES_HEADER = "X-Sdproxy-Shares"
WARNING_HEADER = "X-Sdproxy-Warning"


def format_shares(shares: list[tuple[str, int, int]]) -> str:
    """``gpu-a:0-3,gpu-b:4-5``: which node rendered which images (indices into ``images``,
    grid excluded, inclusive), one entry per node range; a script request names its node."""
    return ",".join(f"{node}:{first}-{last}" for node, first, last in shares)


def input_limits(server: ServerSettings) -> InputLimits:
    return InputLimits(
        max_width=server.max_width,
        max_height=server.max_height,
        max_steps=server.max_steps,
        allow_image_urls=server.allow_image_urls,
    )


# Decoding at least this many pixels leaves enough in a thread's malloc arena to hand back.
_TRIM_AFTER_PIXELS = 4_000_000


async def check_images(
    request: GenerationRequest, server: ServerSettings, gate: asyncio.Semaphore
) -> None:
    """422 naming every init image or mask that does not decode, before any node sees it.

    Sizes are read from the headers first: an image over ``max_input_megapixels``, or one that
    takes the request's total over ``max_request_megapixels``, is refused before a pixel is
    decoded. Decoding runs in a thread, at most ``image_decode_threads`` at once across all
    requests, and hands the memory back when done.
    """
    found = decodable_images(request)
    if not found:
        return
    max_pixels = int(server.max_input_megapixels * 1e6)
    budget = int(server.max_request_megapixels * 1e6)

    def check_all() -> list[dict[str, Any]]:
        errors: list[dict[str, Any]] = []
        readable: list[tuple[list[str | int], images.ImageHeader]] = []
        total = 0
        for loc, data in found:
            header = images.image_header(data, max_pixels)
            if isinstance(header, str):
                errors.append(validation_error(loc, header, "value_error.image"))
                continue
            total += header.pixels
            if total > budget:
                message = (
                    f"the request's images reach {total / 1e6:.1f} megapixels here, "
                    f"more than {server.max_request_megapixels:g}"
                )
                return [*errors, validation_error(loc, message, "value_error.image.total")]
            readable.append((loc, header))
        try:
            for loc, header in readable:
                reason = images.check_decodes(header.raw)
                if reason is not None:
                    errors.append(validation_error(loc, reason, "value_error.image"))
        finally:
            if total >= _TRIM_AFTER_PIXELS:
                images.release_memory()
        order = {str(loc): index for index, (loc, _) in enumerate(found)}
        return sorted(errors, key=lambda error: order[str(error["loc"])])  # as sent

    async with gate:
        errors = await asyncio.to_thread(check_all)
    if errors:
        raise RequestValidationError(errors)


async def _generate(request: web.Request, kind: Kind) -> web.Response:
    server = request.app[settings_key].server
    body = await read_json(request)
    generation = parse_generation(
        kind, body, max_images=server.max_images_per_request, limits=input_limits(server)
    )
    await check_images(generation, server, request.app[image_gate_key])
    result = await request.app[cluster_key].generate(generation)
    headers = {SHARES_HEADER: format_shares(result.shares)} if result.shares else {}
    if result.warnings:  # fixed texts of sdproxy's own, never client input
        headers[WARNING_HEADER] = "; ".join(result.warnings)
    # Tens of MB of base64 for a large batch: encode it off the event loop.
    encoded = await asyncio.to_thread(orjson.dumps, result.body)
    response = web.Response(body=encoded, headers=headers, content_type="application/json")
    request[outcome_key] = Outcome(generation.total_images, result.shares)
    if autosave_key in request.app:
        request.app[autosave_key].submit(result.body, result.shares)
    return response


async def txt2img(request: web.Request) -> web.Response:
    """POST /sdapi/v1/txt2img, split over the healthy nodes and merged."""
    return await _generate(request, "txt2img")


async def img2img(request: web.Request) -> web.Response:
    """POST /sdapi/v1/img2img, split over the healthy nodes and merged."""
    return await _generate(request, "img2img")
