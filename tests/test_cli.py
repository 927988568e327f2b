"""The sdproxy command: configuration errors and the demo, run as real subprocesses."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import aiohttp

from tests.support import free_port


async def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sdproxy",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    async with asyncio.timeout(30):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


class TestConfigErrors:
    """A bad configuration is one clear line and exit status 2, never a traceback."""

    async def test_serve_unknown_key(self, tmp_path: Path) -> None:
        """A typo in the TOML names the file and the key."""
        path = tmp_path / "c.toml"
        path.write_text('[[nodes]]\nname = "a"\nurl = "http://127.0.0.1:1"\nwieght = 2\n')
        code, out, err = await run_cli("serve", "--config", str(path))
        assert code == 2
        assert (
            err.strip() == f"sdproxy: configuration error: {path}: nodes[0] (a).wieght: unknown key"
        )
        assert "Traceback" not in err
        assert out == ""

    async def test_serve_missing_file(self, tmp_path: Path) -> None:
        """A missing file is named."""
        code, _, err = await run_cli("serve", "--config", str(tmp_path / "none.toml"))
        assert code == 2
        assert "none.toml: no such file" in err

    async def test_serve_bad_environment_override(self, tmp_path: Path) -> None:
        """A bad SDPROXY_* value is reported like a bad file value."""
        path = tmp_path / "c.toml"
        path.write_text('[[nodes]]\nname = "a"\nurl = "http://127.0.0.1:1"\n')
        code, _, err = await run_cli(
            "serve", "--config", str(path), env={"SDPROXY_SERVER__PORT": "high"}
        )
        assert code == 2
        assert "server.port" in err

    async def test_fake_node_bad_argument(self) -> None:
        """A bad argument is argparse's usage error, exit status 2."""
        code, _, err = await run_cli("fake-node", "--port", "1", "--per-image-s", "-1")
        assert code == 2
        assert "must be >= 0" in err


class TestDemo:
    """`sdproxy demo` starts a cluster that answers txt2img, and stops cleanly."""

    async def test_demo_answers_txt2img(self) -> None:
        """The printed URL serves a split txt2img; SIGINT stops it with status 0."""
        port = free_port()
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sdproxy",
            "demo",
            "--port",
            str(port),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert process.stdout is not None
            async with asyncio.timeout(30):
                banner = (await process.stdout.readline()).decode()
            assert f"http://127.0.0.1:{port}" in banner
            body = {"prompt": "x", "batch_size": 7, "steps": 2, "width": 64, "height": 64}
            async with (
                aiohttp.ClientSession() as session,
                session.post(f"http://127.0.0.1:{port}/sdapi/v1/txt2img", json=body) as resp,
            ):
                assert resp.status == 200
                answer = await resp.json()
                shares = resp.headers["X-Sdproxy-Shares"]
            assert len(answer["images"]) == 7
            assert len(json.loads(answer["info"])["all_seeds"]) == 7
            # Speeds 4:2:1 and 7 images: each node finishes its share at the same time.
            assert shares == "fast:0-3,medium:4-5,slow:6-6"
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGINT)
        async with asyncio.timeout(30):
            code = await process.wait()
        assert code == 0
