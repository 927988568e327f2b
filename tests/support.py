"""Real servers on 127.0.0.1 for tests: fake webui nodes and sdproxy in front of them."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDictProxy
from PIL import Image

from sdproxy.cli import free_port
from sdproxy.config import Settings
from sdproxy.fakewebui import FakeNode, FakeNodeSettings, create_fake_app
from sdproxy.server.keys import cluster_key
from sdproxy.server.site import start_proxy, start_site

__all__ = ["free_port"]  # one definition (sdproxy.cli), re-exported for the tests

SMALL = {"width": 64, "height": 64, "steps": 20}  # 1/64 of a nominal image: renders fast


@dataclass
class RunningNode:
    """A fake webui node serving on loopback."""

    node: FakeNode
    url: str

    @property
    def name(self) -> str:
        return self.node.settings.name


def bound_port(runner: web.AppRunner) -> int:
    port: int = runner.addresses[0][1]
    return port


@asynccontextmanager
async def fake_nodes(*settings: FakeNodeSettings) -> AsyncIterator[list[RunningNode]]:
    """Start one fake node per settings, each on a free loopback port."""
    async with AsyncExitStack() as stack:
        running = []
        for each in settings:
            node = FakeNode(each)
            runner = await start_site(create_fake_app(node), "127.0.0.1", 0)
            stack.push_async_callback(runner.cleanup)
            running.append(RunningNode(node, f"http://127.0.0.1:{bound_port(runner)}"))
        yield running


@asynccontextmanager
async def proxy(
    nodes: Sequence[RunningNode | dict[str, Any]], **sections: Any
) -> AsyncIterator[str]:
    """Start sdproxy in front of ``nodes`` and yield its base URL.

    No background benchmark unless ``benchmark`` says so: it would send nodes extra requests.
    When the test is done with it, every image of every request still in flight must have
    exactly one owner (a queued or running job, or parked work): the scheduler's invariant.
    """
    node_list = [{"name": n.name, "url": n.url} if isinstance(n, RunningNode) else n for n in nodes]
    sections.setdefault("benchmark", {"on_start": False})
    settings = Settings.model_validate({"server": {"port": 0}, **sections, "nodes": node_list})
    runner = await start_proxy(settings, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{bound_port(runner)}"
        assert runner.app[cluster_key].ownership_problems() == []
    finally:
        await runner.cleanup()


async def post_json(
    session: aiohttp.ClientSession, url: str, body: Any
) -> tuple[int, Any, CIMultiDictProxy[str]]:
    async with session.post(url, json=body) as resp:
        return resp.status, await resp.json(content_type=None), resp.headers


def pixels(image_b64: str) -> bytes:
    """The decoded pixel data of a base64 image, for pixel-exact comparisons."""
    with Image.open(io.BytesIO(base64.b64decode(image_b64))) as image:
        return image.convert("RGB").tobytes()


async def wait_until(
    condition: Callable[[], bool | Awaitable[bool]], what: str, timeout_s: float = 20.0
) -> None:
    """Poll ``condition`` until it holds: state that changes on another task's clock."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        result = condition()
        if result if isinstance(result, bool) else await result:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def wait_until_serving(
    url: str, path: str = "/internal/ping", *, alive: Callable[[], None] | None = None
) -> None:
    """Poll ``url + path`` until it answers 200 (a server that is still starting).

    ``alive`` is called before each poll and raises if the server can no longer come up.
    """
    async with aiohttp.ClientSession() as session:

        async def answers() -> bool:
            if alive is not None:
                alive()
            try:
                async with session.get(f"{url}{path}") as resp:
                    return resp.status == 200
            except aiohttp.ClientError:
                return False

        await wait_until(answers, what=f"{url} to serve")


