"""Pure: a node's answer checked against what it was asked, before anything of it reaches a client.

A node is another program (a webui, a fork, an extension, a proxy in the way), so nothing it
sends is taken on trust. A txt2img/img2img answer for a node body (``asked_of``) is a ``Part``
only if it holds exactly what that body asked for (``read_part``):

- ``images`` are strict base64 (no data: prefix, no whitespace) of PNG, JPEG, WEBP or GIF bytes,
  and none at all when ``send_images`` is off. With ``save_images`` a grid may lead them
  (``index_of_first_image`` 1 and one more infotext, as the webui's ``return_grid``); without
  ``save_images`` a grid is a wrong answer (the API sets ``do_not_save_grid``).
- One infotext per rendered image, exactly as many as asked (after the grid). Images after the
  rendered ones that have no infotext of their own are an extension's (Forge appends
  ``extra_images`` such as ControlNet maps): they are kept apart, and only accepted when the
  request turns an alwayson script on; otherwise they are images nobody asked for. An extra
  image that does have an infotext and a seed (the node rendered one more) is always wrong.
- ``all_seeds`` and ``all_subseeds`` are the seeds of the node body, in order, as integers:
  ``seed + k`` (``seed`` for every image when ``subseed_strength`` is set) and ``subseed + k``.
  ``all_prompts`` and ``all_negative_prompts`` have one prompt (a string, or null) per seed.
  An interrupted answer (``allow_short``) may hold fewer images, but its seed lists must still
  be a prefix of the seeds sent, covering every image it returns.
- ``info`` is a JSON object string nested at most ``MAX_ANSWER_DEPTH`` deep, checked before it
  is parsed (so a deep one never reaches the recursive parser).

A selectable script's answer (X/Y/Z plots; the request is not split) has its own images and
seeds: ``check_script_answer`` checks only the envelope, the images and the info.

Which error statuses are the webui's own (``is_webui_error``) is here too: see errors.py for
whose fault each is.
"""

from __future__ import annotations

import binascii
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

from sdproxy.core.merge import Part
from sdproxy.core.request import GenerationRequest

# How deep a node's JSON (the envelope, or info) may nest. The webui's own answers nest a few
# levels; parameters echo the client's body, which is itself bounded well below this. orjson
# encodes at most 254 levels: anything deeper could not be passed on.
MAX_ANSWER_DEPTH = 128

# Statuses servers and proxies in the way answer, never the webui itself for a request's content.
_NOT_WEBUI_STATUSES = frozenset({407, 408, 413, 421, 429, 431})
_A1111_ERROR_KEYS = frozenset({"error", "detail", "body", "errors"})
_FORGE_ERROR_KEYS = frozenset({"error", "detail", "body", "message"})

_PNG, _JPEG, _GIF = b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", (b"GIF87a", b"GIF89a")

# Bytes an answer may hold beyond its images: info, infotexts and every per-image list.
_INFO_SLACK_BYTES = 4 << 20
_PER_IMAGE_SLACK_BYTES = 64 << 10
# A prompt's character shows up about four times per image (all_prompts, the infotext, the PNG's
# parameters chunk in base64) and takes up to 12 bytes in ASCII-escaped JSON (a surrogate pair).
_BYTES_PER_PROMPT_CHAR = 48

_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # unrolled: linear and fast
_JSON_BRACKET = re.compile(r"[\[\]{}]")


class BadNodeResult(ValueError):
    """A node's response does not hold what it was asked to render."""


@dataclass(frozen=True)
class Asked:
    """What one node body asks for, and so what its answer must hold."""

    count: int  # images to render
    seeds: tuple[int, ...]  # all_seeds the node must report, in order
    subseeds: tuple[int, ...]
    send_images: bool = True
    save_images: bool = False  # a grid may lead the answer
    extensions: bool = False  # an alwayson script is on: its images may follow the rendered ones


def asked_of(request: GenerationRequest, body: dict[str, Any]) -> Asked:
    """What the node body ``body`` (from ``node_body``) asks of a node, seeds resolved."""
    batch_size, n_iter = body["batch_size"], body["n_iter"]
    total = batch_size * n_iter
    seed, subseed = body["seed"], body["subseed"]
    step = 1 if request.subseed_strength == 0 else 0
    return Asked(
        count=total,
        seeds=tuple(seed + k * step for k in range(total)),
        subseeds=tuple(subseed + k for k in range(total)),
        send_images=request.send_images,
        save_images=request.save_images,
        extensions=_uses_extensions(request.body),
    )


