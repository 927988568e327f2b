"""Tests for the pure planner: makespan-optimal shares, load-aware plans, learning, chunking."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sdproxy.core.planner import (
    LEARNING_BUDGET,
    Chunk,
    NodeLoad,
    Share,
    Traffic,
    chunk_share,
    overhead_weight,
    plan_makespan,
    plan_under_load,
    predicted_makespan_s,
    share_time_s,
    vary_for_learning,
)


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


def proportional_counts(units: int, nodes: list[NodeLoad]) -> dict[str, int]:
    """Units in proportion to speed, rounded down, the rest one each from the first node."""
    total = math.fsum(1 / n.per_unit_s for n in nodes)
    counts = {n.name: math.floor(units / n.per_unit_s / total) for n in nodes}
    for name in list(counts)[: units - sum(counts.values())]:
        counts[name] += 1
    return counts


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
        proportional = predicted_makespan_s(nodes, proportional_counts(units, nodes))
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
    return math.fsum(
        (
            1
            if by_name[s.node].batch_limit is None or s.count <= (by_name[s.node].batch_limit or 0)
            else 2
        )
        * by_name[s.node].overhead_s
        for s in shares
    )


traffics = st.builds(
    Traffic,
    in_flight=st.integers(0, 40),
    finished_ago_s=st.lists(st.floats(0, 60), max_size=40).map(tuple),
)
BUSY = Traffic(in_flight=1)


class TestOverheadWeight:
    """overhead_weight: nothing when idle, in full when busy, more with a stream of requests."""

    def test_overhead_weight_idle_is_zero(self) -> None:
        """No backlog, nothing in flight, nothing finished lately: only the finish counts."""
        nodes = [NodeLoad("a", 0.3, 0.1), NodeLoad("b", 0.3, 0.2)]
        assert overhead_weight(4, nodes, Traffic()) == 0.0

    def test_overhead_weight_busy_counts_once(self) -> None:
        """A backlog: each overhead second counts in full; requests in flight add per node."""
        nodes = [NodeLoad("a", 0.3, 0.1, backlog_s=1.0), NodeLoad("b", 0.3, 0.2)]
        assert overhead_weight(4, nodes, Traffic()) == 1.0
        assert overhead_weight(4, nodes, Traffic(in_flight=1)) == 1.5
        assert overhead_weight(4, nodes[1:], Traffic(in_flight=2)) == 3.0

    def test_overhead_weight_background_work_is_not_busy(self) -> None:
        """A benchmark run in progress gives way: it delays this plan, it makes nobody wait."""
        nodes = [NodeLoad("a", 0.3, 0.1, backlog_s=0.3, background_s=0.3), NodeLoad("b", 0.3, 0.2)]
        assert overhead_weight(4, nodes, Traffic()) == 0.0
        behind = [NodeLoad("a", 0.3, 0.1, backlog_s=1.3, background_s=0.3), NodeLoad("b", 0.3, 0.2)]
        assert overhead_weight(4, behind, Traffic()) == 1.0

    def test_overhead_weight_adds_followers_within_the_horizon(self) -> None:
        """Requests that finished within the best whole finish count as followers."""
        nodes = [NodeLoad("a", 0.3, 0.1, backlog_s=1.0), NodeLoad("b", 0.3, 0.5)]
        # Whole on a: 1.0 + 0.3 + 0.4 = 1.7 s; on b: 2.3 s. Finishes 0.5 and 1.6 s ago count.
        traffic = Traffic(in_flight=3, finished_ago_s=(0.5, 1.6, 1.8, 9.0))
        assert overhead_weight(4, nodes, traffic) == 3.0
        assert overhead_weight(4, nodes, Traffic(in_flight=3)) == 2.5  # 3 in flight, 2 nodes

    def test_overhead_weight_one_client_in_a_loop_follows_nobody(self) -> None:
        """A request that just finished, and nothing else in flight: no follower."""
        nodes = [NodeLoad("a", 0.3, 0.1), NodeLoad("b", 0.3, 0.2)]
        assert overhead_weight(4, nodes, Traffic(finished_ago_s=(0.01,))) == 0.0
        assert Traffic(in_flight=2, finished_ago_s=(0.1, 0.2, 0.3)).followers(1.0) == 2


class TestPlanUnderLoad:
    """plan_under_load pays for each node request's overhead as the traffic makes it cost."""

    @given(units=st.integers(0, 300), nodes=loads, start=st.integers(0, 50), traffic=traffics)
    def test_plan_under_load_tiles_the_range(
        self, units: int, nodes: list[NodeLoad], start: int, traffic: Traffic
    ) -> None:
        """Shares are contiguous from start, non-empty, and sum exactly to units."""
        at = start
        for share in plan_under_load(units, nodes, start, traffic=traffic):
            assert share.start == at
            assert share.count > 0
            at = share.stop
        assert at == start + units

    @given(units=st.integers(0, 300), nodes=loads, start=st.integers(0, 50))
    def test_plan_under_load_idle_is_plan_makespan(
        self, units: int, nodes: list[NodeLoad], start: int
    ) -> None:
        """An idle cluster gets exactly plan_makespan's plan."""
        idle = [NodeLoad(n.name, n.overhead_s, n.per_unit_s, 0.0, n.batch_limit) for n in nodes]
        assert plan_under_load(units, idle, start) == plan_makespan(units, idle, start)

    @given(units=st.integers(1, 300), nodes=loads, traffic=traffics)
    def test_plan_under_load_uses_no_more_nodes(
        self, units: int, nodes: list[NodeLoad], traffic: Traffic
    ) -> None:
        """Never more nodes than plan_makespan uses."""
        loaded = plan_under_load(units, nodes, traffic=traffic)
        assert len(loaded) <= len(plan_makespan(units, nodes))

    @given(units=st.integers(1, 300), nodes=loads, traffic=traffics)
    def test_plan_under_load_beats_every_single_node(
        self, units: int, nodes: list[NodeLoad], traffic: Traffic
    ) -> None:
        """Its predicted finish is never later than any one node rendering everything."""
        planned = predicted_makespan_s(
            nodes, counts_of(plan_under_load(units, nodes, traffic=traffic))
        )
        for node in nodes:
            assert planned <= share_time_s(node, units) + 1e-9

    @given(units=st.integers(1, 300), nodes=loads, traffic=traffics)
    def test_plan_under_load_cost_no_worse_than_makespan_or_whole(
        self, units: int, nodes: list[NodeLoad], traffic: Traffic
    ) -> None:
        """Finish plus weighted overheads is never above plan_makespan's nor the best whole's."""
        weight = overhead_weight(units, nodes, traffic)

        def cost(shares: list[Share]) -> float:
            finish = predicted_makespan_s(nodes, counts_of(shares))
            return finish + weight * overheads_of(nodes, shares)

        planned = cost(plan_under_load(units, nodes, traffic=traffic))
        best_whole = min(nodes, key=lambda n: share_time_s(n, units))
        assert planned <= cost(plan_makespan(units, nodes)) + 1e-9
        assert planned <= cost([Share(best_whole.name, 0, units)]) + 1e-9

    @given(units=st.integers(0, 200), nodes=loads, traffic=traffics)
    def test_plan_under_load_is_deterministic(
        self, units: int, nodes: list[NodeLoad], traffic: Traffic
    ) -> None:
        """Equal inputs give equal plans."""
        assert plan_under_load(units, nodes, traffic=traffic) == plan_under_load(
            units, list(nodes), traffic=traffic
        )

    def test_plan_under_load_drops_slow_node_when_busy(self) -> None:
        """Speeds 1:2:4, 0.3 s overheads, 4 images: a second node is not worth its overhead."""
        nodes = [NodeLoad("a", 0.3, 0.2), NodeLoad("b", 0.3, 0.1), NodeLoad("c", 0.3, 0.05)]
        assert counts_of(plan_makespan(4, nodes)) == {"b": 1, "c": 3}
        assert counts_of(plan_under_load(4, nodes, traffic=BUSY)) == {"c": 4}

    def test_plan_under_load_keeps_split_that_pays(self) -> None:
        """Two equal nodes with small overhead and a big request still split it when busy."""
        nodes = [NodeLoad("a", 0.1, 1.0), NodeLoad("b", 0.1, 1.0)]
        assert counts_of(plan_under_load(16, nodes, traffic=BUSY)) == {"a": 8, "b": 8}

    def test_plan_under_load_steady_stream_goes_whole(self) -> None:
        """The issue's case: batch 4 at 1024x1024 under 8 clients goes whole, not split."""
        # 0.1/0.2/0.4 s per 512x512 image: 0.4/0.8/1.6 s per 1024x1024 image, all backlogged.
        nodes = [
            NodeLoad("a", 0.3, 0.4, backlog_s=5.0),
            NodeLoad("b", 0.3, 0.8, backlog_s=3.0),
            NodeLoad("c", 0.3, 1.6, backlog_s=2.0),
        ]
        burst = plan_under_load(4, nodes, traffic=Traffic(in_flight=1))
        assert len(burst) == 2  # no recent finishes, little in flight: split to end it early
        stream = Traffic(in_flight=7, finished_ago_s=(0.1, 1.0, 2.0, 3.1, 4.0, 5.5, 6.0))
        assert plan_under_load(4, nodes, traffic=stream) == [Share("b", 0, 4)]

    def test_plan_under_load_big_request_still_splits_in_a_stream(self) -> None:
        """A request that ends much sooner split is split even while requests keep coming."""
        nodes = [NodeLoad(n, 0.3, 0.4, backlog_s=2.0) for n in ("a", "b", "c")]
        stream = Traffic(in_flight=4, finished_ago_s=(1.0, 2.0, 3.0))
        assert len(plan_under_load(30, nodes, traffic=stream)) == 3