async def cluster_status(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(f"{url}/cluster/status") as resp:
        assert resp.status == 200
        status: dict[str, Any] = await resp.json()
        return status


async def node_state(session: aiohttp.ClientSession, url: str, name: str) -> dict[str, Any]:
    """One node's entry in sdproxy's /cluster/status."""
    return node_entry(await cluster_status(session, url), name)


def node_entry(status: dict[str, Any], name: str) -> dict[str, Any]:
    """One node's entry in a /cluster/status answer."""
    entry: dict[str, Any] = next(n for n in status["nodes"] if n["name"] == name)
    return entry


class NodeProcess:
    """A fake webui node run as a subprocess (``python -m sdproxy fake-node``), to kill by PID."""

    def __init__(self, name: str, port: int, *flags: str) -> None:
        self.name, self.port, self.flags = name, port, flags
        self.url = f"http://127.0.0.1:{port}"
        self.process: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def start(self, *flags: str) -> None:
        """Start the node (with ``flags``, or those given at creation) and wait until it answers."""
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sdproxy",
            "--log-level",
            "WARNING",
            "fake-node",
            "--port",
            str(self.port),
            "--name",
            self.name,
            *(flags or self.flags),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )

        def alive() -> None:
            assert self.process is not None
            if self.process.returncode is not None:
                raise RuntimeError(f"fake node {self.name} exited early")

        await wait_until_serving(self.url, alive=alive)

    def kill(self) -> None:
        """SIGKILL: the node dies at once, mid-request or not."""
        if self.process is not None and self.process.returncode is None:
            os.kill(self.pid, signal.SIGKILL)

    async def wait(self) -> int:
        assert self.process is not None
        return await self.process.wait()

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
        if self.process is not None:
            await self.process.wait()

    async def busy(self, session: aiohttp.ClientSession) -> bool:
        """The node is rendering (its /progress reports a job)."""
        try:
            async with session.get(f"{self.url}/sdapi/v1/progress") as resp:
                progress = await resp.json()
        except aiohttp.ClientError:
            return False
        return bool(progress["state"]["job_count"] != 0)


@asynccontextmanager
async def node_processes(*flag_sets: Sequence[str]) -> AsyncIterator[list[NodeProcess]]:
    """One subprocess fake node per flag list, on free ports, stopped at the end."""
    processes = [NodeProcess(f"p{i}", free_port(), *flags) for i, flags in enumerate(flag_sets)]
    try:
        for process in processes:
            await process.start()
        yield processes
    finally:
        for process in processes:
            await process.stop()


def info_of(response: dict[str, Any]) -> dict[str, Any]:
    info: dict[str, Any] = json.loads(response["info"])
    return info


async def reference_answer(
    session: aiohttp.ClientSession,
    node: RunningNode,
    kind: str,
    body: dict[str, Any],
    proxied: dict[str, Any],
) -> dict[str, Any]:
    """What one node answers for ``body`` given the seeds sdproxy resolved."""
    info = info_of(proxied)
    resolved = dict(body, seed=info["seed"], subseed=info["subseed"])
    status, answer, _ = await post_json(session, f"{node.url}/sdapi/v1/{kind}", resolved)
    assert status == 200, answer
    result: dict[str, Any] = answer
    return result


def assert_same_as_one_node(
    proxied: dict[str, Any], single: dict[str, Any], body: dict[str, Any]
) -> None:
    """Same pixels, same info but job_timestamp, same parameters but the seeds as sent."""
    assert [pixels(i) for i in proxied["images"]] == [pixels(i) for i in single["images"]]
    got, want = info_of(proxied), info_of(single)
    got.pop("job_timestamp")
    want.pop("job_timestamp")
    assert list(got) == list(want)
    assert got == want
    want_parameters = dict(single["parameters"])
    for key in ("seed", "subseed"):
        want_parameters[key] = body.get(key, -1)
    assert proxied["parameters"] == want_parameters
    assert list(proxied) == ["images", "parameters", "info"]


# Short timeouts so failures are found fast; generous enough for a loaded machine.
FAST: dict[str, Any] = {
    "health_interval_s": 0.2,
    "health_timeout_s": 5,
    "connect_timeout_s": 2,
    "cooldown_base_s": 0.1,
    "cooldown_max_s": 0.5,
    "share_timeout_floor_s": 20,
    "wait_for_node_s": 10,
}


def fast(**overrides: Any) -> dict[str, Any]:
    return {"scheduler": {**FAST, **overrides}}


def assert_complete(proxied: dict[str, Any], body: dict[str, Any]) -> None:
    """Every image is there once: as many images as asked, consecutive distinct seeds."""
    total = body["batch_size"] * body.get("n_iter", 1)
    info = info_of(proxied)
    # With a subseed strength the seed is shared and the subseeds count up instead.
    key = "subseed" if body.get("subseed_strength") else "seed"
    first = info[key]
    assert info[f"all_{key}s"] == list(range(first, first + total))
    assert len(proxied["images"]) == total
    assert len(set(proxied["images"])) == total  # distinct seeds render distinct images


async def wait_for_status(
    session: aiohttp.ClientSession, url: str, predicate: Any, timeout_s: float = 30
) -> dict[str, Any]:
    """Poll /cluster/status until ``predicate(status)`` holds; return that status."""
    seen: dict[str, Any] = {}

    async def holds() -> bool:
        seen.update(await cluster_status(session, url))
        return bool(predicate(seen))

    await wait_until(holds, what="a /cluster/status that matches", timeout_s=timeout_s)
    return seen