@dataclass(frozen=True)
class AnswerBudget:
    """How large a node's answer to a generation may be (see ``answer_budget``)."""

    pixels: int  # pixels of every image the answer may carry (rendered, grid, extensions')
    other_bytes: int  # info, infotexts and per-image lists
    script: bool = False  # a selectable script's answer: no less than the fixed cap

    def limit_bytes(self, body_bytes: int, bytes_per_pixel: float, floor_bytes: int) -> int:
        """The byte limit for an answer to a body of ``body_bytes`` (parameters echo it)."""
        limit = self.other_bytes + body_bytes + int(self.pixels * bytes_per_pixel)
        return max(limit, floor_bytes) if self.script else limit


def answer_budget(request: GenerationRequest, images: int, *, script: bool = False) -> AnswerBudget:
    """The largest answer a webui can give to ``images`` images of ``request``.

    Every image counts at its output size (the hires size with hires fix); with save_images a
    grid (its cells may outnumber the images) and with alwayson scripts their images (ControlNet
    maps) count too. The bytes per pixel are the caller's (a setting).
    """
    per_image = max(request.width * request.height, request.hr_width * request.hr_height)
    counted = images
    if request.save_images:
        counted += 2 * images + 1
    if _uses_extensions(request.body):
        counted += 2 * images + 2
    text = sum(
        len(value)
        for key in ("prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt")
        if isinstance(value := request.body.get(key), str)
    )
    return AnswerBudget(
        pixels=counted * per_image if request.send_images else 0,
        other_bytes=_INFO_SLACK_BYTES
        + images * (_PER_IMAGE_SLACK_BYTES + _BYTES_PER_PROMPT_CHAR * text),
        script=script,
    )


def read_part(
    node: str, start: int, response: Any, asked: Asked, *, allow_short: bool = False
) -> Part:
    """Check one node's answer against ``asked`` and take its grid off.

    With ``allow_short`` (the request was interrupted) fewer images are the ones finished so
    far, as the webui returns them. Raises BadNodeResult saying what is wrong.
    """
    images, parameters, info = _envelope(response, asked.send_images)
    infotexts = info.get("infotexts")
    if not _strings(infotexts):
        raise BadNodeResult("info has no 'infotexts' list of strings")
    first = info.get("index_of_first_image", 0)
    if type(first) is not int or first not in (0, 1):
        raise BadNodeResult(f"index_of_first_image is {_show(first)}, not 0 or 1")
    grid = first == 1
    if grid:
        if not asked.save_images:
            raise BadNodeResult("a grid (index_of_first_image 1) where save_images is off")
        if not infotexts or (asked.send_images and not images):
            raise BadNodeResult("index_of_first_image 1 without a grid")
        infotexts = infotexts[1:]
        images = images[1:] if asked.send_images else images
    if len(infotexts) > asked.count:
        raise BadNodeResult(f"infotexts for {len(infotexts)} images where {asked.count} were asked")
    count = asked.count
    if allow_short:
        # An interrupted webui with no image done still reports one infotext.
        count = min(count, len(infotexts), len(images) if asked.send_images else count)
        infotexts = infotexts[:count]
    elif len(infotexts) != count:
        raise BadNodeResult(f"infotexts for {len(infotexts)} images where {count} were asked")
    if asked.send_images:
        if len(images) < count:
            raise BadNodeResult(f"{len(images)} images where {count} were asked")
        if len(images) > count and not asked.extensions:
            raise BadNodeResult(
                f"{len(images)} images where {count} were asked (and no alwayson script is on "
                "to add its own)"
            )
    seeds = _check_listed(info, "all_seeds", asked.seeds, allow_short, count)
    _check_listed(info, "all_subseeds", asked.subseeds, allow_short, count)
    for key in ("all_prompts", "all_negative_prompts"):
        values = info.get(key)
        # null for a null prompt: the webui copies the request's value into the list.
        if not isinstance(values, list) or len(values) != seeds:
            raise BadNodeResult(f"info {key!r} is not a list of {seeds} prompts")
        if not all(value is None or isinstance(value, str) for value in values):
            raise BadNodeResult(f"info {key!r} holds a prompt that is not a string")
    return Part(
        node=node,
        start=start,
        count=count,
        images=images[:count] if asked.send_images else [],
        extra_images=images[count:] if asked.send_images else [],
        infotexts=infotexts,
        info=info,
        parameters=parameters,
        grid_returned=grid,
    )


def check_script_answer(response: Any, send_images: bool) -> None:
    """Check a selectable script's answer (not split): its envelope, images and info."""
    _envelope(response, send_images)


def is_webui_error(status: int, body: Any) -> bool:
    """Whether ``body`` at ``status`` is an error the webui itself answers (errors.py says whose).

    A 4xx (not one of the statuses only servers and proxies in the way answer) or a 500, whose
    decoded JSON body is starlette's ``{"detail": "<text>"}``, FastAPI's 422 validation list, or
    the webui's exception body (A1111's ``errors`` or Forge's ``message`` variant).
    """
    if not webui_answers_status(status) or not isinstance(body, dict):
        return False
    keys = body.keys()
    if keys == {"detail"}:
        detail = body["detail"]
        if isinstance(detail, str):
            return True
        return status == 422 and isinstance(detail, list) and all(map(_validation_item, detail))
    if keys in (_A1111_ERROR_KEYS, _FORGE_ERROR_KEYS):
        return isinstance(body["error"], str)
    return False


