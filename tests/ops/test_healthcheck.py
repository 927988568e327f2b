"""The container HEALTHCHECK command: finds sdproxy's port and asks /cluster/status."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from sdproxy.ops.healthcheck import DEFAULT_PORT, configured_port
from tests.support import free_port


async def run_healthcheck(port: int) -> int:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sdproxy.ops.healthcheck",
        env={**os.environ, "SDPROXY_SERVER__PORT": str(port)},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    async with asyncio.timeout(30):
        return await process.wait()


class TestConfiguredPort:
    """The port comes from the environment, else the mounted file, else 7860."""

    def test_port_from_environment_wins(self, tmp_path: Path) -> None:
        """SDPROXY_SERVER__PORT overrides the file, as it does for the server."""
        config = tmp_path / "c.toml"
        config.write_text("[server]\nport = 9001\n")
        env = {"SDPROXY_SERVER__PORT": "9002", "SDPROXY_CONFIG": str(config)}
        assert configured_port(env) == 9002

    def test_port_from_file(self, tmp_path: Path) -> None:
        """Without the variable, [server] port of the config file."""
        config = tmp_path / "c.toml"
        config.write_text("[server]\nport = 9001\n")
        assert configured_port({"SDPROXY_CONFIG": str(config)}) == 9001

    @pytest.mark.parametrize(
        "content", [None, "not toml [", "server = 3\n", "[server]\nport = 'x'\n"]
    )
    def test_port_default(self, tmp_path: Path, content: str | None) -> None:
        """A missing, broken or odd file falls back to the default port."""
        config = tmp_path / "c.toml"
        if content is not None:
            config.write_text(content)
        assert configured_port({"SDPROXY_CONFIG": str(config)}) == DEFAULT_PORT


class TestHealthcheckCommand:
    """`python -m sdproxy.ops.healthcheck` exits 0 while sdproxy serves and 1 once it stopped."""

    async def test_healthcheck_against_env_only_server(self) -> None:
        """`sdproxy serve` configured by the environment alone passes; stopped, it fails."""
        port = free_port()
        env = {
            **os.environ,
            "SDPROXY_SERVER__PORT": str(port),
            "SDPROXY_NODES": f'[{{"name": "a", "url": "http://127.0.0.1:{free_port()}"}}]',
        }
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sdproxy",
            "serve",
            env=env,
            stderr=asyncio.subprocess.PIPE,
        )
        assert process.stderr is not None
        try:
            async with asyncio.timeout(30):
                while b"listening" not in await process.stderr.readline():
                    pass
            assert await run_healthcheck(port) == 0
        finally:
            process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(30):
                await process.communicate()
        assert process.returncode == 0
        assert await run_healthcheck(port) == 1
