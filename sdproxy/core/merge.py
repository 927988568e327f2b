"""Pure: many nodes' txt2img/img2img responses -> the one response a single webui would give."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from sdproxy.core.request import GenerationRequest, Seeds

# The per-image lists of info, concatenated in image order across parts.
_PER_IMAGE_LISTS = ("all_prompts", "all_negative_prompts", "all_seeds", "all_subseeds")


@dataclass(frozen=True)
class Part:
    """One node's answer for images ``start .. start + count - 1``, grid removed."""

    node: str
    start: int
    count: int
    images: list[str]  # base64, the rendered images in order
    extra_images: list[str]  # what a node appends after them (Forge: ControlNet maps)
    infotexts: list[str]
    info: dict[str, Any]
    parameters: dict[str, Any]
    grid_returned: bool  # the node put a grid first: grids are on for this cluster

    @property
    def stop(self) -> int:
        return self.start + self.count


@dataclass
class Merged:
    """The merged response before serialization."""

    images: list[str]
    parameters: dict[str, Any]
    info: dict[str, Any]
    grid_wanted: bool
    shares: list[tuple[str, int, int]] = field(default_factory=list)  # (node, first, last)
    rendered: int = 0  # images rendered; extra images (Forge: ControlNet maps) come after them

    def to_json_dict(self) -> dict[str, Any]:
        """The webui's envelope: images, parameters, then info as a JSON string."""
        return {"images": self.images, "parameters": self.parameters, "info": dump_info(self.info)}


def merge_parts(
    request: GenerationRequest, seeds: Seeds, parts: Sequence[Part], *, partial: bool = False
) -> Merged:
    """Merge parts covering every image of ``request`` into one webui response.

    ``parts`` may come in any order; together they must cover the images exactly once. With
    ``partial`` (an interrupted request) they may leave gaps: the response holds every image
    finished, in seed order, while the per-image lists of info keep every entry, as the webui's
    do. Entry i of each list (and of infotexts) describes images[i]: the finished images'
    entries first, then those of the images never rendered. One webui always finishes the
    first k images, so clients zip ``images`` with ``all_seeds``; a split request interrupted
    mid-way has finished several ranges, and this order keeps that pairing right.
    """
    ordered = sorted(parts, key=lambda p: p.start)
    expected = 0
    for part in ordered:
        if part.start < expected or (part.start != expected and not partial):
            raise ValueError(f"parts do not tile the request: gap or overlap at image {expected}")
        expected = part.stop
    if expected != request.total_images and not partial:
        raise ValueError(f"parts cover {expected} images, the request has {request.total_images}")

    first = ordered[0]
    info = dict(first.info)
    order = _rendered_first(ordered, request.reported_total) if partial else None
    for key in _PER_IMAGE_LISTS:
        if key in info:
            if order is not None:
                spread = _spread(key, ordered, request, seeds)
                info[key] = [spread[k] for k in order]
            else:
                info[key] = [value for part in ordered for value in part.info.get(key, [])]
    _pad_to_reported_total(info, request, seeds)
    for scalar, listed in (
        ("prompt", "all_prompts"),
        ("negative_prompt", "all_negative_prompts"),
        ("seed", "all_seeds"),
        ("subseed", "all_subseeds"),
    ):
        if info.get(listed):
            info[scalar] = info[listed][0]
    if "batch_size" in info:
        info["batch_size"] = request.reported_batch_size
    info["index_of_first_image"] = 0
    info["infotexts"] = [text for part in ordered for text in part.infotexts]
    if not info["infotexts"]:  # the webui reports one infotext when no image was finished
        info["infotexts"] = list(first.info.get("infotexts", []))[:1]

    images = [image for part in ordered for image in part.images]
    images += [image for part in ordered for image in part.extra_images]
    # A node with two or more images shows whether grids are on (opts.return_grid); when no
    # node had two, the webui's default (on) applies.
    grids_on = any(p.grid_returned for p in ordered) or all(p.count < 2 for p in ordered)
    rendered = sum(part.count for part in ordered)
    grid_wanted = request.save_images and rendered >= 2 and grids_on
    return Merged(
        images=images,
        parameters=_echo_parameters(first.parameters, request),
        info=info,
        grid_wanted=grid_wanted,
        shares=_shares(ordered),
        rendered=rendered,
    )


