"""The bounds benchmarks compare against: the fluid bound and the best split into whole images."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from typing import Protocol

from sdproxy.core.planner import NodeLoad, plan_makespan, predicted_makespan_s


class Node(Protocol):
    """A simulated node's true speed."""

    @property
    def name(self) -> str: ...
    @property
    def per_image_s(self) -> float: ...
    @property
    def overhead_s(self) -> float: ...


def fluid_bound_s(nodes: Sequence[Node], images: int, requests: int = 1) -> float:
    """The earliest T at which the nodes together can have rendered ``images``.

    A node doing ``r`` node requests is busy ``r x overhead + n x per_image``; images are fluid
    (fractions allowed). One client request needs one node request on every node it uses; with
    ``requests`` concurrent client requests every one needs at least one node request, so the
    overheads paid add up to at least ``requests``. The bound is the best T over every way of
    spreading those node requests; for one request it is the plain fluid bound.
    """
    best = math.inf
    for spread in itertools.product(range(requests + 1), repeat=len(nodes)):
        if sum(spread) < requests or (requests == 1 and max(spread) > 1):
            continue
        used = [(node, r) for node, r in zip(nodes, spread, strict=True) if r]
        low = 0.0
        high = max(n.overhead_s * r for n, r in used) + images * min(n.per_image_s for n, _ in used)
        for _ in range(100):
            mid = (low + high) / 2
            done = sum(max(0.0, (mid - n.overhead_s * r) / n.per_image_s) for n, r in used)
            low, high = (low, mid) if done >= images else (mid, high)
        best = min(best, high)
    return best


def integer_optimum_s(nodes: Sequence[Node], images: int, requests: int = 1) -> float:
    """The best makespan with whole images and whole overheads, from the true speeds.

    For one request, sdproxy's planner is exact for this model (one node request per node,
    overhead plus per-image time). For ``requests`` concurrent requests of ``images / requests``
    each, known all at once: every (node, request) pair with images costs one overhead, nodes
    render their jobs back to back from time 0, and the bound is the least T for which a depth
    search over each request's split into whole images fits every node within T (binary search
    over the finite set of possible node finishing times). A lower bound for any online
    scheduler; no fluid fractions of images or of overheads.
    """
    if requests == 1:
        loads = [NodeLoad(n.name, n.overhead_s, n.per_image_s) for n in nodes]
        shares = plan_makespan(images, loads)
        return predicted_makespan_s(loads, {share.node: share.count for share in shares})
    each = images // requests
    splits = list(_compositions(each, len(nodes)))
    candidates = sorted(
        {
            r * n.overhead_s + k * n.per_image_s
            for n in nodes
            for r in range(1, requests + 1)
            for k in range(r, images + 1)
        }
    )

    def fits(limit: float) -> bool:
        caps = [
            [
                math.floor((limit - r * n.overhead_s) / n.per_image_s + 1e-9)
                for r in range(requests + 1)
            ]
            for n in nodes
        ]
        failed: set[tuple[int, tuple[int, ...], tuple[int, ...]]] = set()

        def place(left: int, used_r: tuple[int, ...], used_n: tuple[int, ...]) -> bool:
            if left == 0:
                return True
            if (left, used_r, used_n) in failed:
                return False
            for split in splits:
                r = tuple(u + (x > 0) for u, x in zip(used_r, split, strict=True))
                n = tuple(u + x for u, x in zip(used_n, split, strict=True))
                within = all(
                    c == 0 or c <= caps[i][k] for i, (k, c) in enumerate(zip(r, n, strict=True))
                )
                if within and place(left - 1, r, n):
                    return True
            failed.add((left, used_r, used_n))
            return False

        return place(requests, (0,) * len(nodes), (0,) * len(nodes))

    low, high = 0, len(candidates) - 1
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if fits(candidates[mid]) else (mid + 1, high)
    return candidates[low]


def _compositions(total: int, parts: int) -> Iterator[tuple[int, ...]]:
    """Every way to write ``total`` as ``parts`` non-negative integers, in order."""
    if parts == 1:
        yield (total,)
        return
    for first in range(total, -1, -1):
        for rest in _compositions(total - first, parts - 1):
            yield (first, *rest)
