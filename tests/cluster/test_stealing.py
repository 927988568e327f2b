"""Work stealing: an idle node takes over the tail of a waiting job when that ends it sooner."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from hypothesis import given, settings
from hypothesis import strategies as st

from sdproxy.cluster import stealing
from sdproxy.cluster.forecast import Forecast
from sdproxy.cluster.lanes import Lane
from sdproxy.cluster.state import MemoryState
from sdproxy.cluster.work import Job, Run
from sdproxy.config import Settings
from sdproxy.core.planner import Chunk, Share, chunk_share
from sdproxy.core.request import Seeds, parse_generation
from sdproxy.core.speed import SpeedEstimate
from sdproxy.errors import NodeRaised
from tests.cluster.fakes import FakeClock
from tests.support import SMALL


class Host:
    """Lanes over nodes of known speed, as the cluster would give stealing."""

    def __init__(self, per_image_s: dict[str, float], overhead_s: float = 0.0) -> None:
        config = Settings.model_validate(
            {
                "nodes": [
                    {"name": n, "url": f"http://127.0.0.1:{i + 1}"}
                    for i, n in enumerate(per_image_s)
                ]
            }
        )
        self.clock = FakeClock()
        self.state = MemoryState(config.nodes, config.scheduler, self.clock)
        for name, seconds in per_image_s.items():
            self.state.record_ok(name)
            # per_unit_s is per 20-step 512x512 image: SMALL images are 1/64 of one.
            estimate = SpeedEstimate(overhead_s, seconds * 64, 4, "benchmark")
            self.state.set_benchmark(name, estimate, (1 / 64, 4 / 64))
        self.forecast = Forecast(self.state, {n.name: n for n in config.nodes}, config.scheduler)
        self.lanes = {name: Lane(name, self) for name in per_image_s}
        self.barred: set[str] = set()

    # the lanes' host (only what backlogs use)
    def predict_s(self, node: str, work: float, requests: int = 1) -> float:
        return self.forecast.predict_s(node, work, requests)

    def queue_changed(self, lane: Lane) -> None:
        return

    def usable(self, node: str) -> bool:
        return self.state.usable(node)

    def turn(self, node: str, priority: float) -> AbstractAsyncContextManager[None]:
        return self._nothing()

    @asynccontextmanager
    async def _nothing(self) -> AsyncIterator[None]:
        yield

    def rebalance(self) -> bool:
        return False

    async def run_job(self, lane: Lane, job: Job) -> None:
        raise AssertionError("nothing runs in these tests")

    def job_crashed(self, lane: Lane, job: Job, error: Exception) -> None:
        raise AssertionError("nothing runs in these tests")

    def redispatch(self, job: Job) -> None:
        raise AssertionError("nothing runs in these tests")

    # stealing's host
    def may_render(self, node: str, job: Job) -> bool:
        return node not in self.barred

    def jobs_for(
        self, run: Run, share: Share, blame: tuple[str, NodeRaised] | None = None
    ) -> list[Job]:
        return [
            Job(run, chunk, blame=blame) for chunk in chunk_share(share, run.request.batch_size)
        ]


def waiting_job(host: Host, node: str, images: int, *, start: int = 0) -> Job:
    request = parse_generation("txt2img", {"batch_size": images, **SMALL}, max_images=1000)
    run = Run(request, Seeds(1, 2), remaining=images)
    job = Job(run, Chunk(start, images, 1))
    host.lanes[node].submit(job)
    return job


def covered(host: Host, run: Run) -> list[int]:
    """Image indices of ``run`` queued anywhere, in order."""
    return sorted(
        k
        for lane in host.lanes.values()
        for job in lane.pending
        if job.run is run
        for k in range(job.chunk.start, job.chunk.start + job.images)
    )


class TestSteal:
    """An idle lane takes the tail that ends the job earliest; the rest stays in place."""

    def test_idle_fast_node_takes_the_tail_of_a_slow_nodes_job(self) -> None:
        """8 images waiting on a node 3x slower: the idle node takes the last 6."""
        host = Host({"slow": 0.3, "fast": 0.1})
        job = waiting_job(host, "slow", 8)
        assert stealing.rebalance(host, host.clock.now())
        slow, fast = host.lanes["slow"].pending, host.lanes["fast"].pending
        assert [(j.chunk.start, j.images) for j in slow] == [(0, 2)]
        assert [(j.chunk.start, j.images) for j in fast] == [(2, 6)]
        assert not job.live
        assert covered(host, job.run) == list(range(8))

    def test_no_steal_when_it_saves_nothing(self) -> None:
        """With a large overhead a one-image job stays where it is."""
        host = Host({"a": 0.1, "b": 0.1}, overhead_s=5.0)
        job = waiting_job(host, "a", 1)
        assert not stealing.rebalance(host, host.clock.now())
        assert list(host.lanes["a"].pending) == [job]

    def test_whole_interrupted_and_barred_jobs_stay(self) -> None:
        """Unsplit and interrupted jobs, and nodes routing bars, are never given work."""
        host = Host({"slow": 1.0, "fast": 0.1})
        whole = waiting_job(host, "slow", 4)
        whole.whole = True
        interrupted = waiting_job(host, "slow", 4)
        interrupted.run.interrupted = True
        assert not stealing.rebalance(host, host.clock.now())
        host.barred.add("fast")
        waiting_job(host, "slow", 4)
        assert not stealing.rebalance(host, host.clock.now())

    def test_blame_travels_with_the_stolen_images(self) -> None:
        """Images retried after a webui 500 keep naming the node they raised on."""
        host = Host({"slow": 0.3, "fast": 0.1})
        job = waiting_job(host, "slow", 8)
        blame = (
            "other",
            NodeRaised("other", {"error": "E", "detail": "", "body": "", "errors": "x"}),
        )
        job.blame = blame
        stealing.rebalance(host, host.clock.now())
        assert all(j.blame == blame for lane in host.lanes.values() for j in lane.pending)

    @settings(max_examples=60, deadline=None)
    @given(
        images=st.integers(1, 24),
        start=st.integers(0, 50),
        speeds=st.lists(st.floats(0.05, 2.0), min_size=2, max_size=4),
    )
    def test_stealing_never_loses_or_duplicates_an_image(
        self, images: int, start: int, speeds: list[float]
    ) -> None:
        """Whatever moves, the job's images stay covered exactly once, contiguous per node."""
        host = Host({f"n{i}": s for i, s in enumerate(speeds)})
        job = waiting_job(host, "n0", images, start=start)
        stealing.rebalance(host, host.clock.now())
        assert covered(host, job.run) == list(range(start, start + images))
        for lane in host.lanes.values():
            ranges = [(j.chunk.start, j.images) for j in lane.pending]
            for (first, count), (after, _) in itertools.pairwise(ranges):
                assert first + count == after
