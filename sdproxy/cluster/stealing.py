"""Work stealing: a node that runs out of work takes over waiting work it finishes earlier.

When a lane is idle while jobs of running requests still wait, not started, on other lanes, the
idle node looks at every such job and the part of it (its last images, so seed ranges stay
contiguous and exact) that, moved, would end that job soonest given both nodes' speed models
and what is still ahead of the job on its own lane. The best move is made if it saves time: the
job is cut in two, the kept part re-chunked in place, the stolen part queued on the idle node.
Only nodes the planner could have chosen (model routing) take work, and never an unsplit script
request or an interrupted one.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from sdproxy.core.planner import Share, chunk_share
from sdproxy.errors import SdproxyError

if TYPE_CHECKING:
    from sdproxy.cluster.lanes import Job, Lane
    from sdproxy.cluster.scheduler import Cluster

log = logging.getLogger(__name__)

MIN_GAIN_S = 1e-3  # smaller predicted savings are noise, not worth a node request


def rebalance(cluster: Cluster) -> bool:
    """Let idle healthy lanes take over waiting work they finish earlier; True if any did."""
    moved = False
    for lane in cluster.lanes.values():
        if lane.idle and lane.client.stats.healthy:
            moved = steal_for(cluster, lane) or moved
    return moved


def steal_for(cluster: Cluster, idle: Lane) -> bool:
    """Move the part of one waiting job that ``idle`` finishes earliest, if that helps."""
    now = asyncio.get_running_loop().time()
    best: tuple[float, Lane, Job, int] | None = None
    for donor in cluster.lanes.values():
        if donor is idle or not donor.pending:
            continue
        ahead = donor.backlog_s(now) - sum(
            cluster.predict_s(donor, j.work) for j in donor.pending if not j.run.finished
        )
        for job in donor.pending:
            if job.run.finished:
                continue
            own = _job_time_s(cluster, donor, job, job.chunk.images // job.run.request.unit_size)
            if not job.whole and not job.run.interrupted and _may_render(cluster, idle, job):
                gain, units = _best_steal(cluster, idle, donor, job, ahead)
                if units and (best is None or gain > best[0]):
                    best = gain, donor, job, units
            ahead += own
    if best is None or best[0] <= MIN_GAIN_S:
        return False
    _, donor, job, units = best
    _move(cluster, donor, idle, job, units)
    return True


def _may_render(cluster: Cluster, lane: Lane, job: Job) -> bool:
    """Whether the planner could have given ``lane`` this job (its checkpoint is there).

    A node the request's work raised on (a webui 500) is not eligible: the retry is there to
    learn whether another node renders it.
    """
    if lane.client.name in job.run.raised:
        return False
    try:
        eligible = cluster.models.select(job.run.request, cluster.healthy_clients())
    except SdproxyError:
        return False
    return any(client is lane.client for client in eligible)


def _job_time_s(cluster: Cluster, lane: Lane, job: Job, units: int) -> float:
    """Predicted seconds for ``lane`` to render ``units`` of ``job``'s request."""
    if units <= 0:
        return 0.0
    request = job.run.request
    limit = cluster.batch_limit(lane, request)
    requests = 1 if limit is None else len(chunk_share(Share(lane.name, 0, units), max(limit, 1)))
    work = units * request.unit_size * job.run.work_per_image
    return cluster.predict_s(lane, work, requests)


def _best_steal(
    cluster: Cluster, idle: Lane, donor: Lane, job: Job, ahead_s: float
) -> tuple[float, int]:
    """(seconds saved, units to move) for the best split of ``job`` between the lanes."""
    request = job.run.request
    if cluster.batch_limit(idle, request) == 0:
        return 0.0, 0
    units = job.chunk.images // request.unit_size
    now_done = ahead_s + _job_time_s(cluster, donor, job, units)
    best_gain, best_units = 0.0, 0
    for moved in range(1, units + 1):
        done = max(
            ahead_s + _job_time_s(cluster, donor, job, units - moved) if moved < units else 0.0,
            _job_time_s(cluster, idle, job, moved),
        )
        if now_done - done > best_gain:
            best_gain, best_units = now_done - done, moved
    return best_gain, best_units


def _move(cluster: Cluster, donor: Lane, idle: Lane, job: Job, units: int) -> None:
    """Split ``job``: its last ``units`` go to ``idle``, the rest stays where it was."""
    run, unit = job.run, job.run.request.unit_size
    first = job.chunk.start // unit
    total = job.chunk.images // unit
    kept = total - units
    at = donor.pending.index(job)
    del donor.pending[at]
    if kept:
        for kept_job in reversed(cluster.jobs_for(run, Share(donor.name, first, kept))):
            donor.pending.insert(at, kept_job)
    log.info(
        "node %s takes images %d-%d over from node %s",
        idle.name,
        (first + kept) * unit,
        (first + total) * unit - 1,
        donor.name,
    )
    for stolen in cluster.jobs_for(run, Share(idle.name, first + kept, units)):
        idle.submit(stolen)
