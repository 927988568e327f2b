"""Parked work: held until a node comes back, failed once wait_for_node_s has passed."""

from __future__ import annotations

from sdproxy.cluster.parking import Parking
from sdproxy.cluster.work import Job
from sdproxy.core.planner import Chunk
from sdproxy.errors import GenerationFailed, NoNodeAvailable
from tests.cluster.fakes import FakeClock
from tests.cluster.test_lanes import make_run


def parking(clock: FakeClock, wait_s: float = 10.0) -> Parking:
    return Parking(clock, wait_s, lambda: NoNodeAvailable("no node", retry_after_s=3))


class TestExpiry:
    """A parked job fails its request once its wait is over, and not before."""

    async def test_parked_job_fails_after_the_wait_with_503(self) -> None:
        """No node failure met: the request gets the cluster's 'no usable node' error."""
        clock = FakeClock()
        park = parking(clock)
        job = Job(make_run(), Chunk(0, 2, 1))
        park.park(job)
        await clock.advance(9.9)
        assert not job.run.finished
        assert park.waiting_images == 2
        await clock.advance(0.2)
        assert isinstance(job.run.error, NoNodeAvailable)
        assert not park
        assert not job.live

    async def test_parked_job_that_met_failures_fails_with_502(self) -> None:
        """Node failures met before: the request gets them, named, as a 502."""
        clock = FakeClock()
        park = parking(clock)
        job = Job(make_run(), Chunk(0, 2, 1))
        job.run.failures["a"] = "cannot connect"
        park.park(job)
        await clock.advance(10.1)
        assert isinstance(job.run.error, GenerationFailed)
        assert job.run.error.failures == {"a": "cannot connect"}

    async def test_parked_again_keeps_the_first_deadline(self) -> None:
        """Taken back and parked again (the node came and went): the wait is not renewed."""
        clock = FakeClock()
        park = parking(clock)
        job = Job(make_run(), Chunk(0, 2, 1))
        park.park(job)
        await clock.advance(6)
        assert park.take_all() == [job]
        park.park(job)
        await clock.advance(4.1)
        assert job.run.finished

    async def test_taken_back_job_is_not_failed(self) -> None:
        """Dispatched again before its wait ended: its timer does nothing to it."""
        clock = FakeClock()
        park = parking(clock)
        job = Job(make_run(), Chunk(0, 2, 1))
        park.park(job)
        park.take_all()
        await clock.advance(20)
        assert not job.run.finished
        assert job.live

    async def test_withdraw_takes_only_the_given_runs(self) -> None:
        """Withdrawing one request's jobs leaves the others parked."""
        park = parking(FakeClock())
        mine, other = Job(make_run(), Chunk(0, 1, 1)), Job(make_run(), Chunk(0, 3, 1))
        park.park(mine)
        park.park(other)
        assert park.withdraw({mine.run}) == [mine]
        assert park.jobs == [other]
        assert park.waiting_images == 3
