"""Tests for rate-limited log lines (bad requests, broken bodies), on a fake clock."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest

from sdproxy.logs import RateLimitedLog
from sdproxy.ops.metrics import Metrics
from sdproxy.server.accesslog import BAD_REQUEST_ROUTE, BadRequestLog


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def lines(caplog: pytest.LogCaptureFixture, name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == name]


class TestRateLimitedLog:
    """One line per kind and interval; what is held back is counted in a later line."""

    def test_repeats_are_counted_not_logged(self, caplog: pytest.LogCaptureFixture) -> None:
        """Five of a kind within the interval: one line, then one line with repeated=4."""
        caplog.set_level(logging.INFO, logger="t")
        clock = FakeClock()
        limited = RateLimitedLog(logging.getLogger("t"), 10.0, clock=clock)
        for _ in range(5):
            limited.log("A", logging.INFO, "kind A", {"error": "A"})
        assert lines(caplog, "t") == ["kind A"]
        clock.now += 10.0
        limited.flush()
        assert lines(caplog, "t") == ["kind A", "kind A repeated=4 interval_s=10"]
        limited.flush()  # nothing left to report
        assert len(lines(caplog, "t")) == 2

    def test_kinds_are_limited_separately(self, caplog: pytest.LogCaptureFixture) -> None:
        """Another kind is logged at once even while the first is held back."""
        caplog.set_level(logging.INFO, logger="t")
        limited = RateLimitedLog(logging.getLogger("t"), 10.0, clock=FakeClock())
        limited.log("A", logging.INFO, "a", {})
        limited.log("A", logging.INFO, "a", {})
        limited.log("B", logging.INFO, "b", {})
        assert lines(caplog, "t") == ["a", "b"]

    def test_next_line_after_the_interval_reports_the_count(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Without a flush, the count comes out with the next line of that kind."""
        caplog.set_level(logging.INFO, logger="t")
        clock = FakeClock()
        limited = RateLimitedLog(logging.getLogger("t"), 10.0, clock=clock)
        limited.log("A", logging.INFO, "a", {})
        limited.log("A", logging.INFO, "a", {})
        clock.now += 11
        limited.log("A", logging.INFO, "a", {})
        assert lines(caplog, "t") == ["a", "a repeated=1 interval_s=10", "a"]

    def test_flush_is_scheduled_once_per_interval(self) -> None:
        """The first line held back asks for one flush at the end of the interval."""
        scheduled: list[tuple[float, Callable[[], None]]] = []
        clock = FakeClock()
        limited = RateLimitedLog(
            logging.getLogger("t"),
            10.0,
            clock=clock,
            schedule=lambda delay, callback: scheduled.append((delay, callback)),
        )
        limited.log("A", logging.INFO, "a", {})
        clock.now += 4
        for _ in range(3):
            limited.log("A", logging.INFO, "a", {})
        assert [delay for delay, _ in scheduled] == [6.0]
        assert scheduled[0][1] == limited.flush


class TestBadRequestLog:
    """Requests aiohttp could not parse: counted in metrics, logged without any of their bytes."""

    def test_line_and_metric(self, caplog: pytest.LogCaptureFixture) -> None:
        """The access line names route, status and error kind; the metric counts every one."""
        caplog.set_level(logging.INFO, logger="sdproxy.access")
        metrics = Metrics()
        bad = BadRequestLog(metrics)
        for _ in range(3):
            bad.note("LineTooLong", 400)
        assert lines(caplog, "sdproxy.access") == [
            f"method=- route={BAD_REQUEST_ROUTE} status=400 error=LineTooLong"
        ]
        text = metrics.render([]).decode()
        assert f'route="{BAD_REQUEST_ROUTE}",status="400"}} 3.0' in text
