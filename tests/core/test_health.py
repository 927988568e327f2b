"""The node health state machine and its cooldown."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sdproxy.core.health import NodeHealth, cooldown_s


class TestCooldown:
    """A down node waits longer after each failure, up to the cap."""

    @pytest.mark.parametrize(
        ("failures", "expected"),
        [(0, 0.0), (1, 2.0), (2, 4.0), (3, 8.0), (5, 32.0), (6, 60.0), (50, 60.0), (10**6, 60.0)],
    )
    def test_cooldown_doubles_then_caps(self, failures: int, expected: float) -> None:
        """Base 2 s, cap 60 s: 2, 4, 8, ... then 60."""
        assert cooldown_s(failures, 2.0, 60.0) == expected

    @given(
        failures=st.integers(1, 10_000),
        base=st.floats(0.01, 100),
        cap=st.floats(0.01, 10_000),
    )
    def test_cooldown_is_monotonic_and_bounded(
        self, failures: int, base: float, cap: float
    ) -> None:
        """Never shorter than the previous one, never above the cap, never below min(base, cap)."""
        wait = cooldown_s(failures, base, cap)
        assert min(base, cap) <= wait <= cap
        assert cooldown_s(failures + 1, base, cap) >= wait


class TestNodeHealth:
    """up -> down on any failure; back up on a success; disabled by hand on top of that."""

    def test_failure_marks_down_and_schedules_probe(self) -> None:
        """A failure puts the node down with its error, and the next probe after the cooldown."""
        health = NodeHealth(cooldown_base_s=2.0, cooldown_max_s=60.0)
        health.record_ok(100.0)
        assert health.record_failure("connection refused", 200.0, probe=False) is True
        assert (health.state, health.usable, health.consecutive_failures) == ("down", False, 1)
        assert (health.last_error, health.last_error_at) == ("connection refused", 200.0)
        assert health.reason == "a request failed"
        assert health.next_probe_at == 202.0
        assert not health.probe_due(201.9)
        assert health.probe_due(202.0)

    def test_repeated_failures_grow_the_cooldown(self) -> None:
        """Each failed probe pushes the next one further, and reports no new 'went down'."""
        health = NodeHealth(cooldown_base_s=1.0, cooldown_max_s=3.0)
        health.record_ok(0.0)
        waits = []
        for now in (10.0, 20.0, 30.0, 40.0):
            went_down = health.record_failure("refused", now, probe=True)
            assert went_down is (now == 10.0)
            assert health.next_probe_at is not None
            waits.append(health.next_probe_at - now)
        assert waits == [1.0, 2.0, 3.0, 3.0]
        assert health.reason == "probe failed"

    def test_success_brings_node_back(self) -> None:
        """A success after failures: up, count reset, no probe scheduled; reported once."""
        health = NodeHealth()
        health.record_failure("reset", 5.0, probe=False)
        assert health.record_ok(9.0) is True
        assert health.record_ok(10.0) is False
        assert (health.state, health.consecutive_failures, health.next_probe_at) == ("up", 0, None)
        assert health.last_error == "reset"  # kept for /cluster/status

    def test_disable_and_enable(self) -> None:
        """Disabled takes no work whatever its health; enable restores it and asks for a probe."""
        health = NodeHealth()
        health.record_ok(1.0)
        health.disable()
        assert (health.state, health.usable, health.state_reason) == (
            "disabled",
            False,
            "disabled by hand",
        )
        health.enable(50.0)
        assert (health.state, health.usable) == ("up", True)
        assert health.next_probe_at == 50.0

    def test_new_node_is_down_until_probed(self) -> None:
        """Nothing is known of a node before its first probe: it gets no work."""
        health = NodeHealth()
        assert (health.state, health.usable, health.reason) == ("down", False, "not probed yet")
