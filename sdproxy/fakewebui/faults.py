"""The fake node's misbehaviours: answers a lying webui, or something in its way, would give.

Two kinds, both used through ``Fault(mode=...)`` (or ``sdproxy fake-node --fail-mode``):

- **Lies** (the job renders, then the answer is wrong): ``wrong_seeds`` (every seed 1000 off,
  images rendered from them), ``duplicate_seeds`` (every image from the first seed and
  subseed), ``extra_image`` (batch_size + 1 images per batch, each with its infotext and seed),
  ``bad_base64`` (the first image as a data: URI), ``not_image`` (the first image is base64 of
  text), ``deep_info`` (info holds a value nested 5000 deep).
- **In the way** (answered at once, nothing rendered): ``redirect`` (307 to ``redirect_url`` plus
  the request's path), ``huge_body`` (announces ``huge_mb`` in Content-Length and sends it),
  ``huge_stream`` (the same, chunked, with no length), ``html404`` and ``error413`` (nginx's
  HTML pages), ``error429`` (a rate limiter's, in JSON).
"""

from __future__ import annotations

import base64
import dataclasses
from typing import Any

from aiohttp import web

from sdproxy.fakewebui.node import Fault
from sdproxy.fakewebui.planning import JobPlan

IN_THE_WAY = frozenset({"redirect", "huge_body", "huge_stream", "html404", "error429", "error413"})
_DEEP = 5000
_CHUNK = b"A" * (1 << 20)
_PAGES = {"html404": (404, "Not Found"), "error413": (413, "Request Entity Too Large")}
_NGINX = (
    "<html>\r\n<head><title>{0}</title></head>\r\n<body>\r\n<center><h1>{0}</h1></center>\r\n"
    "<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)


async def answer_in_the_way(fault: Fault, request: web.Request) -> web.StreamResponse:
    """What a server in front of the webui answers instead of it."""
    mode = fault.mode
    if mode == "redirect":
        location = fault.redirect_url.rstrip("/") + request.path_qs
        return web.Response(status=307, headers={"Location": location})
    if mode in _PAGES:
        status, title = _PAGES[mode]
        page = _NGINX.format(f"{status} {title}")
        return web.Response(status=status, text=page, content_type="text/html")
    if mode == "error429":
        return web.json_response(
            {"detail": "Too Many Requests"}, status=429, headers={"Retry-After": "1"}
        )
    return await _huge(request, int(fault.huge_mb * (1 << 20)), announce=mode == "huge_body")


async def _huge(request: web.Request, size: int, *, announce: bool) -> web.StreamResponse:
    """``size`` bytes that start like a webui answer, sent until done or the client leaves."""
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    if announce:
        response.content_length = size
    else:
        response.enable_chunked_encoding()
    await response.prepare(request)
    head = b'{"images": ["'
    sent = 0
    try:
        await response.write(head)
        sent = len(head)
        while sent < size:
            chunk = _CHUNK[: size - sent]
            await response.write(chunk)
            sent += len(chunk)
        await response.write_eof()
    except ConnectionError:  # the client stopped reading: what it should do
        pass
    return response


def lie_in_request(fault: Fault, req: dict[str, Any]) -> dict[str, Any]:
    """The request as a lying node reads it (``extra_image``: one more image per batch)."""
    if fault.mode == "extra_image":
        return dict(req, batch_size=int(req["batch_size"] or 1) + 1)
    return req


def lie_in_plan(fault: Fault, plan: JobPlan) -> JobPlan:
    """The job's seeds as a lying node renders and reports them."""
    gen = plan.gen
    if fault.mode == "wrong_seeds":
        gen = dataclasses.replace(gen, all_seeds=[seed + 1000 for seed in gen.all_seeds])
    elif fault.mode == "duplicate_seeds":
        total = len(gen.all_seeds)
        gen = dataclasses.replace(
            gen, all_seeds=gen.all_seeds[:1] * total, all_subseeds=gen.all_subseeds[:1] * total
        )
    else:
        return plan
    return dataclasses.replace(plan, gen=gen)


def lie_in_images(fault: Fault, images: list[str]) -> list[str]:
    """The base64 images as a lying node sends them."""
    if not images:
        return images
    if fault.mode == "bad_base64":
        return [f"data:image/png;base64,{images[0]}", *images[1:]]
    if fault.mode == "not_image":
        text = base64.b64encode(b"Internal Server Error: CUDA out of memory").decode()
        return [text, *images[1:]]
    return images


def lie_in_info(fault: Fault, info: str) -> str:
    """The info JSON string as a lying node sends it (``deep_info``: nested 5000 deep)."""
    if fault.mode != "deep_info":
        return info
    deep = "[" * _DEEP + "]" * _DEEP
    return info[:-1] + f', "extra_generation_params_deep": {deep}}}'