def _rendered_first(ordered: Sequence[Part], total: int) -> list[int]:
    """Image indices of an interrupted request: the rendered ones in seed order, then the rest."""
    rendered = [k for part in ordered for k in range(part.start, part.stop) if k < total]
    done = set(rendered)
    return rendered + [k for k in range(total) if k not in done]


def _shares(ordered: Sequence[Part]) -> list[tuple[str, int, int]]:
    """(node, first, last) over the response's images, one entry per run of one node's images.

    Positions in ``images`` (grid excluded), which are the seed indices unless an interrupt
    left gaps. A node whose range went as two requests (full batches, then the rest) is one
    entry.
    """
    shares: list[tuple[str, int, int]] = []
    position = 0
    for part in ordered:
        if not part.count:
            continue
        first, last = position, position + part.count - 1
        if shares and shares[-1][0] == part.node and shares[-1][2] == first - 1:
            first = shares.pop()[1]
        shares.append((part.node, first, last))
        position += part.count
    return shares


def _spread(
    key: str, ordered: Sequence[Part], request: GenerationRequest, seeds: Seeds
) -> list[Any]:
    """A per-image list of every image of an interrupted request, from the parts that came back.

    A node reports the list for every image it was asked for, finished or not; images no node
    reported (their jobs were dropped) get the seeds they would have had, and the first prompt.
    """
    total = request.reported_total
    values: list[Any] = [None] * total
    known = [False] * total
    for part in ordered:
        for offset, value in enumerate(part.info.get(key, [])):
            k = part.start + offset
            if k < total:
                values[k], known[k] = value, True
    fallback = next((v for v, ok in zip(values, known, strict=True) if ok), None)
    step = 1 if request.subseed_strength == 0 else 0
    for k in range(total):
        if known[k]:
            continue
        if key == "all_seeds":
            values[k] = seeds.seed + k * step
        elif key == "all_subseeds":
            values[k] = seeds.subseed + k
        else:
            values[k] = fallback
    return values


def with_grid(merged: Merged, grid: str | None) -> Merged:
    """Put a grid image first, as the webui does with ``return_grid``.

    ``grid`` is None when images are not sent: info still counts the grid, as the webui's does.
    """
    info = dict(merged.info)
    infotexts = list(info.get("infotexts", []))
    info["infotexts"] = infotexts[:1] + infotexts
    info["index_of_first_image"] = 1
    images = [grid, *merged.images] if grid is not None else merged.images
    return replace(merged, images=images, info=info, grid_wanted=False)


def dump_info(info: dict[str, Any]) -> str:
    """Serialize info like the webui's ``Processed.js()``: ASCII, ", " and ": " separators."""
    return json.dumps(info, ensure_ascii=True, default=lambda _: None)


def _pad_to_reported_total(info: dict[str, Any], request: GenerationRequest, seeds: Seeds) -> None:
    """With 2+ init images the webui renders fewer images than its seed lists hold: pad them."""
    total = request.reported_total
    for key in _PER_IMAGE_LISTS:
        values = info.get(key)
        if not isinstance(values, list) or not values or len(values) >= total:
            continue
        if key == "all_seeds":
            step = 1 if request.subseed_strength == 0 else 0
            values.extend(seeds.seed + k * step for k in range(len(values), total))
        elif key == "all_subseeds":
            values.extend(seeds.subseed + k for k in range(len(values), total))
        else:
            values.extend(values[-1:] * (total - len(values)))


def _echo_parameters(node_parameters: dict[str, Any], request: GenerationRequest) -> dict[str, Any]:
    """The node's echo of the request, with the fields sdproxy rewrote put back as sent."""
    parameters = dict(node_parameters)
    for key, value in request.echo.items():
        if key in parameters:
            parameters[key] = value
    return parameters