# Every way of writing "up one level" or "another separator" seen in path-traversal attacks.
PATH_ESCAPES = [
    "/controlnet/../sdapi/v1/cmd-flags",
    "/controlnet/%2e%2e/sdapi/v1/cmd-flags",
    "/controlnet/%2E%2E/sdapi/v1/cmd-flags",
    "/controlnet/%2E./sdapi/v1/cmd-flags",
    "/controlnet/.%2e/sdapi/v1/cmd-flags",
    "/controlnet/..%2fsdapi/v1/cmd-flags",
    "/controlnet/..%2Fsdapi%2Fv1%2Fcmd-flags",
    "/controlnet/%2e%2e%2fsdapi/v1/cmd-flags",
    "/controlnet/..%5csdapi/v1/cmd-flags",
    "/controlnet/..\\sdapi/v1/cmd-flags",
    "/controlnet/./../sdapi/v1/cmd-flags",
    "/controlnet/x/../../sdapi/v1/cmd-flags",
    "/controlnet//sdapi/v1/cmd-flags",
    "/controlnet/%00/x",
    "/controlnet/%/x",
    "/controlnet/%c0%ae%c0%ae/sdapi/v1/cmd-flags",  # overlong UTF-8 dots
]


# --- Redis and replicas (issue 13) ---------------------------------------------------------------


def find_redis_server() -> str | None:
    """The redis-server binary (Debian's package puts it in /usr/bin), or None."""
    return shutil.which("redis-server") or shutil.which("redis-server", path="/usr/sbin:/sbin")


