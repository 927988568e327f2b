"""SharedState's benchmarks on a real redis-server: a result one replica shares, the others
take as it was; a finished benchmark leaves the node to the next benchmarker."""

from __future__ import annotations

from typing import Any

from sdproxy.cluster.benchmark import BenchmarkResult
from sdproxy.cluster.clock import LoopClock
from sdproxy.cluster.sharedstate import SharedState
from sdproxy.config import NodeSettings, SchedulerSettings
from tests.shared.conftest import OpenStore
from tests.support import wait_until

NODES = [NodeSettings.model_validate({"name": "gpu-a", "url": "http://gpu-a.internal:7860"})]
RESULT = BenchmarkResult(
    node="gpu-a",
    url="http://gpu-a.internal:7860",
    measured_at=1_700_000_000.5,
    checkpoint="v1-5-pruned-emaonly.safetensors [6ce0161689]",
    steps=20,
    width=512,
    height=512,
    runs=((1, 1.25), (4, 4.5)),
    overhead_s=0.2,
    per_image_s=1.05,
)


async def open_states(open_stores: OpenStore, *replica_ids: str) -> list[SharedState]:
    states = []
    for replica_id in replica_ids:
        store = await open_stores(replica_id)
        state = SharedState(NODES, SchedulerSettings(), LoopClock(), store)
        await state.start()
        states.append(state)
    return states


class TestSharedBenchmarks:
    """One replica benchmarks a node; every replica can use the result."""

    async def test_shared_benchmark_heard_and_read_back_as_a_result(
        self, open_stores: OpenStore
    ) -> None:
        """A result shared by one state reaches another, as data BenchmarkResult takes (the
        log's own fields are not in it), heard at once and read back later."""
        a, b = await open_states(open_stores, "a", "b")
        heard: list[dict[str, Any]] = []
        b.on_benchmark(lambda node, entry: heard.append(entry))
        a.share_benchmark("gpu-a", RESULT.to_json())
        await wait_until(lambda: bool(heard), what="b to hear the benchmark")
        stored = await b.shared_benchmark("gpu-a")
        assert stored is not None
        for data in (heard[0], stored):
            assert "url" not in data
            assert BenchmarkResult.from_json({**data, "url": RESULT.url}) == RESULT

    async def test_shared_benchmark_claim_given_back_when_done(
        self, open_stores: OpenStore
    ) -> None:
        """While one state benchmarks a node no other may; once it is done, another may."""
        a, b = await open_states(open_stores, "a", "b")
        assert await a.claim_benchmark("gpu-a")
        assert not await b.claim_benchmark("gpu-a")
        a.release_benchmark("gpu-a")
        await a.flush()
        assert await b.claim_benchmark("gpu-a")
