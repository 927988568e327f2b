"""The sdproxy command: configuration errors and the demo, run as real subprocesses."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest

from sdproxy.cli import build_parser
from sdproxy.fakewebui import FakeNodeSettings
from tests.support import fake_nodes, free_port, wait_until


@asynccontextmanager
async def running(
    argv: list[str], env: dict[str, str]
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """``sdproxy *argv`` as a subprocess, with its first stderr line once it has logged one."""
    process = await sdproxy_process(argv, env, stdout=asyncio.subprocess.DEVNULL)
    try:
        assert process.stderr is not None
        async with asyncio.timeout(30):
            first = (await process.stderr.readline()).decode()
            # The listening line comes after the node probe's warnings: wait for it.
            line = first
            while "listening on" not in line:
                line = (await process.stderr.readline()).decode()
                assert line, "sdproxy exited before listening"
        yield process, first
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def sdproxy_process(
    argv: Sequence[str], env: dict[str, str] | None, *, stdout: int = asyncio.subprocess.PIPE
) -> asyncio.subprocess.Process:
    """``python -m sdproxy *argv`` with ``env`` added to this environment; stderr piped."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sdproxy",
        *argv,
        stdout=stdout,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )


async def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    process = await sdproxy_process(args, env)
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

    @pytest.mark.parametrize(
        ("variable", "value", "line"),
        [
            ("SDPROXY_SERVER__PORT", "high", "SDPROXY_SERVER__PORT: server.port: Input should be"),
            ("SDPROXY_NODES", "not json", "SDPROXY_NODES: not valid JSON (Expecting value at"),
            ("SDPROXY_NODES", "[1]", "SDPROXY_NODES: nodes[0]: expected a JSON object"),
            ("SDPROXY_SERVER__API_KEYS", "abc", "SDPROXY_SERVER__API_KEYS: server.api_keys: key 1"),
            ("SDPROXY_BENCHMARK__BATCH_SIZES", "1,1", "SDPROXY_BENCHMARK__BATCH_SIZES: benchmark."),
        ],
    )
    async def test_serve_bad_environment_variable(
        self, tmp_path: Path, variable: str, value: str, line: str
    ) -> None:
        """A bad SDPROXY_* value is one line naming the variable (not the file), exit 2."""
        path = tmp_path / "dup.toml"
        path.write_text('[[nodes]]\nname = "a"\nurl = "http://127.0.0.1:1"\n')
        code, out, err = await run_cli("serve", "--config", str(path), env={variable: value})
        assert (code, out) == (2, "")
        [printed] = err.splitlines()
        assert printed.startswith(f"sdproxy: configuration error: {line}")
        assert str(path) not in printed

    @pytest.mark.parametrize(
        ("text", "line"),
        [
            ("nodes = [1]\n", "nodes[0]: expected a table of keys"),
            (
                '[[nodes]]\nname = "a"\nurl = "http://h:1"\n' * 2,
                "nodes[1] (a).name: duplicate node name 'a' (nodes[0] has it too)",
            ),
        ],
    )
    async def test_serve_bad_node_list(self, tmp_path: Path, text: str, line: str) -> None:
        """Odd node entries and duplicate names: one line naming the entry, exit 2."""
        path = tmp_path / "c.toml"
        path.write_text(text)
        code, _, err = await run_cli("serve", "--config", str(path))
        assert code == 2
        assert err.splitlines() == [f"sdproxy: configuration error: {path}: {line}"]

    async def test_serve_environment_only_comma_list_starts(self) -> None:
        """SDPROXY_BENCHMARK__BATCH_SIZES=1,4 and API_KEYS=a,b are read as lists: it serves."""
        port = free_port()
        env = {
            "SDPROXY_NODES": f'[{{"name": "a", "url": "http://127.0.0.1:{free_port()}"}}]',
            "SDPROXY_SERVER__PORT": str(port),
            "SDPROXY_BENCHMARK__BATCH_SIZES": "1,4",
            "SDPROXY_BENCHMARK__ON_START": "false",
            "SDPROXY_SERVER__API_KEYS": "first-key-123,second-key-456",
        }
        async with running(["serve", "--log-format", "json"], env) as (process, first_line):
            assert json.loads(first_line)["level"] == "INFO"
            async with (
                aiohttp.ClientSession() as session,
                session.get(
                    f"http://127.0.0.1:{port}/cluster/status",
                    headers={"Authorization": "Bearer second-key-456"},
                ) as resp,
            ):
                assert resp.status == 200
            process.send_signal(signal.SIGINT)
            async with asyncio.timeout(30):
                assert await process.wait() == 0


