"""Work stealing: a node that runs out of work takes over waiting work it finishes earlier.

When a lane is idle while jobs of running requests still wait, not started, on other lanes, the
idle node looks at every such job and the part of it (its last images, so seed ranges stay
contiguous and exact) that, moved, would end that job soonest given both nodes' speed models
and what is still ahead of the job on its own lane. The best move is made if it saves time: the
job is cut in two, the kept part re-chunked in place, the stolen part queued on the idle node.
Only nodes the planner could have chosen (model routing) take work, and never an unsplit script
request or an interrupted one. ``[scheduler] work_stealing = false`` turns it off.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Protocol

from sdproxy.cluster.forecast import Forecast
from sdproxy.cluster.lanes import Lane
from sdproxy.cluster.work import Job, Run
from sdproxy.core.planner import Share
from sdproxy.errors import NodeRaised

log = logging.getLogger(__name__)

MIN_GAIN_S = 1e-3  # smaller predicted savings are noise, not worth a node request


class StealHost(Protocol):
    """What work stealing needs from the cluster."""

    @property
    def lanes(self) -> Mapping[str, Lane]: ...

    @property
    def forecast(self) -> Forecast: ...

    def usable(self, node: str) -> bool: ...

    def may_render(self, node: str, job: Job) -> bool:
        """Whether the planner could have given ``node`` this job (routing, earlier raises)."""
        ...

    def jobs_for(
        self, run: Run, share: Share, blame: tuple[str, NodeRaised] | None = None
    ) -> list[Job]: ...


def rebalance(host: StealHost, now: float) -> bool:
    """Let idle usable lanes take over waiting work they finish earlier; True if any did."""
    moved = False
    for lane in host.lanes.values():
        if lane.idle and host.usable(lane.name):
            moved = steal_for(host, lane, now) or moved
    return moved


def steal_for(host: StealHost, idle: Lane, now: float) -> bool:
    """Move the part of one waiting job that ``idle`` finishes earliest, if that helps."""
    best: tuple[float, Lane, Job, int] | None = None
    for donor in host.lanes.values():
        if donor is idle or not donor.pending:
            continue
        waiting = [job for job in donor.pending if job.live and not job.run.finished]
        ahead = donor.backlog_s(now) - sum(
            host.forecast.predict_s(donor.name, job.work) for job in waiting
        )
        for job in waiting:
            units = job.images // job.run.request.unit_size
            if not job.whole and not job.run.interrupted and host.may_render(idle.name, job):
                gain, moved = _best_steal(host.forecast, idle.name, donor.name, job, ahead)
                if moved and (best is None or gain > best[0]):
                    best = gain, donor, job, moved
            ahead += _job_time_s(host.forecast, donor.name, job, units)
    if best is None or best[0] <= MIN_GAIN_S:
        return False
    _, donor, job, units = best
    _move(host, donor, idle, job, units)
    return True


def _job_time_s(forecast: Forecast, node: str, job: Job, units: int) -> float:
    """Predicted seconds for ``node`` to render ``units`` of ``job``'s request."""
    if units <= 0:
        return 0.0
    request = job.run.request
    requests = forecast.requests_for(node, request, units)
    work = units * request.unit_size * job.run.work_per_image
    return forecast.predict_s(node, work, requests)


def _best_steal(
    forecast: Forecast, idle: str, donor: str, job: Job, ahead_s: float
) -> tuple[float, int]:
    """(seconds saved, units to move) for the best split of ``job`` between the nodes."""
    request = job.run.request
    if forecast.batch_limit(idle, request) == 0:
        return 0.0, 0
    units = job.images // request.unit_size
    now_done = ahead_s + _job_time_s(forecast, donor, job, units)
    best_gain, best_units = 0.0, 0
    for moved in range(1, units + 1):
        done = max(
            ahead_s + _job_time_s(forecast, donor, job, units - moved) if moved < units else 0.0,
            _job_time_s(forecast, idle, job, moved),
        )
        if now_done - done > best_gain:
            best_gain, best_units = now_done - done, moved
    return best_gain, best_units


def _move(host: StealHost, donor: Lane, idle: Lane, job: Job, units: int) -> None:
    """Split ``job``: its last ``units`` go to ``idle``, the rest stays where it was."""
    run, unit = job.run, job.run.request.unit_size
    first = job.chunk.start // unit
    total = job.images // unit
    kept = total - units
    kept_jobs = host.jobs_for(run, Share(donor.name, first, kept), job.blame) if kept else []
    donor.replace(job, kept_jobs)
    job.retire()
    log.info(
        "node %s takes images %d-%d over from node %s",
        idle.name,
        (first + kept) * unit,
        (first + total) * unit - 1,
        donor.name,
    )
    for stolen in host.jobs_for(run, Share(idle.name, first + kept, units), job.blame):
        idle.submit(stolen)
