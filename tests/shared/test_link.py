"""The Redis link: shared or local mode, one warning, fast failure, rejoining, no leaked secret."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from sdproxy.config import ClusterSettings, SchedulerSettings
from sdproxy.shared.connect import open_store
from sdproxy.shared.link import SharedUnavailable, redacted_url
from tests.shared.conftest import OpenStore
from tests.support import RedisServer, find_redis_server, wait_until


class TestMode:
    """The link reports whether state is shared, and why not."""

    async def test_mode_shared_when_redis_answers(self, open_stores: OpenStore) -> None:
        """A started store on a live Redis is in shared mode."""
        store = await open_stores("r1")
        assert store.shared
        assert store.link.describe() == "shared"
        assert store.status()["mode"] == "shared"

    async def test_mode_local_once_redis_is_gone(
        self, open_stores: OpenStore, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Redis gone: local mode, described with the time, and one warning for many calls."""
        store = await open_stores("r1")
        await redis_server.stop()
        caplog.set_level(logging.WARNING, logger="sdproxy.shared")
        for _ in range(20):
            with pytest.raises(SharedUnavailable):
                await store.leases.acquire("gpu-a")
        assert not store.shared
        assert store.link.describe().startswith("local (redis unreachable since 20")
        unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
        assert len(unreachable) == 1

    async def test_mode_local_calls_fail_fast(
        self, open_stores: OpenStore, redis_server: RedisServer
    ) -> None:
        """In local mode calls fail without reaching for Redis (no timeout waited per call)."""
        store = await open_stores("r1")
        await redis_server.stop()
        with pytest.raises(SharedUnavailable):
            await store.records.read("cluster:checkpoint")
        trips = store.link.calls["record read"]
        for _ in range(50):
            with pytest.raises(SharedUnavailable):
                await store.records.read("cluster:checkpoint")
        assert store.link.calls["record read"] == trips

    async def test_mode_hung_redis_times_out(
        self, open_stores: OpenStore, redis_server: RedisServer
    ) -> None:
        """A Redis that hangs (SIGSTOP) fails the call within its timeout, not never."""
        store = await open_stores("r1", redis_timeout_s=0.3)
        redis_server.pause()
        try:
            with pytest.raises(SharedUnavailable):
                await asyncio.wait_for(store.records.read("cluster:checkpoint"), timeout=10)
            assert not store.shared
        finally:
            redis_server.resume()
        await wait_until(lambda: store.shared, what="rejoin after the pause")

    async def test_mode_refuse_raises_503(
        self, open_stores: OpenStore, redis_server: RedisServer
    ) -> None:
        """on_redis_down = "refuse": require() raises 503 while Redis is gone; "local" does not."""
        refusing = await open_stores("r1", on_redis_down="refuse")
        local = await open_stores("r2")
        refusing.require()
        await redis_server.stop()
        for store in (refusing, local):
            with pytest.raises(SharedUnavailable):
                await store.records.read("cluster:options")
        local.require()
        with pytest.raises(SharedUnavailable) as raised:
            refusing.require()
        assert raised.value.status == 503
        assert "Retry-After" in raised.value.headers()


class TestCancellation:
    """A call cancelled mid-way ends its caller, whatever redis-py makes of the cancellation."""

    @pytest.mark.parametrize("swallowed_as", ["answer", "error"])
    async def test_cancellation_swallowed_by_the_client_still_cancels(
        self, open_stores: OpenStore, swallowed_as: str
    ) -> None:
        """An operation that catches the CancelledError and answers (as redis-py 8.1 was
        seen doing in a SET NX at shutdown) or raises a RedisError: the caller is cancelled."""
        store = await open_stores("r1")
        started = asyncio.Event()

        async def swallowing(_: Redis) -> None:
            started.set()
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if swallowed_as == "error":
                    raise redis_errors.ResponseError("cancelled") from None
                # else: an answer (None), as if the command had run

        call = asyncio.create_task(store.link.call("claim", swallowing))
        await started.wait()
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert call.cancelled()
        assert store.shared  # not a Redis failure


