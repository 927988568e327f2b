"""A request in flight (Run) and one node request of it (Job).

A Run collects the parts of one client request until every image is in, or it fails. It knows
its live jobs, the jobs that still own some of its images: queued on a lane, rendering on a
node, or parked until a node comes back. A job is live from the moment it is made until it is
retired: it delivered its images, failed and was planned again as new jobs, or was dropped.
So an unfinished run always has an owner, and :func:`ownership_problems` checks it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sdproxy.core.merge import Part
from sdproxy.core.planner import Chunk
from sdproxy.core.request import GenerationRequest, Seeds
from sdproxy.errors import NodeRaised, SdproxyError
from sdproxy.logs import request_id_var


@dataclass(eq=False)
class Run:
    """One client request in flight: collects parts until every image is in."""

    request: GenerationRequest
    seeds: Seeds
    remaining: int  # images not yet delivered or given up
    work_per_image: float = 1.0
    started_at: float = 0.0  # Unix time, for the dashboard
    parts: list[Part] = field(default_factory=list)
    whole: Any = None  # the raw answer of an unsplit (script) request
    whole_node: str | None = None  # the node that rendered it
    redispatches: int = 0
    failures: dict[str, str] = field(default_factory=dict)
    raised: set[str] = field(default_factory=set)  # nodes on which a job of this run raised
    crashes: int = 0  # jobs whose handling raised inside sdproxy (a bug): retried once
    avoid: set[str] = field(default_factory=set)  # nodes on which handling a job crashed
    error: SdproxyError | None = None
    interrupted: bool = False  # by the client: short answers are what was finished so far
    abandoned: bool = False  # the client went away before the answer
    jobs: set[Job] = field(default_factory=set)  # live jobs: the owners of the run's images
    done: asyncio.Event = field(default_factory=asyncio.Event)
    request_id: str | None = field(default_factory=request_id_var.get)

    @property
    def finished(self) -> bool:
        """The answer is decided (complete, failed or abandoned); live jobs may still run."""
        return self.done.is_set()

    @property
    def settled(self) -> bool:
        """Finished, and no job of it is left anywhere."""
        return self.finished and not self.jobs

    def add(self, part: Part, covered: int) -> None:
        """A node's answer for ``covered`` images (``part`` may hold fewer when interrupted)."""
        if self.finished:
            return
        self.parts.append(part)
        self.drop(covered)

    def drop(self, images: int) -> None:
        """Stop waiting for ``images`` images (rendered, or given up after an interrupt)."""
        self.remaining -= images
        if self.remaining <= 0:
            self.done.set()

    def complete_whole(self, node: str, response: Any) -> None:
        if not self.finished:
            self.whole, self.whole_node = response, node
            self.done.set()

    def fail(self, error: SdproxyError) -> None:
        if not self.finished:
            self.error = error
            self.done.set()

    def abandon(self) -> None:
        """The client disconnected: nobody will read the answer."""
        if not self.finished:
            self.abandoned = True
            self.done.set()


@dataclass(eq=False)
class Job:
    """One request to one node: a chunk of a run's images, or the whole unsplit request.

    Made live on its run when created; :meth:`retire` ends that.
    """

    run: Run
    chunk: Chunk
    whole: bool = False
    parked_at: float | None = None  # clock time it first waited for a usable node
    # The node these images raised on before (a webui 500): if they render elsewhere, that
    # node, not the request, was at fault, and it is taken out.
    blame: tuple[str, NodeRaised] | None = None

    def __post_init__(self) -> None:
        self.run.jobs.add(self)

    @property
    def images(self) -> int:
        return self.chunk.images

    @property
    def work(self) -> float:
        """Units of work (images of 20 steps at 512x512) the job renders."""
        return self.chunk.images * self.run.work_per_image

    @property
    def live(self) -> bool:
        return self in self.run.jobs

    def retire(self) -> None:
        """This job owns none of its run's images any more."""
        self.run.jobs.discard(self)


def ownership_problems(runs: Iterable[Run], placed: Iterable[tuple[str, Job]]) -> list[str]:
    """What breaks "every image of a request in flight has exactly one owner".

    ``placed`` lists where each job sits (a lane's queue, a node, parking). Every live job must
    sit in exactly one place, every placed job must be live, and a run that is not finished
    must have at least one live job. Empty when all is well.
    """
    problems: list[str] = []
    seen: dict[Job, str] = {}
    for where, job in placed:
        if job in seen:
            problems.append(f"a job of request {job.run.request_id} is in {seen[job]} and {where}")
        seen[job] = where
        if not job.live and not job.run.finished:
            problems.append(f"a retired job of request {job.run.request_id} is still in {where}")
    for run in runs:
        if not run.finished and not run.jobs:
            problems.append(f"request {run.request_id} is unfinished and owned by no job")
        lost = [job for job in run.jobs if job not in seen]
        problems.extend(f"a live job of request {run.request_id} is nowhere" for _ in lost)
    return problems
