"""Taking work back: the jobs of finished, interrupted or abandoned requests.

A finished request's unstarted jobs are withdrawn from the lanes and the parking. An
interrupted request keeps what its nodes are rendering (they stop after the current step and
answer with what is done, as a webui does) and gives up what has not started. Jobs a node is
rendering stay visible, even for a request whose client left, until they end: they still occupy
their node, and an interrupt must still reach them.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from sdproxy.cluster.lanes import Lane
from sdproxy.cluster.parking import Parking
from sdproxy.cluster.work import Job, Run


def running_jobs(lanes: Mapping[str, Lane]) -> list[tuple[str, Job]]:
    """(node, job) for every client job a node is rendering now."""
    running = []
    for lane in lanes.values():
        job = lane.running
        if job is not None and job.live:
            running.append((lane.name, job))
    return running


def withdraw(runs: Collection[Run], lanes: Mapping[str, Lane], parking: Parking) -> None:
    """Retire the unstarted jobs of ``runs``, queued or parked."""
    for lane in lanes.values():
        for job in lane.withdraw(runs):
            job.retire()
    for job in parking.withdraw(runs):
        job.retire()


def interrupt(runs: Collection[Run], lanes: Mapping[str, Lane], parking: Parking) -> None:
    """Mark ``runs`` interrupted and give up their images that no node has started.

    An unsplit (script) job still parked stays parked: it is all of its request.
    """
    for run in runs:
        run.interrupted = True
    for lane in lanes.values():
        for job in lane.withdraw(runs):
            job.retire()
            job.run.drop(job.images)
    for job in parking.withdraw(runs):
        if job.whole:
            parking.park(job)
        else:
            job.retire()
            job.run.drop(job.images)
