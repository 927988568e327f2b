"""Pure: who renders which images. No I/O, no clocks, no randomness: same inputs, same plan."""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Share:
    """A contiguous range of units (images, or whole batches) given to one node."""

    node: str
    start: int
    count: int

    @property
    def stop(self) -> int:
        return self.start + self.count


@dataclass(frozen=True)
class Chunk:
    """One request to one node: ``batch_size x n_iter`` images from image index ``start``."""

    start: int
    batch_size: int
    n_iter: int

    @property
    def images(self) -> int:
        return self.batch_size * self.n_iter


@dataclass(frozen=True)
class NodeLoad:
    """What the makespan planner knows of one healthy node, for one request."""

    name: str
    overhead_s: float  # predicted fixed seconds per node request
    per_unit_s: float  # predicted seconds per unit (image, or whole batch) of this request
    backlog_s: float = 0.0  # predicted seconds of work already queued or running on the node
    batch_limit: int | None = None  # units per node request; None: any count is one request
    # While the node's model has seen jobs of one size only: that size, in units of this request.
    seen_units: float | None = None
    # Of backlog_s, background work (a benchmark run) that gives way: nobody waits behind it.
    background_s: float = 0.0


def share_time_s(node: NodeLoad, count: int) -> float:
    """Predicted seconds from now until ``node`` has rendered ``count`` more units.

    A share larger than the batch limit goes as at most two node requests (see chunk_share),
    so it pays the overhead twice; this keeps the time non-decreasing in ``count``.
    """
    if count <= 0:
        return 0.0
    return node.backlog_s + _requests(node, count) * node.overhead_s + count * node.per_unit_s


def _requests(node: NodeLoad, count: int) -> int:
    """Node requests a share of ``count`` units is sent as (see chunk_share)."""
    limit = node.batch_limit
    return 1 if limit is None or count <= limit else 2


def predicted_makespan_s(nodes: Sequence[NodeLoad], counts: Mapping[str, int]) -> float:
    """When the last of the request's units is predicted done, given units per node."""
    return max((share_time_s(n, counts.get(n.name, 0)) for n in nodes), default=0.0)


def plan_makespan(units: int, nodes: Sequence[NodeLoad], start: int = 0) -> list[Share]:
    """Integer shares of ``units`` that minimise the predicted time the last unit is done.

    Each unit in turn goes to the node that would finish it earliest, counting that node's
    backlog, overhead and the units it already has. Every node's finishing times grow with its
    count, so the units handed out are the ``units`` earliest finishing times of all nodes
    together, and no other split can end sooner. A node whose backlog or overhead makes its
    first unit finish later than the others' last one gets nothing; ties go to the faster node,
    then the earlier one. Shares are contiguous from ``start`` in the order of ``nodes``.
    """
    if units < 0:
        raise ValueError("units must be >= 0")
    if not nodes:
        raise ValueError("no nodes to plan for")
    counts = [0] * len(nodes)
    heap = [(share_time_s(node, 1), node.per_unit_s, i) for i, node in enumerate(nodes)]
    heapq.heapify(heap)
    for _ in range(units):
        _, per_unit, i = heapq.heappop(heap)
        counts[i] += 1
        heapq.heappush(heap, (share_time_s(nodes[i], counts[i] + 1), per_unit, i))
    return _contiguous([node.name for node in nodes], counts, start)


@dataclass(frozen=True)
class Traffic:
    """The other client requests, as the scheduler sees them when it plans one."""

    in_flight: int = 0  # other requests queued or rendering
    finished_ago_s: tuple[float, ...] = ()  # how long ago recent requests finished, in seconds

    def followers(self, horizon_s: float) -> int:
        """Requests expected within ``horizon_s``: as many as finished in the last as long.

        At most as many as are in flight besides this one: a client that waits for its answer
        before it sends the next request (one client in a loop) follows nobody.
        """
        recent = sum(1 for age in self.finished_ago_s if 0.0 <= age <= horizon_s)
        return min(recent, self.in_flight)


IDLE = Traffic()


def overhead_weight(units: int, nodes: Sequence[NodeLoad], traffic: Traffic) -> float:
    """What one second of node-request overhead costs, in seconds of this request's finish.

    On an idle cluster with no stream of requests, 0: only the finish counts. While other work
    is queued or running, each overhead second counts once in full (a burst of requests at once
    splits well so: benchmarks/makespan.py), and once more for every request expected before
    this one is done, because every extra node request delays each of them by its overhead.
    Those are estimated from the recent past: as many as finished within the time the request
    takes on the node that would finish it whole first, and no more than are in flight; and at
    least the other requests in flight per node (clients with requests in flight tend to send
    more: the opening burst of many clients is not split as if it were all there is). A steady
    stream (clients sending a new request as each answer comes) thus keeps requests whole,
    while a small burst after a quiet spell is split to end it early.
    """
    busy = traffic.in_flight > 0 or any(node.backlog_s > node.background_s for node in nodes)
    if not busy or not nodes:
        return 0.0
    horizon_s = min(share_time_s(node, units) for node in nodes)
    return 1.0 + max(traffic.followers(horizon_s), traffic.in_flight / len(nodes))


