"""The replica harness: sdproxy replicas as subprocesses in front of shared fake nodes."""

from __future__ import annotations

import signal
from pathlib import Path

import aiohttp
import pytest

from sdproxy.fakewebui import FakeNodeSettings
from tests.support import (
    RedisServer,
    ReplicaProcess,
    assert_complete,
    fake_nodes,
    fake_stats,
    post_json,
    replica_config,
)

pytestmark = pytest.mark.slow


class TestReplicaProcesses:
    """Replicas start from one configuration with a [cluster] section, answer, and die by PID."""

    async def test_replica_processes_serve_and_die(
        self, tmp_path: Path, redis_server: RedisServer
    ) -> None:
        """Two replicas render a request each; one killed by PID leaves the other serving."""
        settings = [FakeNodeSettings(name=f"n{i}", per_image_s=0.05) for i in range(2)]
        async with fake_nodes(*settings) as nodes, aiohttp.ClientSession() as session:
            config = replica_config(tmp_path / "sdproxy.toml", nodes, redis_server.url)
            replicas = [ReplicaProcess(config, f"replica-{i}") for i in range(2)]
            try:
                for replica in replicas:
                    await replica.start()
                body = {"prompt": "cow", "width": 64, "height": 64, "batch_size": 4}
                for replica in replicas:
                    status, answer, _ = await post_json(
                        session, f"{replica.url}/sdapi/v1/txt2img", body
                    )
                    assert status == 200, answer
                    assert_complete(answer, body)
                replicas[0].kill()
                assert replicas[0].process is not None
                assert await replicas[0].process.wait() == -signal.SIGKILL
                status, answer, _ = await post_json(
                    session, f"{replicas[1].url}/sdapi/v1/txt2img", body
                )
                assert status == 200, answer
                assert_complete(answer, body)
                served = [await fake_stats(session, node.url) for node in nodes]
                assert sum(stats["images_rendered"] for stats in served) == 12
            finally:
                for replica in replicas:
                    await replica.stop()
        assert "Traceback" not in replicas[1].log_text()