class TestRejoin:
    """When Redis is back, each replica rejoins: registers, resubscribes, reloads scripts."""

    async def test_rejoin_after_restart(
        self, open_stores: OpenStore, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A restarted (empty) Redis gets the replica, its scripts and its subscription back."""
        a, b = await open_stores("a"), await open_stores("b")
        caplog.set_level(logging.WARNING, logger="sdproxy.shared")
        await redis_server.restart()
        await wait_until(
            lambda: a.broadcast.subscriptions >= 2 and a.broadcast.subscribed and a.shared,
            what="a to rejoin",
        )
        await wait_until(lambda: b.broadcast.subscribed and b.shared, what="b to rejoin")
        live = {state.replica for state in await a.replicas.live()}
        assert live == {"a", "b"}
        lease = await a.leases.acquire("gpu-a")  # the scripts are there again
        assert lease is not None
        heard: list[str] = []
        b.broadcast.on("test", lambda message: heard.append(message.origin))
        await a.broadcast.publish("test")
        await wait_until(lambda: heard == ["a"], what="b to hear a after the restart")
        back = [r for r in caplog.records if "reachable again" in r.getMessage()]
        assert len(back) == 2  # one line per replica

    async def test_rejoin_starts_local_without_redis(
        self, open_stores: OpenStore, redis_server: RedisServer
    ) -> None:
        """A replica started while Redis is down serves locally and joins when it comes."""
        await redis_server.stop()
        store = await open_stores("late")
        assert not store.shared
        await redis_server.start()
        await wait_until(lambda: store.shared and store.broadcast.subscribed, what="joining")
        assert [s.replica for s in await store.replicas.live()] == ["late"]


class TestSecrets:
    """The Redis URL's password never reaches a log line or the status."""

    def test_secrets_redacted_url(self) -> None:
        """redacted_url keeps scheme, host, port and db, and drops the credentials."""
        assert redacted_url("redis://user:hunter22@cache:6380/2") == "redis://***@cache:6380/2"
        assert redacted_url("rediss://:hunter22@cache/0") == "rediss://***@cache/0"
        assert redacted_url("redis://cache:6379") == "redis://cache:6379"

    async def test_secrets_wrong_password_not_logged(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A Redis that refuses the password: local mode, and the password in no log line."""
        binary = find_redis_server()
        if binary is None:
            pytest.skip("redis-server not found: install the Debian package redis-server")
        server = RedisServer(binary, tmp_path, "--requirepass", "right-password-1")
        await server.start()
        caplog.set_level(logging.DEBUG)
        url = f"redis://:wrong-password-2@127.0.0.1:{server.port}/0"
        settings = ClusterSettings.model_validate(
            {"redis_url": url, "replica_id": "r1", "redis_timeout_s": 0.5}
        )
        store = open_store(settings, SchedulerSettings())
        try:
            await store.start(wait_s=2)
            assert not store.shared
            assert "wrong-password-2" not in str(store.status())
            assert "wrong-password-2" not in repr(settings)
        finally:
            await store.aclose()
            await server.stop()
        assert caplog.records
        assert all("wrong-password-2" not in r.getMessage() for r in caplog.records)

    async def test_secrets_password_accepted(self, tmp_path: Path) -> None:
        """With the right password the store shares state (credentials come from the URL)."""
        binary = find_redis_server()
        if binary is None:
            pytest.skip("redis-server not found: install the Debian package redis-server")
        server = RedisServer(binary, tmp_path, "--requirepass", "right-password-1")
        await server.start()
        url = f"redis://:right-password-1@127.0.0.1:{server.port}/0"
        settings = ClusterSettings.model_validate(
            {"redis_url": url, "replica_id": "r1", "redis_timeout_s": 0.5}
        )
        store = open_store(settings, SchedulerSettings())
        try:
            await store.start(wait_s=5)
            assert store.shared
        finally:
            await store.aclose()
            await server.stop()


class TestNamespace:
    """Every key lies under the prefix: two clusters share one Redis without meeting."""

    async def test_namespace_two_prefixes_apart(
        self, open_stores: OpenStore, raw_redis: Redis
    ) -> None:
        """Same node name, two prefixes: two independent leases; every key is prefixed."""
        one = await open_stores("r1", redis_prefix="blue")
        two = await open_stores("r2", redis_prefix="green")
        assert await one.leases.acquire("gpu-a", wait=False) is not None
        assert await two.leases.acquire("gpu-a", wait=False) is not None
        await one.nodes.observe_job("gpu-a", 1.0, 2.0, 1)
        keys = [key async for key in raw_redis.scan_iter("*")]
        assert keys
        assert all(key.startswith(("blue:", "green:")) for key in keys)


class TestImports:
    """Single-process mode does not import redis-py at all."""

    def test_imports_no_redis_without_url(self) -> None:
        """Loading the server and the CLI leaves redis-py unimported."""
        code = (
            "import sys, sdproxy.cli, sdproxy.server.app, sdproxy.shared.connect;"
            "print([m for m in sys.modules if m == 'redis' or m.startswith('redis.')])"
        )
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
        )
        assert result.stdout.strip() == "[]"
