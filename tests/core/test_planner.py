"""Tests for the pure planner: makespan-optimal and proportional shares, request chunking."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sdproxy.core.planner import (
    Chunk,
    NodeCapacity,
    NodeLoad,
    Share,
    chunk_share,
    plan_makespan,
    plan_split,
    plan_under_load,
    predicted_makespan_s,
    share_time_s,
)

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


loads = st.lists(
    st.builds(
        lambda i, overhead, per_unit, backlog, limit: (i, overhead, per_unit, backlog, limit),
        st.just(0),
        st.floats(0, 5),
        st.floats(0.01, 10),
        st.floats(0, 20),
        st.one_of(st.none(), st.integers(1, 8)),
    ),
    min_size=1,
    max_size=6,
).map(
    lambda rows: [
        NodeLoad(f"n{i}", overhead, per_unit, backlog, limit)
        for i, (_, overhead, per_unit, backlog, limit) in enumerate(rows)
    ]
)


def counts_of(shares: list[Share]) -> dict[str, int]:
    return {share.node: share.count for share in shares}


class TestPlanMakespan:
    """plan_makespan gives integer shares that finish the request as early as predicted possible."""

    @given(units=st.integers(0, 300), nodes=loads, start=st.integers(0, 50))
    def test_plan_makespan_tiles_the_range(
        self, units: int, nodes: list[NodeLoad], start: int
    ) -> None:
        """Shares are contiguous from start, non-empty, and sum exactly to units."""
        at = start
        for share in plan_makespan(units, nodes, start):
            assert share.start == at
            assert share.count > 0
            at = share.stop
        assert at == start + units

    @given(units=st.integers(1, 300), nodes=loads)
    def test_plan_makespan_beats_proportional_split(
        self, units: int, nodes: list[NodeLoad]
    ) -> None:
        """Never later than the split proportional to speed (1 / per-unit time)."""
        planned = predicted_makespan_s(nodes, counts_of(plan_makespan(units, nodes)))
        speeds = [NodeCapacity(n.name, 1 / n.per_unit_s) for n in nodes]
        proportional = predicted_makespan_s(nodes, counts_of(plan_split(units, speeds)))
        assert planned <= proportional + 1e-9

    @given(units=st.integers(1, 300), nodes=loads)
    def test_plan_makespan_beats_every_single_node(self, units: int, nodes: list[NodeLoad]) -> None:
        """Never later than any one node rendering everything."""
        planned = predicted_makespan_s(nodes, counts_of(plan_makespan(units, nodes)))
        for node in nodes:
            assert planned <= share_time_s(node, units) + 1e-9

    @given(units=st.integers(1, 40), nodes=loads.filter(lambda ns: len(ns) <= 3))
    def test_plan_makespan_is_optimal_for_small_cases(
        self, units: int, nodes: list[NodeLoad]
    ) -> None:
        """Exhaustive search over every split finds nothing earlier."""
        planned = predicted_makespan_s(nodes, counts_of(plan_makespan(units, nodes)))
        best = math.inf
        for split in itertools.product(range(units + 1), repeat=len(nodes) - 1):
            rest = units - sum(split)
            if rest < 0:
                continue
            counts = {n.name: c for n, c in zip(nodes, [*split, rest], strict=True)}
            best = min(best, predicted_makespan_s(nodes, counts))
        assert planned <= best + 1e-9

    @given(units=st.integers(0, 200), nodes=loads)
    def test_plan_makespan_is_deterministic(self, units: int, nodes: list[NodeLoad]) -> None:
        """Equal inputs give equal plans."""
        assert plan_makespan(units, nodes) == plan_makespan(units, list(nodes))

    def test_plan_makespan_skips_node_that_is_a_net_loss(self) -> None:
        """A node whose overhead alone outlasts the others' whole share gets nothing."""
        nodes = [NodeLoad("fast", 0.1, 0.1), NodeLoad("laggy", 5.0, 0.1)]
        assert counts_of(plan_makespan(8, nodes)) == {"fast": 8}

    def test_plan_makespan_small_request_goes_to_one_node(self) -> None:
        """One image goes to the node that finishes it first, whatever the list order."""
        nodes = [NodeLoad("slow", 0.2, 2.0), NodeLoad("fast", 0.2, 0.5)]
        assert plan_makespan(1, nodes) == [Share("fast", 0, 1)]

    def test_plan_makespan_counts_backlog(self) -> None:
        """A busy fast node gets less than an idle one of the same speed."""
        nodes = [NodeLoad("busy", 0.0, 1.0, backlog_s=4.0), NodeLoad("idle", 0.0, 1.0)]
        assert counts_of(plan_makespan(8, nodes)) == {"busy": 2, "idle": 6}

    def test_plan_makespan_remainder_to_earliest_finisher(self) -> None:
        """Speeds 1:2:4 with 8 units: the remainder goes where it finishes first."""
        nodes = [NodeLoad("a", 0.0, 4.0), NodeLoad("b", 0.0, 2.0), NodeLoad("c", 0.0, 1.0)]
        # Quotas 1.14/2.29/4.57: c finishes a 5th unit at 5, b a 3rd at 6, a a 2nd at 8.
        assert counts_of(plan_makespan(8, nodes)) == {"a": 1, "b": 2, "c": 5}


