"""Running one job on its node: the node body, the call, and what the answer amounts to.

The outcome is a value, not an exception, so that what it means for the request and the node
(cluster/settle.py) reads as one ``match``: the images it rendered, the whole answer of an
unsplit request, or the node error it met (a refusal that is the request's fault, a webui error
the job raised, or a failure of the node: see the NodeError classes in errors.py).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from sdproxy.cluster.work import Job
from sdproxy.core.answers import (
    BadNodeResult,
    answer_budget,
    asked_of,
    check_script_answer,
    read_part,
)
from sdproxy.core.merge import Part
from sdproxy.core.request import node_body
from sdproxy.errors import NodeError, NodeWrongAnswer
from sdproxy.nodes.client import NodeClient


@dataclass(frozen=True)
class Rendered:
    """The node rendered the job's images (fewer when the request was interrupted)."""

    part: Part


@dataclass(frozen=True)
class RenderedWhole:
    """The node answered an unsplit request; its answer is the client's."""

    response: Any


@dataclass(frozen=True)
class Failed:
    """The node call ended in a NodeError: refused (4xx), raised (webui 500), or failed."""

    error: NodeError


Outcome = Rendered | RenderedWhole | Failed


def body_for(job: Job) -> dict[str, Any]:
    """What the job's node is sent: the client's body, or one share of it with its seeds."""
    run, chunk = job.run, job.chunk
    if job.whole:
        return run.request.body
    return node_body(run.request, run.seeds, chunk.start, chunk.batch_size, chunk.n_iter)


async def execute(client: NodeClient, job: Job, timeout_s: float) -> Outcome:
    """Send ``job`` to ``client``'s node and read the answer."""
    run, chunk = job.run, job.chunk
    request = run.request
    body = body_for(job)
    budget = answer_budget(request, chunk.images, script=job.whole)
    try:
        response = await client.generate(request.kind, body, timeout_s, budget)
    except NodeError as exc:
        return Failed(exc)
    # Checked against what was asked, in a thread: every image is base64-decoded.
    try:
        if job.whole:
            await asyncio.to_thread(check_script_answer, response, request.send_images)
            return RenderedWhole(response)
        asked = asked_of(request, body)
        part = await asyncio.to_thread(
            read_part, client.name, chunk.start, response, asked, allow_short=run.interrupted
        )
    except BadNodeResult as exc:
        return Failed(NodeWrongAnswer(client.name, str(exc)))
    return Rendered(part)
