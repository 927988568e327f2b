"""Supervision: a long-lived task that crashes is logged once and started again."""

from __future__ import annotations

import asyncio
import logging

import pytest

from sdproxy.cluster.supervise import Supervisor
from sdproxy.logs import log_crash
from tests.cluster.fakes import FakeClock, settle


class TestSupervisor:
    """Supervised tasks are restarted after a crash and stop only when cancelled."""

    async def test_crashing_task_is_logged_and_restarted(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """One crash: one ERROR line with its traceback, a restart after the pause."""
        clock = FakeClock()
        supervisor = Supervisor(clock, restart_delay_s=1.0)
        starts = 0
        forever = asyncio.Event()

        async def task() -> None:
            nonlocal starts
            starts += 1
            if starts == 1:
                raise KeyError("boom")
            await forever.wait()

        supervisor.start("lane a", task)
        await settle()
        assert starts == 1
        assert supervisor.crashes == {"lane a": 1}
        await clock.advance(0.9)
        assert starts == 1
        await clock.advance(0.2)
        assert starts == 2
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1
        assert errors[0].exc_info is not None
        assert "lane a crashed" in errors[0].getMessage()
        await supervisor.aclose()

    async def test_aclose_cancels_every_task(self) -> None:
        """aclose() ends the tasks; none is restarted."""
        clock = FakeClock()
        supervisor = Supervisor(clock)
        cancelled = []

        async def task() -> None:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.append(True)
                raise

        supervisor.start("a", task)
        supervisor.start("b", task)
        await settle()
        await supervisor.aclose()
        assert cancelled == [True, True]

    async def test_names_are_unique(self) -> None:
        """Two tasks under one name would hide one of them from the status: refused."""
        supervisor = Supervisor(FakeClock())

        async def forever() -> None:
            await asyncio.Event().wait()

        supervisor.start("a", forever)
        with pytest.raises(ValueError, match="already supervised"):
            supervisor.start("a", forever)
        await supervisor.aclose()


class TestLogCrash:
    """One-off tasks log how they ended, unless cancelled."""

    async def test_log_crash_logs_an_exception_once(self, caplog: pytest.LogCaptureFixture) -> None:
        """A task that raised: one ERROR line naming it; a cancelled one: nothing."""

        async def fail() -> None:
            raise RuntimeError("bad")

        failing = asyncio.create_task(fail(), name="benchmark")
        failing.add_done_callback(log_crash)
        cancelled = asyncio.create_task(asyncio.Event().wait(), name="quiet")
        cancelled.add_done_callback(log_crash)
        cancelled.cancel()
        await asyncio.gather(failing, cancelled, return_exceptions=True)
        await settle()
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert errors == ["task benchmark crashed"]