class TestArguments:
    """Global options go before or after the command; every option says what it does."""

    @pytest.mark.parametrize(
        "argv",
        [
            ["--log-format", "json", "serve", "--config", "MISSING"],
            ["serve", "--log-format", "json", "--config", "MISSING"],
            ["serve", "--config", "MISSING", "--log-level", "DEBUG"],
        ],
    )
    async def test_global_options_in_both_places(self, tmp_path: Path, argv: list[str]) -> None:
        """Accepted either side of the command (the missing file is then the only error)."""
        argv = [str(tmp_path / "none.toml") if a == "MISSING" else a for a in argv]
        code, _, err = await run_cli(*argv)
        assert code == 2
        assert "unrecognized arguments" not in err
        assert "none.toml: no such file" in err

    def test_global_option_after_the_command_wins(self) -> None:
        """Given twice, the later one counts; not given after the command, the earlier stays."""
        parser = build_parser()
        args = parser.parse_args(["--log-level", "DEBUG", "serve", "--log-format", "json"])
        assert (args.log_level, args.log_format) == ("DEBUG", "json")
        args = parser.parse_args(["--log-level", "DEBUG", "serve", "--log-level", "ERROR"])
        assert args.log_level == "ERROR"
        args = parser.parse_args(["demo"])
        assert (args.log_level, args.log_format) == ("INFO", None)

    def test_every_option_has_help(self) -> None:
        """No option or command is listed without a line saying what it does."""
        parser = build_parser()
        subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        missing = [
            f"{name} {action.option_strings}"
            for name, sub in [("sdproxy", parser), *subparsers.choices.items()]
            for action in sub._actions
            if action.option_strings and not action.help
        ]
        assert missing == []
        assert all(choice.help for choice in subparsers._choices_actions)

    async def test_help_is_plain_text(self) -> None:
        """--help shows prose and examples, not a docstring with RST markup."""
        code, out, _ = await run_cli("--help")
        assert code == 0
        assert "``" not in out
        assert "examples:" in out
        assert "sdproxy serve --config config.toml" in out
        code, out, _ = await run_cli("serve", "--help")
        assert code == 0
        assert "--log-format" in out
        assert "--config" in out

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


class TestStateDirectory:
    """Serving from the environment alone keeps benchmark results in the state directory."""

    async def test_environment_only_serve_stores_benchmarks_in_state_dir(
        self, tmp_path: Path
    ) -> None:
        """With STATE_DIR set (as the image sets it), the start-up benchmark is stored there."""
        state = tmp_path / "state" / "sdproxy-state.json"
        async with fake_nodes(FakeNodeSettings(name="a")) as nodes:
            env = {
                "SDPROXY_NODES": json.dumps([{"name": "a", "url": nodes[0].url}]),
                "SDPROXY_SERVER__PORT": str(free_port()),
                "SDPROXY_BENCHMARK__STATE_DIR": str(tmp_path / "state"),
                "SDPROXY_BENCHMARK__STEPS": "1",
                "SDPROXY_BENCHMARK__WIDTH": "64",
                "SDPROXY_BENCHMARK__HEIGHT": "64",
                "SDPROXY_BENCHMARK__WARMUP_RUNS": "0",
                "SDPROXY_BENCHMARK__TIMED_RUNS": "1",
            }
            async with running(["serve"], env) as (process, _):
                await wait_until(state.is_file, "the benchmark results stored")
                process.send_signal(signal.SIGINT)
                async with asyncio.timeout(30):
                    assert await process.wait() == 0
        stored = json.loads(state.read_text())
        assert list(stored["benchmarks"]) == ["a"]
