"""Nodes run as real processes and killed mid-request: no image is lost or rendered twice."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from sdproxy.fakewebui import FakeNodeSettings
from tests.support import (
    SMALL,
    assert_complete,
    assert_same_as_one_node,
    fake_nodes,
    fast,
    node_processes,
    node_state,
    post_json,
    proxy,
    reference_answer,
    wait_until,
)

pytestmark = pytest.mark.slow


class TestKilledNodes:
    """A node process that dies mid-generation: its images come from the other nodes."""

    async def test_node_killed_by_pid_mid_request(self) -> None:
        """SIGKILL one of two nodes while it renders: same answer as one clean node."""
        slow = ["--per-image-s", "200", "--overhead-s", "0"]  # 3 s an image at 64 px
        async with (
            node_processes(slow, ["--per-image-s", "0.05"]) as procs,
            fake_nodes(FakeNodeSettings(name="ref")) as reference,
            proxy(
                [{"name": p.name, "url": p.url} for p in procs], **fast(health_interval_s=30)
            ) as url,
            aiohttp.ClientSession() as session,
        ):
            body = {"prompt": "a heron", "batch_size": 2, "n_iter": 2, "seed": 4321, **SMALL}
            request = asyncio.create_task(
                post_json(session, f"{url}/sdapi/v1/txt2img", body), name="request"
            )
            await wait_until(lambda: procs[0].busy(session), what="p0 to start rendering")
            procs[0].kill()
            status, proxied, headers = await request
            assert status == 200, proxied
            assert await procs[0].wait() != 0
            assert_complete(proxied, body)
            assert {s.split(":")[0] for s in headers["X-Sdproxy-Shares"].split(",")} == {"p1"}
            single = await reference_answer(session, reference[0], "txt2img", body, proxied)
            assert_same_as_one_node(proxied, single, body)
            state = await node_state(session, url, "p0")
            assert state["state"] == "down"
            assert state["consecutive_failures"] >= 1

    async def test_node_exits_mid_request_then_restarts(self) -> None:
        """``--fail-mode exit``: the process dies 0.2 s in; restarted, it is used again."""
        async with (
            node_processes(
                ["--per-image-s", "0.5", "--fail-mode", "exit", "--fail-after-s", "0.2"],
                ["--per-image-s", "0.05"],
            ) as procs,
            fake_nodes(FakeNodeSettings(name="ref")) as reference,
            proxy([{"name": p.name, "url": p.url} for p in procs], **fast()) as url,
            aiohttp.ClientSession() as session,
        ):
            body = {"batch_size": 6, "seed": 11, **SMALL}
            status, proxied, _ = await post_json(session, f"{url}/sdapi/v1/txt2img", body)
            assert status == 200, proxied
            assert await procs[0].wait() == 3  # the fake node's os._exit code
            single = await reference_answer(session, reference[0], "txt2img", body, proxied)
            assert_same_as_one_node(proxied, single, body)

            await procs[0].start("--per-image-s", "0.05")

            async def back_up() -> bool:
                return bool((await node_state(session, url, "p0"))["state"] == "up")

            await wait_until(back_up, what="p0 to come back after its restart")
            status, proxied, headers = await post_json(session, f"{url}/sdapi/v1/txt2img", body)
            assert status == 200, proxied
            assert "p0:" in headers["X-Sdproxy-Shares"]
            single = await reference_answer(session, reference[0], "txt2img", body, proxied)
            assert_same_as_one_node(proxied, single, body)

    async def test_idle_node_killed_is_found_by_the_poller(self) -> None:
        """A node dying between requests is marked down by a probe; no request pays for it."""
        async with (
            node_processes([], []) as procs,
            proxy([{"name": p.name, "url": p.url} for p in procs], **fast()) as url,
            aiohttp.ClientSession() as session,
        ):
            procs[0].kill()

            async def probed_down() -> bool:
                state = await node_state(session, url, "p0")
                return bool(state["state"] == "down" and state["state_reason"] == "probe failed")

            await wait_until(probed_down, what="the poller to mark p0 down")
            body = {"batch_size": 4, "seed": 1, **SMALL}
            status, proxied, headers = await post_json(session, f"{url}/sdapi/v1/txt2img", body)
            assert status == 200, proxied
            assert_complete(proxied, body)
            assert headers["X-Sdproxy-Shares"] == "p1:0-3"
            assert (await node_state(session, url, "p1"))["consecutive_failures"] == 0
