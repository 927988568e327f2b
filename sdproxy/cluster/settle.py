"""What a job's outcome means for its request and its node: rendered, refused, raised, failed.

Rendered images go to the run and teach the node's speed model; a refusal (4xx) is the
request's answer; a webui exception body is tried once on another node (if that node renders the
images, the first node was at fault and is taken out); a node failure takes the node out and plans
the job again onto the usable nodes, within ``max_redispatches``. A job whose handling crashed
inside sdproxy (a bug) is tried once more elsewhere, then its request gets a 500 naming it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sdproxy.cluster.dispatch import Dispatcher
from sdproxy.cluster.execute import Failed, Outcome, Rendered, RenderedWhole
from sdproxy.cluster.state import ClusterState
from sdproxy.cluster.work import Job
from sdproxy.errors import GenerationFailed, InternalError, NodeError, NodeRaised, NodeRejected
from sdproxy.nodes.fanout import is_node_failure
from sdproxy.ops.metrics import Metrics

log = logging.getLogger(__name__)


class Settler:
    """Acts on the outcome of every job."""

    def __init__(
        self,
        state: ClusterState,
        dispatcher: Dispatcher,
        metrics: Metrics,
        max_redispatches: int,
        wake: Callable[[str], None],
    ) -> None:
        self._state = state
        self._dispatcher = dispatcher
        self._metrics = metrics
        self._max_redispatches = max_redispatches
        self._wake = wake  # wakes a node's watcher, to probe on its new cooldown

    def settle(self, node: str, job: Job, outcome: Outcome, seconds: float) -> None:
        """Act on what rendering ``job`` on ``node`` came to, after ``seconds``."""
        run = job.run
        ended = run.finished
        match outcome:
            case Rendered(part):
                self._rendered(node, job, seconds, part.count)
                run.add(part, job.images)
            case RenderedWhole(response):
                self._rendered(node, job, seconds, job.images)
                run.complete_whole(node, response)
            case Failed(NodeRejected() as error):
                # The node is fine; the request is not: every node would refuse it.
                self._succeeded(node)
                self._metrics.observe_job(node, "rejected", seconds)
                job.retire()
                run.fail(error)
            case Failed(NodeRaised() as error):
                log.info("node %s raised on images %s..: %s", node, job.chunk.start, error.reason)
                self._metrics.observe_job(node, "error", seconds)
                self._retry_elsewhere(node, job, error)
            case Failed(error):
                log.warning("node %s failed images %s..: %s", node, job.chunk.start, error.reason)
                self._metrics.observe_job(node, "error", seconds)
                self._failover(node, job, error)
        if run.finished and not ended:  # the planner tells a stream of requests by their ends
            self._dispatcher.note_finished()

    def _rendered(self, node: str, job: Job, seconds: float, images: int) -> None:
        if not job.run.interrupted:  # a short, interrupted answer says nothing of the speed
            self._state.observe(node, job.work, seconds)
        self._succeeded(node, images)
        self._metrics.observe_job(node, "ok", seconds, images)
        job.retire()
        if job.blame is not None:  # these images raised on another node: that node was at fault
            blamed, error = job.blame
            if self._state.usable(blamed):
                log.warning("node %s raised on work another node rendered", blamed)
                self.take_out(blamed, error)

    def _succeeded(self, node: str, images: int = 0) -> None:
        self._state.count(node, images=images)
        self._state.record_ok(node)

    def crashed(self, node: str, job: Job) -> None:
        """A bug met ``job`` (the lane logged it): try its images once more, elsewhere."""
        run = job.run
        run.crashes += 1
        run.avoid.add(node)
        if run.finished:
            job.retire()
        elif run.crashes >= 2:
            job.retire()
            run.fail(InternalError(f"internal error in sdproxy on request {run.request_id}"))
        else:
            self._dispatcher.dispatch(job)

    # --- failures --------------------------------------------------------------------------

    def _failover(self, node: str, job: Job, error: NodeError) -> None:
        """Plan a failed job, and every job waiting behind it, onto the usable nodes."""
        run = job.run
        self._metrics.observe_failover(node)
        self.take_out(node, error)
        if run.finished:
            job.retire()
            return
        run.failures[node] = error.reason
        run.redispatches += 1
        if run.redispatches > self._max_redispatches:
            job.retire()
            run.fail(
                GenerationFailed("generation failed: too many failed attempts", dict(run.failures))
            )
        else:
            self._dispatcher.dispatch(job)

    def _retry_elsewhere(self, node: str, job: Job, error: NodeRaised) -> None:
        """A job raised on a node that is up (a webui 500): try its images elsewhere, once.

        The node stays up. If a second node raises too, or no other node may take the work,
        the request is at fault: the client gets the node's body (422) and no node is taken
        out. If another node renders the images, the first node was at fault (_rendered).
        """
        run = job.run
        self._state.note_error(node, error.reason)
        run.raised.add(node)
        others = [n for n in self._dispatcher.routable(run) if n not in run.raised]
        if run.finished or len(run.raised) >= 2 or not others:
            job.retire()
            run.fail(error)
            return
        self._metrics.observe_failover(node)
        job.blame = (node, error)
        self._dispatcher.dispatch(job)

    def take_out(self, node: str, error: NodeError) -> None:
        """Mark a node down after a failure (the cluster then moves the work waiting on it)."""
        self._metrics.observe_node_failure(node, error.kind)
        if self._state.record_failure(node, error.reason):
            log.warning("node %s is down: %s", node, error.reason)
        self._wake(node)  # its watcher now waits for the cooldown, not the interval

    def note_failure(self, error: NodeError) -> None:
        """A call to a node failed outside a job: take the node out if it was the node's fault."""
        if is_node_failure(error):
            self.take_out(error.node, error)