class RedisServer:
    """A throwaway redis-server on 127.0.0.1: no persistence, stopped and restarted by PID.

    ``stop`` kills it (Redis gone, its data with it, as after a crash of an unpersisted Redis);
    ``pause`` freezes it (SIGSTOP: connections stay open and nothing answers, as a hung or
    partitioned Redis); ``start`` again serves on the same port.
    """

    def __init__(self, binary: str, workdir: Path, *args: str) -> None:
        self.binary, self.workdir, self.args = binary, workdir, args
        self.port = 0
        self.process: asyncio.subprocess.Process | None = None
        self.log_path = workdir / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def start(self) -> None:
        """Start on the port used before, or on a free one; wait until it answers PING."""
        from sdproxy.cli import free_port

        fixed = self.port != 0
        for _ in range(1 if fixed else 5):  # a free port can be taken before redis binds it
            self.port = self.port if fixed else free_port()
            if await self._spawn():
                return
        raise RuntimeError(f"redis-server did not start; see {self.log_path}")

    async def _spawn(self) -> bool:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log_file:
            self.process = await asyncio.create_subprocess_exec(
                self.binary,
                "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--daemonize", "no", "--dir", str(self.workdir),
                "--loglevel", "warning", *self.args,
                stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=log_file,
            )  # fmt: skip
        deadline = asyncio.get_running_loop().time() + 10
        while asyncio.get_running_loop().time() < deadline:
            if self.process.returncode is not None:
                return False
            if await self.answers():
                return True
            await asyncio.sleep(0.02)
        await self.stop()
        return False

    async def answers(self) -> bool:
        """PING is answered (PONG, or NOAUTH with requirepass); spoken by hand, not by redis-py."""
        try:
            async with asyncio.timeout(1):
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                try:
                    writer.write(b"PING\r\n")
                    answer = await reader.readline()
                    return answer == b"+PONG\r\n" or answer.startswith(b"-NOAUTH")
                finally:
                    writer.close()
        except (OSError, TimeoutError):
            return False

    async def stop(self) -> None:
        """SIGKILL and reap: Redis is gone at once, with everything it held."""
        if self.process is not None and self.process.returncode is None:
            os.kill(self.pid, signal.SIGCONT)  # a paused process must be able to die
            os.kill(self.pid, signal.SIGKILL)
        if self.process is not None:
            await self.process.wait()

    def pause(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    async def restart(self) -> None:
        await self.stop()
        await self.start()


def replica_config(
    path: Path,
    nodes: Sequence[RunningNode | NodeProcess],
    redis_url: str | None,
    *,
    node_fields: dict[str, dict[str, Any]] | None = None,
    **sections: Any,
) -> Path:
    """Write a TOML configuration for replicas in front of ``nodes`` sharing ``redis_url``.

    ``redis_url`` None: no [cluster] section, single-process mode. ``node_fields``: more
    settings of some nodes, by name (``{"n0": {"username": ..., "password": ...}}``).
    """
    data: dict[str, Any] = {"benchmark": {"on_start": False}, "scheduler": dict(FAST), **sections}
    if redis_url is not None:
        cluster = {"redis_url": redis_url, "lease_ttl_s": 3, "redis_timeout_s": 0.5}
        data["cluster"] = {**cluster, **sections.get("cluster", {})}
    lines = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    for node in nodes:
        lines += ["[[nodes]]", f"name = {json.dumps(node.name)}", f"url = {json.dumps(node.url)}"]
        fields = (node_fields or {}).get(node.name, {})
        lines += [f"{key} = {json.dumps(value)}" for key, value in fields.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class _Exited(Exception):
    """The subprocess ended before it served."""


class ReplicaProcess:
    """One sdproxy replica (``python -m sdproxy serve``) as a subprocess, to kill by PID.

    Its port and replica id come from SDPROXY_* variables; its log goes to ``log_path``.
    """

    def __init__(self, config: Path, replica_id: str, **env: str) -> None:
        self.config, self.replica_id, self.env = config, replica_id, env
        self.port = 0
        self.process: asyncio.subprocess.Process | None = None
        self.log_path = config.parent / f"{replica_id}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def start(self) -> None:
        """Start on a free port and wait until it answers /internal/ping."""
        from sdproxy.cli import free_port

        for _ in range(5):  # a free port can be taken before sdproxy binds it
            self.port = free_port()
            if await self._spawn():
                return
        raise RuntimeError(f"replica {self.replica_id} did not start; see {self.log_path}")

    async def _spawn(self) -> bool:
        env = {
            **os.environ,
            "SDPROXY_SERVER__PORT": str(self.port),
            "SDPROXY_CLUSTER__REPLICA_ID": self.replica_id,
            **self.env,
        }
        with self.log_path.open("ab") as log_file:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "sdproxy", "--log-level", "INFO",
                "serve", "--config", str(self.config),
                env=env, stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=log_file,
            )  # fmt: skip
        process = self.process

        def alive() -> None:
            if process.returncode is not None:
                raise _Exited

        try:
            await wait_until_serving(self.url, alive=alive)
        except _Exited:
            return False  # most likely the port was taken meanwhile: the caller tries another
        return True

    def kill(self) -> None:
        """SIGKILL: the replica dies at once, with the requests and leases it holds."""
        if self.process is not None and self.process.returncode is None:
            os.kill(self.pid, signal.SIGKILL)

    async def stop(self) -> None:
        """SIGTERM (a clean shutdown), then SIGKILL if it takes longer than 30 s."""
        if self.process is None or self.process.returncode is not None:
            return
        self.process.terminate()
        try:
            async with asyncio.timeout(30):
                await self.process.wait()
        except TimeoutError:
            self.kill()
            await self.process.wait()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@asynccontextmanager
async def replicas(
    config: Path, *replica_ids: str, **env: str
) -> AsyncIterator[list[ReplicaProcess]]:
    """Replicas of ``config`` started together (one per id), stopped together at the end.

    Each one the test did not end itself must stop cleanly when asked (SIGTERM, exit code 0).
    """
    started = [ReplicaProcess(config, replica_id, **env) for replica_id in replica_ids]
    ended: list[ReplicaProcess] = []
    try:
        async with asyncio.TaskGroup() as group:
            for replica in started:
                group.create_task(replica.start())
        yield started
    finally:
        ended = [r for r in started if r.process is not None and r.process.returncode is not None]
        async with asyncio.TaskGroup() as group:
            for replica in started:
                group.create_task(replica.stop())
    for replica in started:
        if replica not in ended:
            assert replica.process is not None
            assert replica.process.returncode == 0, f"{replica.replica_id} did not stop cleanly"


async def render_complete(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> dict[str, Any]:
    """POST ``body`` to ``url``'s txt2img: a 200 with every image (assert_complete)."""
    status, answer, _ = await post_json(session, f"{url}/sdapi/v1/txt2img", body)
    assert status == 200, answer
    assert_complete(answer, body)
    result: dict[str, Any] = answer
    return result


def assert_no_tracebacks(*processes: ReplicaProcess) -> None:
    """No replica logged an exception (a crash in a background task is logged, not raised)."""
    for replica in processes:
        assert "Traceback" not in replica.log_text(), replica.log_path


async def fake_stats(session: aiohttp.ClientSession, url: str) -> dict[str, int]:
    """GET /fake/stats of a fake node (in-process or subprocess)."""
    async with session.get(f"{url}/fake/stats") as resp:
        assert resp.status == 200
        stats: dict[str, int] = await resp.json()
        return stats
