"""The one connection to Redis: a deadline on every call, the shared/local mode, rejoining.

Every Redis call of sdproxy goes through :meth:`Link.call`, which bounds it by
``redis_timeout_s`` and turns whatever Redis or the network raise into
:class:`SharedUnavailable`. The first call that finds Redis gone switches the link to *local*
mode with one warning in the log; from then on calls fail at once (no timeout is waited per
call) and the caller schedules with what it knows locally, or refuses (``on_redis_down``). A
monitor task pings Redis every ``retry_s`` while it is gone; when it answers, the link is
*shared* again, says so once in the log, and runs the rejoin callbacks (re-register the
replica, re-publish its state, re-read the records it caches). Pub/sub resubscribes on its
own (broadcast.py).

The Redis URL may hold a password: it is kept as a SecretStr by the configuration and only its
:func:`redacted_url` form is ever logged or shown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit

from redis import exceptions as redis_errors
from redis.asyncio import Redis

from sdproxy.errors import SdproxyError
from sdproxy.shared.keys import Keys
from sdproxy.shared.tasks import cancelling

log = logging.getLogger(__name__)

T = TypeVar("T")

# These mean Redis cannot serve us now (gone, restarting, read-only after a failover): local
# mode until it answers again. Any other error answer concerns one command only.
_DOWN_ERRORS = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.BusyLoadingError,
    redis_errors.ReadOnlyError,
    redis_errors.AuthenticationError,
    OSError,
    TimeoutError,
)


class SharedUnavailable(SdproxyError):
    """503: the shared state in Redis cannot be reached (``on_redis_down = "refuse"``)."""

    status = 503

    def __init__(self, message: str, retry_after_s: int = 2) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


def redacted_url(url: str) -> str:
    """``url`` without its credentials, for logs and the status: scheme://host:port/db."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(unparsable redis URL)"
    user = "***@" if parts.username or parts.password else ""
    return f"{parts.scheme}://{user}{host}{port}{parts.path}"


def default_replica_id() -> str:
    """Host name and process id: unique among replicas on different hosts or in containers."""
    host = re.sub(r"[^A-Za-z0-9_.\-]", "-", socket.gethostname())[:80] or "host"
    return f"{host}:{os.getpid()}"