def webui_answers_status(status: int) -> bool:
    """The webui answers request errors with this status: a 4xx (bar the ones only servers and
    proxies in the way answer) or 500. 401/403 are about credentials (errors.py)."""
    return (400 <= status < 500 or status == 500) and status not in _NOT_WEBUI_STATUSES


def nested_deeper_than(value: Any, limit: int) -> bool:
    """Whether decoded JSON ``value`` nests more than ``limit`` containers deep (no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = item.values()
        elif not isinstance(item, list):
            continue
        depth += 1
        if depth > limit:
            return True
        stack.extend((child, depth) for child in item if isinstance(child, dict | list))
    return False


def text_deeper_than(text: str, limit: int) -> bool:
    """Whether JSON ``text`` nests more than ``limit`` deep, found before it is parsed."""
    depth = 0
    for bracket in _JSON_BRACKET.finditer(_JSON_STRING.sub("", text)):
        if bracket.group() in "[{":
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def _envelope(response: Any, send_images: bool) -> tuple[list[str], dict[str, Any], dict[str, Any]]:
    """The images, parameters and parsed info of a generation answer, each checked."""
    if not isinstance(response, dict):
        raise BadNodeResult("the response is not a JSON object")
    images = response.get("images")
    parameters = response.get("parameters")
    if not _strings(images):
        raise BadNodeResult("'images' is not a list of strings")
    if not isinstance(parameters, dict):
        raise BadNodeResult("'parameters' is not an object")
    info = _parse_info(response.get("info"))
    if images and not send_images:
        raise BadNodeResult(f"{len(images)} images where send_images is off")
    for index, image in enumerate(images):
        _check_image(index, image)
    return images, parameters, info


def _parse_info(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, str):
        raise BadNodeResult("'info' is not a JSON object string")
    too_deep = BadNodeResult(f"info is nested deeper than {MAX_ANSWER_DEPTH} levels")
    if text_deeper_than(raw, MAX_ANSWER_DEPTH):
        raise too_deep
    try:
        info = json.loads(raw)
    except RecursionError:  # not reached after the check above; kept as a second line
        raise too_deep from None
    except ValueError:
        info = None
    if not isinstance(info, dict):
        raise BadNodeResult("'info' is not a JSON object string")
    return info


def _check_image(index: int, image: str) -> None:
    """Strict base64 of an image file: PNG, JPEG, WEBP (what samples_format may be) or GIF."""
    try:
        data = binascii.a2b_base64(image, strict_mode=True)
    except (binascii.Error, ValueError):
        raise BadNodeResult(f"images[{index}] is not base64") from None
    webp = data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    if not (data.startswith((_PNG, _JPEG, *_GIF)) or webp):
        raise BadNodeResult(f"images[{index}] is not a PNG, JPEG or WEBP image")


def _check_listed(
    info: dict[str, Any], key: str, sent: tuple[int, ...], short: bool, returned: int
) -> int:
    """Check a seed list against the seeds sent; returns its length."""
    got = info.get(key)
    if not isinstance(got, list) or not all(type(value) is int for value in got):
        raise BadNodeResult(f"info {key!r} is not a list of integers")
    if short:
        right = returned <= len(got) <= len(sent) and tuple(got) == sent[: len(got)]
    else:
        right = tuple(got) == sent
    if right:
        return len(got)
    repeated = _first_repeat(got) if len(set(sent)) == len(sent) else None
    repeats = f" (repeating {repeated})" if repeated is not None else ""
    raise BadNodeResult(f"{key} {_show(got)}{repeats} where {_show(list(sent))} were sent")


def _first_repeat(values: Sequence[int]) -> int | None:
    seen: set[int] = set()
    for value in values:
        if value in seen:
            return value
        seen.add(value)
    return None


def _show(value: Any) -> str:
    """A short rendering of a node's value for a reason: long lists cut, long text cut."""
    if isinstance(value, list) and len(value) > 6:
        return "[" + ", ".join(map(repr, value[:6])) + f", ... ({len(value)} in all)]"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _strings(value: Any) -> TypeGuard[list[str]]:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _validation_item(item: Any) -> bool:
    return (
        isinstance(item, dict)
        and isinstance(item.get("loc"), list)
        and isinstance(item.get("msg"), str)
        and isinstance(item.get("type"), str)
    )


def _uses_extensions(body: dict[str, Any]) -> bool:
    scripts = body.get("alwayson_scripts")
    return isinstance(scripts, dict) and bool(scripts)
