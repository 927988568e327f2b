"""A node's lane: one job at a time, client work before background work, nothing lost."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import pytest

from sdproxy.cluster.lanes import BACKGROUND_AFTER_IDLE_S, Background, Lane
from sdproxy.cluster.work import Job, Run
from sdproxy.core.planner import Chunk
from sdproxy.core.request import Seeds, parse_generation
from tests.cluster.fakes import FakeClock, settle
from tests.support import SMALL


def make_run(images: int = 4) -> Run:
    request = parse_generation("txt2img", {"batch_size": images, **SMALL}, max_images=100)
    return Run(request, Seeds(1, 2), remaining=images)


class Host:
    """A LaneHost whose jobs end when the test says so."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.up = True
        self.started: list[Job] = []
        self.finish: dict[Job, asyncio.Future[None]] = {}
        self.crashed: list[tuple[Job, Exception]] = []
        self.redispatched: list[Job] = []
        self.changes = 0
        self.priorities: list[float] = []  # of each turn taken
        self._lock = asyncio.Lock()

    def usable(self, node: str) -> bool:
        return self.up

    def predict_s(self, node: str, work: float, requests: int = 1) -> float:
        return requests * 1.0 + work  # 1 s overhead, 1 s a unit of work

    def turn(self, node: str, priority: float) -> AbstractAsyncContextManager[None]:
        self.priorities.append(priority)
        return self._hold()

    @asynccontextmanager
    async def _hold(self) -> AsyncIterator[None]:
        async with self._lock:
            yield

    def rebalance(self) -> bool:
        return False

    async def run_job(self, lane: Lane, job: Job) -> None:
        self.started.append(job)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.finish[job] = done
        await done
        job.retire()

    def job_crashed(self, lane: Lane, job: Job, error: Exception) -> None:
        self.crashed.append((job, error))
        job.retire()

    def redispatch(self, job: Job) -> None:
        self.redispatched.append(job)
        job.retire()

    def queue_changed(self, lane: Lane) -> None:
        self.changes += 1


@pytest.fixture
async def running() -> AsyncIterator[tuple[Lane, Host]]:
    host = Host()
    lane = Lane("a", host)
    task = asyncio.create_task(lane.run_forever())
    yield lane, host
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


class TestOrder:
    """Jobs run one at a time, first come first served."""

    async def test_lane_runs_one_job_at_a_time_in_order(self, running: tuple[Lane, Host]) -> None:
        """The second job starts only when the first has ended."""
        lane, host = running
        first, second = (Job(make_run(), Chunk(0, 2, 1)) for _ in range(2))
        lane.submit(first)
        lane.submit(second)
        await settle()
        assert host.started == [first]
        assert lane.running is first
        assert list(lane.pending) == [second]
        host.finish[first].set_result(None)
        await settle()
        assert host.started == [first, second]

    async def test_lane_skips_jobs_of_finished_runs(self, running: tuple[Lane, Host]) -> None:
        """A job whose request was answered meanwhile is retired, never sent."""
        lane, host = running
        blocker, stale = Job(make_run(), Chunk(0, 1, 1)), Job(make_run(), Chunk(0, 1, 1))
        lane.submit(blocker)
        lane.submit(stale)
        await settle()
        stale.run.abandon()
        host.finish[blocker].set_result(None)
        await settle()
        assert host.started == [blocker]
        assert not stale.live

    async def test_lane_hands_back_jobs_when_its_node_goes(
        self, running: tuple[Lane, Host]
    ) -> None:
        """A job queued before the node went down is redispatched, not sent to it."""
        lane, host = running
        blocker, queued = Job(make_run(), Chunk(0, 1, 1)), Job(make_run(), Chunk(0, 1, 1))
        lane.submit(blocker)
        lane.submit(queued)
        await settle()
        host.up = False
        host.finish[blocker].set_result(None)
        await settle()
        assert host.redispatched == [queued]
        assert host.started == [blocker]