def overheads_of(nodes: list[NodeLoad], shares: list[Share]) -> float:
    by_name = {node.name: node for node in nodes}
    return math.fsum(by_name[share.node].overhead_s for share in shares)


class TestPlanUnderLoad:
    """plan_under_load trades a little finish time for fewer node requests on a busy cluster."""

    @given(
        units=st.integers(0, 300), nodes=loads, start=st.integers(0, 50), penalty=st.floats(0, 3)
    )
    def test_plan_under_load_tiles_the_range(
        self, units: int, nodes: list[NodeLoad], start: int, penalty: float
    ) -> None:
        """Shares are contiguous from start, non-empty, and sum exactly to units."""
        at = start
        for share in plan_under_load(units, nodes, start, penalty=penalty):
            assert share.start == at
            assert share.count > 0
            at = share.stop
        assert at == start + units

    @given(units=st.integers(0, 300), nodes=loads, start=st.integers(0, 50))
    def test_plan_under_load_without_penalty_is_plan_makespan(
        self, units: int, nodes: list[NodeLoad], start: int
    ) -> None:
        """An idle cluster (penalty 0) gets exactly plan_makespan's plan."""
        assert plan_under_load(units, nodes, start, penalty=0.0) == plan_makespan(
            units, nodes, start
        )

    @given(units=st.integers(1, 300), nodes=loads, penalty=st.floats(0.01, 3))
    def test_plan_under_load_uses_no_more_nodes(
        self, units: int, nodes: list[NodeLoad], penalty: float
    ) -> None:
        """Never more nodes than plan_makespan uses."""
        loaded = plan_under_load(units, nodes, penalty=penalty)
        assert len(loaded) <= len(plan_makespan(units, nodes))

    @given(units=st.integers(1, 300), nodes=loads, penalty=st.floats(0.01, 3))
    def test_plan_under_load_beats_every_single_node(
        self, units: int, nodes: list[NodeLoad], penalty: float
    ) -> None:
        """Its predicted finish is never later than any one node rendering everything."""
        planned = predicted_makespan_s(
            nodes, counts_of(plan_under_load(units, nodes, penalty=penalty))
        )
        for node in nodes:
            assert planned <= share_time_s(node, units) + 1e-9

    @given(units=st.integers(1, 300), nodes=loads, penalty=st.floats(0.01, 3))
    def test_plan_under_load_no_worse_objective_than_plan_makespan(
        self, units: int, nodes: list[NodeLoad], penalty: float
    ) -> None:
        """Finish plus penalised overheads is never above plan_makespan's."""

        def cost(shares: list[Share]) -> float:
            finish = predicted_makespan_s(nodes, counts_of(shares))
            return finish + penalty * overheads_of(nodes, shares) / len(nodes)

        full = plan_makespan(units, nodes)
        assert cost(plan_under_load(units, nodes, penalty=penalty)) <= cost(full) + 1e-9

    @given(units=st.integers(0, 200), nodes=loads, penalty=st.floats(0, 3))
    def test_plan_under_load_is_deterministic(
        self, units: int, nodes: list[NodeLoad], penalty: float
    ) -> None:
        """Equal inputs give equal plans."""
        assert plan_under_load(units, nodes, penalty=penalty) == plan_under_load(
            units, list(nodes), penalty=penalty
        )

    def test_plan_under_load_drops_slow_node_when_busy(self) -> None:
        """Speeds 1:2:4, 0.3 s overheads, 4 images: a second node is not worth its overhead."""
        nodes = [NodeLoad("a", 0.3, 0.2), NodeLoad("b", 0.3, 0.1), NodeLoad("c", 0.3, 0.05)]
        assert counts_of(plan_makespan(4, nodes)) == {"b": 1, "c": 3}
        assert counts_of(plan_under_load(4, nodes, penalty=1.0)) == {"c": 4}

    def test_plan_under_load_keeps_split_that_pays(self) -> None:
        """Two equal nodes with small overhead and a big request still split it."""
        nodes = [NodeLoad("a", 0.1, 1.0), NodeLoad("b", 0.1, 1.0)]
        assert counts_of(plan_under_load(16, nodes, penalty=1.0)) == {"a": 8, "b": 8}
