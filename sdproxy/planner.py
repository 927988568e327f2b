"""Pure: who renders which images. No I/O, no clocks, no randomness: same inputs, same plan."""

from __future__ import annotations

import math
from collections.abc import Sequence
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
    shares: list[Share] = []
    at = start
    for node, count in zip(nodes, counts, strict=True):
        if count:
            shares.append(Share(node.name, at, count))
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