class TestBackground:
    """Background work (benchmark runs) gives way to client work."""

    async def test_background_waits_for_client_jobs(self, running: tuple[Lane, Host]) -> None:
        """Queued behind a client job, it runs only once no client job has come for a while."""
        lane, host = running
        ran: list[str] = []

        async def bench() -> None:
            ran.append("bench")

        first, second = Job(make_run(), Chunk(0, 1, 1)), Job(make_run(), Chunk(0, 1, 1))
        lane.submit(first)
        await settle()
        lane.submit_background(Background(1.0, bench))
        lane.submit(second)
        host.finish[first].set_result(None)
        await settle()
        assert ran == []
        assert host.started == [first, second]
        host.finish[second].set_result(None)
        await host.clock.advance(BACKGROUND_AFTER_IDLE_S * 0.9)
        assert ran == []  # clients send requests in runs: background waits for a quiet spell
        await host.clock.advance(BACKGROUND_AFTER_IDLE_S * 0.2)
        assert ran == ["bench"]

    async def test_client_job_preempts_running_background(self, running: tuple[Lane, Host]) -> None:
        """A client job arriving stops the background run (its preempt), and waits for that."""
        lane, host = running
        bench_done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        interrupt_done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        calls: list[str] = []

        async def bench() -> None:
            await bench_done

        async def preempt() -> None:
            calls.append("interrupt")
            await interrupt_done

        lane.submit_background(Background(1.0, bench, preempt=preempt))
        await settle()
        job = Job(make_run(), Chunk(0, 1, 1))
        lane.submit(job)
        await settle()
        assert calls == ["interrupt"]
        bench_done.set_result(None)  # the node stopped the run and answered
        await settle()
        assert host.started == []  # the interrupt call is not done: the turn is still held
        interrupt_done.set_result(None)
        await settle()
        assert host.started == [job]

    async def test_backlog_counts_running_background_not_queued(self) -> None:
        """The run in progress delays client work; runs still queued do not."""
        host = Host()
        lane = Lane("a", host)
        gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def bench() -> None:
            await gate

        lane.submit_background(Background(2.0, bench))
        lane.submit_background(Background(2.0, bench))
        assert lane.backlog_s(host.clock.now()) == 0.0
        task = asyncio.create_task(lane.run_forever())
        await settle()
        assert lane.backlog_s(host.clock.now()) == pytest.approx(3.0)  # 1 s + 2 units
        await host.clock.advance(1.0)
        assert lane.backlog_s(host.clock.now()) == pytest.approx(2.0)
        gate.set_result(None)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


class TestSupervision:
    """A job whose handling raises is reported and the lane goes on."""

    async def test_lane_reports_a_crash_and_runs_the_next_job(
        self, running: tuple[Lane, Host], caplog: pytest.LogCaptureFixture
    ) -> None:
        """KeyError from the handling: job_crashed gets it, logged once, next job runs."""
        lane, host = running
        first, second = Job(make_run(), Chunk(0, 1, 1)), Job(make_run(), Chunk(0, 1, 1))
        lane.submit(first)
        lane.submit(second)
        await settle()
        host.finish[first].set_exception(KeyError("boom"))
        await settle()
        assert [(job, type(error)) for job, error in host.crashed] == [(first, KeyError)]
        assert host.started == [first, second]
        crashes = [r for r in caplog.records if "unexpected error" in r.getMessage()]
        assert len(crashes) == 1
        assert crashes[0].exc_info is not None


class TestPriority:
    """A lane asks for its node's turn with the start of the oldest request it holds."""

    async def test_the_oldest_waiting_request_sets_the_priority(
        self, running: tuple[Lane, Host]
    ) -> None:
        lane, host = running
        newer, older = make_run(), make_run()
        newer.started_at, older.started_at = 2000.0, 1000.0
        lane.submit(Job(newer, Chunk(0, 1, 1)))
        await settle()
        lane.submit(Job(newer, Chunk(1, 1, 1)))
        lane.submit(Job(older, Chunk(0, 1, 1)))
        host.finish[host.started[0]].set_result(None)
        await settle()
        assert host.priorities == [2000.0, 1000.0]

    async def test_background_work_stands_behind_client_work(
        self, running: tuple[Lane, Host]
    ) -> None:
        lane, host = running
        ran = asyncio.Event()

        async def benchmark_run() -> None:
            ran.set()

        lane.submit_background(Background(1.0, benchmark_run))
        await host.clock.advance(1.0)
        assert ran.is_set()
        assert host.priorities == [pytest.approx(host.clock.wall() - 1.0 + 86400.0, abs=1.0)]


class TestQueue:
    """Queue views and edits: images, backlog, withdraw, replace."""

    def test_backlog_and_queued_images_count_live_jobs(self) -> None:
        """Pending jobs add their predicted time; retired ones count nothing."""
        host = Host()
        lane = Lane("a", host)
        jobs = [Job(make_run(), Chunk(0, 2, 1)) for _ in range(3)]
        for job in jobs:
            lane.submit(job)
        jobs[1].retire()
        assert lane.queued_images == 4
        per_image = jobs[0].run.work_per_image
        assert lane.backlog_s(0.0) == pytest.approx(2 * (1.0 + 2 * per_image))

    def test_withdraw_and_replace_keep_the_rest_in_order(self) -> None:
        """Withdraw takes one run's jobs; replace puts new jobs where the old one was."""
        host = Host()
        lane = Lane("a", host)
        keep, drop = make_run(), make_run()
        a, b, c = Job(keep, Chunk(0, 1, 1)), Job(drop, Chunk(0, 1, 1)), Job(keep, Chunk(1, 3, 1))
        for job in (a, b, c):
            lane.submit(job)
        assert lane.withdraw({drop}) == [b]
        parts = [Job(keep, Chunk(1, 1, 1)), Job(keep, Chunk(2, 2, 1))]
        lane.replace(a, parts)
        assert list(lane.pending) == [*parts, c]
