"""Node watchers: probes every interval while up, after the cooldown while down."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from sdproxy.cluster.state import MemoryState
from sdproxy.cluster.watcher import retry_after_s, watch_node, why_none
from sdproxy.config import SchedulerSettings, Settings
from sdproxy.errors import NodeRejected, NodeUnreachable
from tests.cluster.fakes import FakeClock, settle

SCHEDULER = SchedulerSettings(health_interval_s=5, cooldown_base_s=2, cooldown_max_s=60)


class Host:
    """A WatchHost whose node answers probes as the test says."""

    def __init__(self) -> None:
        config = Settings.model_validate({"nodes": [{"name": "a", "url": "http://127.0.0.1:1"}]})
        self.clock = FakeClock()
        self.state = MemoryState(config.nodes, SCHEDULER, self.clock)
        self.state.record_ok("a")
        self.answers: list[Exception | None] = []  # what the next probes do; empty: succeed
        self.probes: list[float] = []
        self.events: list[str] = []

    async def probe(self, node: str, timeout_s: float) -> None:
        self.probes.append(self.clock.now())
        outcome = self.answers.pop(0) if self.answers else None
        if outcome is not None:
            raise outcome

    def node_went_down(self, node: str) -> None:
        self.events.append("down")

    async def catch_up(self, node: str, *, came_back: bool, poll: int) -> None:
        self.events.append(f"catch up {came_back} {poll}")

    def node_usable(self, node: str) -> None:
        self.events.append("usable")


@pytest.fixture
async def watched() -> AsyncIterator[tuple[Host, asyncio.Event]]:
    host, wake = Host(), asyncio.Event()
    task = asyncio.create_task(watch_node(host, "a", SCHEDULER, wake))
    await settle()
    yield host, wake
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


UNREACHABLE = NodeUnreachable("a", "cannot connect")


class TestWatcher:
    """What a watcher probes, when, and what it tells the cluster."""

    async def test_up_node_is_probed_every_interval(
        self, watched: tuple[Host, asyncio.Event]
    ) -> None:
        """Three intervals, three probes, each followed by a catch-up and 'usable'."""
        host, _ = watched
        start = host.clock.now()
        await host.clock.advance(15.01)
        assert host.probes == [start + 5, start + 10, start + 15]
        assert host.events == [
            "catch up False 1", "usable", "catch up False 2", "usable", "catch up False 3", "usable"
        ]  # fmt: skip

    async def test_failed_probe_takes_the_node_down_until_its_cooldown(
        self, watched: tuple[Host, asyncio.Event]
    ) -> None:
        """Down at the first failure; probed again after 2 s, then 4 s; back when one succeeds."""
        host, wake = watched
        host.answers = [UNREACHABLE, UNREACHABLE]
        start = host.clock.now()
        await host.clock.advance(5.01)
        assert not host.state.health("a").up
        assert host.events == ["down"]
        wake.set()  # woken early (a job failed there): no probe before the cooldown
        await host.clock.advance(1.9)
        assert len(host.probes) == 1
        await host.clock.advance(0.2)  # 2 s cooldown passed: probed, fails again
        assert host.probes[1] == pytest.approx(start + 7)
        await host.clock.advance(4.01)  # 4 s cooldown: probed, succeeds
        assert host.probes[2] == pytest.approx(start + 11)
        assert host.state.health("a").up
        assert host.events == ["down", "catch up True 3", "usable"]

    async def test_a_refusing_node_counts_as_reachable(
        self, watched: tuple[Host, asyncio.Event]
    ) -> None:
        """A 4xx to the probe (say, a 401) proves the node answers: it stays up."""
        host, _ = watched
        host.answers = [NodeRejected("a", 401, {"detail": "Not authenticated"})]
        await host.clock.advance(5.01)
        assert host.state.health("a").up
        assert "down" not in host.events


class TestNoNode:
    """What clients hear when no node is usable."""

    async def test_a_node_another_replica_probes_is_left_to_it(self) -> None:
        """Claims lost: no probe, one claim per interval even while the node is down and due
        (no busy loop against Redis), and the shared health still brings the catch-up."""
        host, wake = Host(), asyncio.Event()
        claims: list[float] = []

        async def lose(node: str) -> bool:
            claims.append(host.clock.now())
            return False

        host.state.claim_probe = lose  # type: ignore[method-assign]
        host.state.record_failure("a", "refused", probe=True)  # due again in 2 s
        task = asyncio.create_task(watch_node(host, "a", SCHEDULER, wake))
        try:
            await settle()
            start = host.clock.now()
            await host.clock.advance(12.01)
            assert host.probes == []
            assert claims == [start + 2, start + 7, start + 12]
            host.state.record_ok("a")  # as heard from the replica that probes it
            wake.set()  # what the cluster does when the health changes
            await settle()
            assert host.events == ["catch up False 4", "usable"]
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    def test_retry_after_is_the_next_probe_and_why_names_each_node(self) -> None:
        """Retry-After waits for the earliest probe of a down node; the reason names it."""
        host = Host()
        host.state.record_failure("a", "cannot connect", probe=True)  # next probe in 2 s
        assert retry_after_s(host.state, host.clock.wall(), 5.0) == 2
        assert why_none(host.state, ["a"]) == "no healthy node (a: probe failed (cannot connect))"
