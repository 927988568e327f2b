"""Pure: who renders which images. No I/O, no clocks, no randomness: same inputs, same plan."""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class NodeCapacity:
    """What the planner knows of one healthy node."""

    name: str
    weight: float  # relative speed; only ratios between nodes matter


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


def plan_split(units: int, nodes: Sequence[NodeCapacity], start: int = 0) -> list[Share]:
    """Split ``units`` across ``nodes`` in proportion to weight, as integer counts.

    Largest-remainder rounding: the counts sum exactly to ``units``, each node gets its quota
    rounded down, and the units left over go to the nodes with the largest fractions (ties to
    the faster node, then to the earlier one). Nodes given nothing are left out; the ranges are
    contiguous from ``start``, in the order of ``nodes``.
    """
    if units < 0:
        raise ValueError("units must be >= 0")
    if not nodes:
        raise ValueError("no nodes to plan for")
    total_weight = math.fsum(node.weight for node in nodes)
    quotas = [units * node.weight / total_weight for node in nodes]
    counts = [math.floor(quota) for quota in quotas]
    left = units - sum(counts)
    by_remainder = sorted(
        range(len(nodes)), key=lambda i: (-(quotas[i] - counts[i]), -nodes[i].weight, i)
    )
    for i in by_remainder[:left]:
        counts[i] += 1
    return _contiguous([node.name for node in nodes], counts, start)


@dataclass(frozen=True)
class NodeLoad:
    """What the makespan planner knows of one healthy node, for one request."""

    name: str
    overhead_s: float  # predicted fixed seconds per node request
    per_unit_s: float  # predicted seconds per unit (image, or whole batch) of this request
    backlog_s: float = 0.0  # predicted seconds of work already queued or running on the node
    batch_limit: int | None = None  # units per node request; None: any count is one request


def share_time_s(node: NodeLoad, count: int) -> float:
    """Predicted seconds from now until ``node`` has rendered ``count`` more units.

    A share larger than the batch limit goes as at most two node requests (see chunk_share),
    so it pays the overhead twice; this keeps the time non-decreasing in ``count``.
    """
    if count <= 0:
        return 0.0
    limit = node.batch_limit
    requests = 1 if limit is None or count <= limit else 2
    return node.backlog_s + requests * node.overhead_s + count * node.per_unit_s


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


def plan_under_load(
    units: int, nodes: Sequence[NodeLoad], start: int = 0, *, penalty: float = 0.0
) -> list[Share]:
    """Like plan_makespan, but on a busy cluster spend fewer node requests on one request.

    Every node request costs its node ``overhead_s``, and on a busy cluster that time also
    delays whoever is queued after it. So the plan minimises its predicted finish plus
    ``penalty x (overheads of the nodes it uses) / len(nodes)``: with ``penalty`` 0 (an idle
    cluster) it is plan_makespan's plan. The search tries the ``k`` nodes that would finish
    the whole request first, for every ``k`` below the number plan_makespan uses, each split
    by plan_makespan; ties go to more nodes. It never uses more nodes than plan_makespan,
    and never finishes later than the best single node.
    """
    full = plan_makespan(units, nodes, start)
    if penalty <= 0 or len(full) <= 1:
        return full
    ranked = sorted(
        range(len(nodes)), key=lambda i: (share_time_s(nodes[i], units), nodes[i].per_unit_s, i)
    )
    latest = share_time_s(nodes[ranked[0]], units)  # the best single node's finish

    def cost(shares: list[Share]) -> float:
        finish = predicted_makespan_s(nodes, {share.node: share.count for share in shares})
        overheads = math.fsum(nodes[index[share.node]].overhead_s for share in shares)
        return finish + penalty * overheads / len(nodes)

    index = {node.name: i for i, node in enumerate(nodes)}
    best, best_cost = full, cost(full)
    for k in range(len(full) - 1, 0, -1):
        subset = [nodes[i] for i in sorted(ranked[:k])]  # list order keeps ranges in node order
        shares = plan_makespan(units, subset, start)
        if predicted_makespan_s(nodes, {s.node: s.count for s in shares}) > latest:
            continue
        shares_cost = cost(shares)
        if shares_cost < best_cost:
            best, best_cost = shares, shares_cost
    return best


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
