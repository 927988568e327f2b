"""Fixtures shared by every test package (helpers that are not fixtures live in support.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support import RedisServer, find_redis_server


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A real redis-server on a free loopback port, without persistence, killed at the end."""
    binary = find_redis_server()
    if binary is None:
        pytest.skip("redis-server not found: install the Debian package redis-server (CI does)")
    server = RedisServer(binary, tmp_path / "redis")
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