def plan_under_load(
    units: int, nodes: Sequence[NodeLoad], start: int = 0, *, traffic: Traffic = IDLE
) -> list[Share]:
    """The shares of ``units`` that end earliest once each node request's overhead is paid.

    Minimises the predicted finish plus ``overhead_weight`` times the overhead seconds of the
    node requests the plan makes. On an idle cluster (weight 0) that is plan_makespan's plan.
    Otherwise the candidates are the whole request on the node that finishes it first,
    plan_makespan's plan, and plan_makespan's split over the ``k`` nodes that would finish it
    whole first, for every ``k`` in between: a request goes whole unless splitting ends it
    sooner by more than the overhead it adds costs the requests behind it. Ties go to fewer
    nodes; the plan never finishes later than the best single node.
    """
    full = plan_makespan(units, nodes, start)
    weight = overhead_weight(units, nodes, traffic)
    if weight <= 0 or len(full) <= 1:
        return full
    index = {node.name: i for i, node in enumerate(nodes)}
    ranked = sorted(
        range(len(nodes)), key=lambda i: (share_time_s(nodes[i], units), nodes[i].per_unit_s, i)
    )
    latest = share_time_s(nodes[ranked[0]], units)  # the best single node's finish

    def cost(shares: list[Share]) -> float:
        finish = predicted_makespan_s(nodes, {share.node: share.count for share in shares})
        overheads = math.fsum(
            _requests(nodes[index[s.node]], s.count) * nodes[index[s.node]].overhead_s
            for s in shares
        )
        return finish + weight * overheads

    candidates = [[Share(nodes[ranked[0]].name, start, units)], full]
    for k in range(2, len(full)):
        subset = [nodes[i] for i in sorted(ranked[:k])]  # list order keeps ranges in node order
        shares = plan_makespan(units, subset, start)
        if predicted_makespan_s(nodes, {s.node: s.count for s in shares}) <= latest:
            candidates.append(shares)
    return min(candidates, key=lambda shares: (cost(shares), len(shares)))


LEARNING_BUDGET = 0.03  # share of the predicted makespan a plan may spend to learn a slope
NEW_SIZE = 0.25  # a share this far from the one size seen tells overhead from per-unit time


def vary_for_learning(
    shares: list[Share], nodes: Sequence[NodeLoad], *, budget: float = LEARNING_BUDGET
) -> list[Share]:
    """Give one node whose model has seen a single share size a different size, if it is cheap.

    While every job a node ran had one size (``NodeLoad.seen_units``) its overhead cannot be
    told from its per-unit time, and a plan that keeps giving it that size never will. So when
    a split plan gives such a node about that size again, its share is set to the nearest
    count at least ``NEW_SIZE`` off it (up or down) and the other nodes of the plan share the
    rest as plan_makespan would, provided the predicted makespan grows by at most ``budget`` of
    itself. Of the nodes that need it, the one whose change costs least is changed. A plan of
    one share is left alone (varying it would mean another node request). The result tiles
    the same range, in the order of ``nodes``.
    """
    if len(shares) < 2:
        return shares
    by_name = {node.name: node for node in nodes}
    used = [by_name[share.node] for share in shares]
    counts = {share.node: share.count for share in shares}
    units = sum(counts.values())
    allowed = predicted_makespan_s(used, counts) * (1 + budget)
    best: tuple[float, dict[str, int]] | None = None
    for node in used:
        seen, count = node.seen_units, counts[node.name]
        if seen is None or seen <= 0 or abs(count - seen) >= NEW_SIZE * seen:
            continue
        others = [other for other in used if other is not node]
        up, down = math.ceil(seen * (1 + NEW_SIZE)), math.floor(seen * (1 - NEW_SIZE))
        for size in (up, down):
            if not 1 <= size <= units:
                continue
            trial = {s.node: s.count for s in plan_makespan(units - size, others)}
            trial[node.name] = size
            finish = predicted_makespan_s(used, trial)
            if finish <= allowed and (best is None or finish < best[0]):
                best = finish, trial
    if best is None:
        return shares
    return _contiguous(
        [n.name for n in nodes], [best[1].get(n.name, 0) for n in nodes], shares[0].start
    )


def _contiguous(names: Sequence[str], counts: Sequence[int], start: int) -> list[Share]:
    """Consecutive ranges from ``start``, in the order of ``names``; empty counts left out."""
    shares: list[Share] = []
    at = start
    for name, count in zip(names, counts, strict=True):
        if count:
            shares.append(Share(name, at, count))
            at += count
    return shares


def chunk_share(share: Share, max_batch_size: int) -> list[Chunk]:
    """Cut a share of single images into at most two node requests of at most max_batch_size.

    ``q`` full batches go in one request as ``max_batch_size x q``; the remainder, if any, as one
    more request, so a node pays its per-request overhead at most twice.
    """
    if max_batch_size < 1:
        raise ValueError("max_batch_size must be >= 1")
    full, rest = divmod(share.count, max_batch_size)
    chunks: list[Chunk] = []
    if full:
        chunks.append(Chunk(share.start, max_batch_size, full))
    if rest:
        chunks.append(Chunk(share.start + full * max_batch_size, rest, 1))
    return chunks