class TestPlanMakespanErrors:
    """plan_makespan refuses what is a programming error, not an empty plan."""

    def test_plan_makespan_rejects_no_nodes(self) -> None:
        """Planning onto no node raises."""
        with pytest.raises(ValueError, match="no nodes"):
            plan_makespan(3, [])

    def test_plan_makespan_rejects_negative_units(self) -> None:
        """A negative count raises."""
        with pytest.raises(ValueError, match="units"):
            plan_makespan(-1, [NodeLoad("a", 0.1, 0.1)])


def with_seen(nodes: list[NodeLoad], seen: list[float | None]) -> list[NodeLoad]:
    return [
        NodeLoad(n.name, n.overhead_s, n.per_unit_s, n.backlog_s, n.batch_limit, s)
        for n, s in zip(nodes, seen, strict=True)
    ]


class TestVaryForLearning:
    """vary_for_learning gives a node seen at one size another, within a bounded cost."""

    @given(
        units=st.integers(1, 200),
        nodes=loads,
        seen=st.lists(st.one_of(st.none(), st.floats(0.5, 100)), min_size=6, max_size=6),
        start=st.integers(0, 50),
    )
    def test_vary_for_learning_tiles_and_bounds_the_cost(
        self, units: int, nodes: list[NodeLoad], seen: list[float | None], start: int
    ) -> None:
        """Same range, contiguous, and a predicted makespan within the budget of the plan's."""
        nodes = with_seen(nodes, seen[: len(nodes)])
        shares = plan_makespan(units, nodes, start)
        varied = vary_for_learning(shares, nodes)
        at = start
        for share in varied:
            assert share.start == at
            assert share.count > 0
            at = share.stop
        assert at == start + units
        before = predicted_makespan_s(nodes, counts_of(shares))
        assert (
            predicted_makespan_s(nodes, counts_of(varied)) <= before * (1 + LEARNING_BUDGET) + 1e-9
        )

    @given(units=st.integers(1, 200), nodes=loads)
    def test_vary_for_learning_leaves_known_slopes_alone(
        self, units: int, nodes: list[NodeLoad]
    ) -> None:
        """Without a node seen at one size, the plan is unchanged."""
        shares = plan_makespan(units, nodes)
        assert vary_for_learning(shares, nodes) == shares

    def test_vary_for_learning_moves_a_node_off_its_one_size(self) -> None:
        """9 units on two equal nodes go 5/4; b, seen only at 4, gets 5 at no cost."""
        nodes = with_seen([NodeLoad("a", 0.3, 0.1), NodeLoad("b", 0.3, 0.1)], [None, 4.0])
        shares = plan_makespan(9, nodes)
        assert counts_of(shares) == {"a": 5, "b": 4}
        varied = vary_for_learning(shares, nodes)
        assert varied == [Share("a", 0, 4), Share("b", 4, 5)]

    def test_vary_for_learning_refuses_a_costly_change(self) -> None:
        """When a new size would cost more than the budget, the plan stays."""
        nodes = with_seen([NodeLoad("a", 0.0, 1.0), NodeLoad("b", 0.0, 1.0)], [2.0, None])
        shares = plan_makespan(4, nodes)
        assert vary_for_learning(shares, nodes) == shares

    def test_vary_for_learning_leaves_a_whole_request(self) -> None:
        """One share stays one share: varying it would take another node request."""
        nodes = with_seen([NodeLoad("a", 0.3, 0.1), NodeLoad("b", 5.0, 0.1)], [4.0, None])
        shares = plan_makespan(4, nodes)
        assert shares == [Share("a", 0, 4)]
        assert vary_for_learning(shares, nodes) == shares
