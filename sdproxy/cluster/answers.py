"""A finished run's answer: the merged webui response of its parts, or its error."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from sdproxy.cluster.work import Run
from sdproxy.core import images
from sdproxy.core.merge import Merged, merge_parts, with_grid
from sdproxy.core.progress import FinishedJob, finished_job
from sdproxy.core.request import GenerationRequest
from sdproxy.errors import GenerationFailed


@dataclass
class GenerationResult:
    """What a handler sends back: the webui's JSON envelope and who rendered what."""

    body: dict[str, Any]
    shares: list[tuple[str, int, int]]  # (node, first image, last image)
    warnings: list[str] = field(default_factory=list)  # said to the client in a header


@dataclass
class LastRun:
    """The last request answered, as an idle GET /progress still shows it (as a webui does)."""

    job: FinishedJob | None = None


async def answer(run: Run, last: LastRun | None = None) -> GenerationResult:
    """What the client gets for a finished ``run``; raises the run's error.

    ``last`` is told what a webui's progress would still show of it.
    """
    result = await _answer(run)
    if last is not None:
        last.job = finished_job(run.request, result.body, interrupted=run.interrupted)
    return result


async def _answer(run: Run) -> GenerationResult:
    request = run.request
    if run.error is not None:
        raise run.error
    if not request.splittable:
        shares = [(run.whole_node, 0, request.total_images - 1)] if run.whole_node else []
        return GenerationResult(run.whole, shares)
    if not run.parts:  # interrupted, and the nodes it was on failed
        why = "interrupted, and no node returned an image"
        raise GenerationFailed(f"generation failed: {why}", failures=dict(run.failures))
    merged = merge_parts(request, run.seeds, run.parts, partial=run.interrupted)
    if merged.grid_wanted:
        merged = await _add_grid(merged, request)
    return GenerationResult(merged.to_json_dict(), merged.shares)


async def _add_grid(merged: Merged, request: GenerationRequest) -> Merged:
    if not request.send_images:
        return with_grid(merged, None)
    infotexts = merged.info.get("infotexts") or [None]
    rendered = merged.images[: merged.rendered]  # not the extra images after them
    grid = await asyncio.to_thread(images.build_grid, rendered, infotexts[0])
    return with_grid(merged, grid)
