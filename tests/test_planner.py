"""Tests for the pure planner: proportional integer shares and request chunking."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sdproxy.planner import Chunk, NodeCapacity, Share, chunk_share, plan_split

weights = st.floats(min_value=0.01, max_value=100, allow_nan=False)
capacities = st.lists(weights, min_size=1, max_size=6).map(
    lambda ws: [NodeCapacity(f"n{i}", w) for i, w in enumerate(ws)]
)


class TestPlanSplit:
    """plan_split divides units by weight into contiguous integer shares."""

    @pytest.mark.parametrize(
        ("units", "node_weights", "expected"),
        [
            (12, [1, 1, 1], [4, 4, 4]),
            (5, [1, 1], [3, 2]),
            (7, [4, 2, 1], [4, 2, 1]),
            (1, [1, 3], [0, 1]),
            (10, [1, 2, 2], [2, 4, 4]),
            (0, [1, 1], [0, 0]),
        ],
    )
    def test_plan_split_table(
        self, units: int, node_weights: list[float], expected: list[int]
    ) -> None:
        """Known splits: exact quotas, remainders to the largest fraction, then the faster."""
        nodes = [NodeCapacity(f"n{i}", w) for i, w in enumerate(node_weights)]
        got = {s.node: s.count for s in plan_split(units, nodes)}
        assert [got.get(f"n{i}", 0) for i in range(len(nodes))] == expected

    @given(units=st.integers(0, 500), nodes=capacities, start=st.integers(0, 50))
    def test_plan_split_tiles_the_range(
        self, units: int, nodes: list[NodeCapacity], start: int
    ) -> None:
        """Shares are contiguous from start, non-empty, and sum exactly to units."""
        shares = plan_split(units, nodes, start)
        at = start
        for share in shares:
            assert share.start == at
            assert share.count > 0
            at = share.stop
        assert at == start + units

    @given(units=st.integers(0, 500), nodes=capacities)
    def test_plan_split_stays_within_one_of_quota(
        self, units: int, nodes: list[NodeCapacity]
    ) -> None:
        """Every node's count is its exact quota rounded down or up."""
        total = sum(n.weight for n in nodes)
        counts = {s.node: s.count for s in plan_split(units, nodes)}
        for node in nodes:
            quota = units * node.weight / total
            assert quota - 1 < counts.get(node.name, 0) < quota + 1

    @given(units=st.integers(0, 200), nodes=capacities)
    def test_plan_split_is_deterministic(self, units: int, nodes: list[NodeCapacity]) -> None:
        """Equal inputs give equal plans."""
        assert plan_split(units, nodes) == plan_split(units, list(nodes))

    def test_plan_split_rejects_no_nodes(self) -> None:
        """Planning onto no node is a programming error, not an empty plan."""
        with pytest.raises(ValueError, match="no nodes"):
            plan_split(3, [])


class TestChunkShare:
    """chunk_share cuts a share into at most two requests within the batch limit."""

    @pytest.mark.parametrize(
        ("count", "limit", "expected"),
        [
            (4, 8, [Chunk(10, 4, 1)]),
            (8, 4, [Chunk(10, 4, 2)]),
            (10, 4, [Chunk(10, 4, 2), Chunk(18, 2, 1)]),
            (3, 1, [Chunk(10, 1, 3)]),
        ],
    )
    def test_chunk_share_table(self, count: int, limit: int, expected: list[Chunk]) -> None:
        """Full batches go as batch x n_iter, the remainder as one more request."""
        assert chunk_share(Share("a", 10, count), limit) == expected

    @given(start=st.integers(0, 100), count=st.integers(1, 300), limit=st.integers(1, 16))
    def test_chunk_share_covers_share(self, start: int, count: int, limit: int) -> None:
        """Chunks tile the share in order, none exceeds the limit, at most two of them."""
        chunks = chunk_share(Share("a", start, count), limit)
        assert len(chunks) <= 2
        at = start
        for chunk in chunks:
            assert chunk.start == at
            assert 1 <= chunk.batch_size <= limit
            at += chunk.images
        assert at == start + count
