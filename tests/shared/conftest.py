"""Fixtures for the shared layer: stores (one per simulated replica) on the test's redis-server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from sdproxy.config import ClusterSettings, SchedulerSettings
from sdproxy.shared.connect import open_store
from sdproxy.shared.store import SharedStore
from tests.support import RedisServer

OpenStore = Callable[..., Awaitable[SharedStore]]


@pytest.fixture
async def open_stores(redis_server: RedisServer) -> AsyncIterator[OpenStore]:
    """``await open_stores("r1", lease_ttl_s=2)``: a started store, closed at the end."""
    opened: list[SharedStore] = []

    async def open_one(replica_id: str = "r1", **cluster: Any) -> SharedStore:
        ttl_s = cluster.pop("lease_ttl_s", 3)
        settings = ClusterSettings.model_validate(
            {
                "redis_url": redis_server.url,
                "replica_id": replica_id,
                "lease_ttl_s": ttl_s,
                "redis_timeout_s": min(0.5, ttl_s / 3),
                **cluster,
            }
        )
        store = open_store(settings, SchedulerSettings(cooldown_base_s=1, cooldown_max_s=8))
        opened.append(store)
        await store.start(wait_s=10)
        return store

    yield open_one
    for store in opened:
        await store.aclose()


@pytest.fixture
async def raw_redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    """A plain client, to look at and tamper with what the stores keep."""
    client = Redis.from_url(redis_server.url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()