def iso(unix_s: float) -> str:
    return datetime.fromtimestamp(unix_s, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


Rejoin = Callable[[], Awaitable[None]]


class Link:
    """A redis-py asyncio client, the mode it puts sdproxy in, and the calls made through it."""

    def __init__(
        self,
        client: Redis,
        *,
        keys: Keys,
        replica_id: str,
        timeout_s: float,
        retry_s: float = 1.0,
        where: str = "redis",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.keys = keys
        self.replica_id = replica_id
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.where = where  # the redacted URL
        self.round_trips = 0  # every call, for /metrics and benchmarks/replicas.py
        self.calls: Counter[str] = Counter()  # the same, by kind ("lease acquire", ...)
        self._clock = clock
        self._up = False
        self._ever_up = False
        self.since = clock()  # Unix time the current mode began
        self.reason = "not connected yet"
        self._up_event = asyncio.Event()
        self._down_event = asyncio.Event()
        self._down_event.set()
        self._rejoin: list[Rejoin] = []
        self._pool_reset = True
        self.tried = asyncio.Event()  # the monitor has tried to connect at least once
        self._logged_errors: set[str] = set()

    # --- the mode ----------------------------------------------------------------------------

    @property
    def up(self) -> bool:
        """Redis answers: state is shared."""
        return self._up

    def describe(self) -> str:
        """``shared``, or ``local (redis unreachable since ...)``, for /cluster/status."""
        if self._up:
            return "shared"
        return f"local ({self.reason} since {iso(self.since)})"

    def status(self) -> dict[str, Any]:
        return {
            "mode": "shared" if self._up else "local",
            "since": self.since,
            "reason": None if self._up else self.reason,
            "describe": self.describe(),
            "redis": self.where,
            "round_trips": self.round_trips,
        }

    def on_rejoin(self, callback: Rejoin) -> None:
        """Run ``callback`` each time Redis answers again (and on the first connection)."""
        self._rejoin.append(callback)

    async def wait_up(self) -> None:
        await self._up_event.wait()

    def mark_down(self, reason: str) -> None:
        """Redis was found gone: local mode, one warning, the monitor starts pinging."""
        if not self._up:
            return
        self._up = False
        self.since = self._clock()
        self.reason = "redis unreachable"
        self._up_event.clear()
        self._down_event.set()
        self._pool_reset = False
        log.warning(
            "redis %s unreachable (%s): replicas no longer share state; scheduling locally "
            "until it is back",
            self.where,
            reason,
        )

    def _mark_up(self) -> None:
        self._up = True
        self.since = self._clock()
        self.reason = ""
        self._down_event.clear()
        self._up_event.set()
        if self._ever_up:
            log.warning("redis %s reachable again: sharing state with the replicas", self.where)
        else:
            log.info("sharing state with the other replicas in redis %s", self.where)
        self._ever_up = True

    # --- calls -------------------------------------------------------------------------------

    async def call(self, kind: str, op: Callable[[Redis], Awaitable[T]], subject: str = "") -> T:
        """Run ``op`` (one round trip) within the timeout; SharedUnavailable if Redis fails.

        ``kind`` counts the call (``calls``, by kind); ``subject`` (a node, a record) only
        goes into messages.
        """
        if not self._up:
            raise SharedUnavailable(f"shared state unavailable: {self.describe()}")
        return await self._call(kind, op, subject)

    async def _call(self, kind: str, op: Callable[[Redis], Awaitable[T]], subject: str = "") -> T:
        self.round_trips += 1
        self.calls[kind] += 1
        what = f"{kind} {subject}".strip()
        task = asyncio.current_task()
        cancels = task.cancelling() if task is not None else 0
        try:
            async with asyncio.timeout(self.timeout_s):
                result = await op(self.client)
        except _DOWN_ERRORS as exc:
            if cancelling():  # a timeout raised while we are being cancelled: stop, as asked
                raise asyncio.CancelledError from exc
            self.mark_down(f"{what}: {_describe(exc)}")
            raise SharedUnavailable(f"shared state unavailable: {self.describe()}") from exc
        except redis_errors.RedisError as exc:
            if task is not None and task.cancelling() > cancels:
                raise asyncio.CancelledError from exc  # the cancellation, turned into an error
            # One command refused (out of memory, a foreign key in our namespace): say it once.
            text = f"{what}: {_describe(exc)}"
            if text not in self._logged_errors and len(self._logged_errors) < 100:
                self._logged_errors.add(text)
                log.warning("redis refused %s", text)
            raise SharedUnavailable(f"shared state refused {what}") from exc
        if task is not None and task.cancelling() > cancels:
            # Cancelled mid-call, and redis-py answered anyway (a SET NX read as "not set"):
            # it swallowed the cancellation, which would leave the caller running for good.
            raise asyncio.CancelledError
        return result

    # --- the monitor ---------------------------------------------------------------------------

    async def run_monitor(self) -> None:
        """Forever: while Redis is gone, ping it every ``retry_s``; on an answer, rejoin."""
        while True:
            await self._down_event.wait()
            if not self._pool_reset:
                # Pooled connections from before are dead (a restarted Redis closed them):
                # drop them, or the first calls after the rejoin would fail on them.
                with contextlib.suppress(redis_errors.RedisError, OSError, TimeoutError):
                    async with asyncio.timeout(self.timeout_s):
                        await self.client.connection_pool.disconnect()
                self._pool_reset = True
            answered = await self._ping()
            self.tried.set()
            if answered:
                self._mark_up()
                await self._run_rejoin()
            if not self._up:
                await asyncio.sleep(self.retry_s)

    async def _ping(self) -> bool:
        try:
            await self._call("ping", lambda client: client.ping())
        except SharedUnavailable:
            return False
        return True

    async def _run_rejoin(self) -> None:
        for callback in self._rejoin:
            if not self._up:
                return  # gone again: the next answer runs them all again
            try:
                await callback()
            except SharedUnavailable:
                return
            except Exception:
                log.exception("rejoining the replicas failed in %s", _name(callback))

    async def aclose(self) -> None:
        self._up = False
        self._up_event.clear()
        with contextlib.suppress(redis_errors.RedisError, OSError, TimeoutError):
            async with asyncio.timeout(self.timeout_s):
                await self.client.aclose()


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _name(callback: Callable[..., Any]) -> str:
    return getattr(callback, "__qualname__", repr(callback))
