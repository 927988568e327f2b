"""A client that leaves mid-request, then interrupts (a chat front-end's cancel button)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp

from sdproxy.fakewebui import FakeNodeSettings
from tests.support import (
    SMALL,
    RunningNode,
    cluster_status,
    fake_nodes,
    post_json,
    proxy,
    wait_until,
)

SLOW = 64.0  # seconds an image at 512 px: about 1 s for a 64 px image, 50 ms a step


def rendering(node: RunningNode) -> bool:
    return node.node.state.job_count != 0 and node.node.state.sampling_step >= 1


def slow_nodes(per_image_s: float) -> list[FakeNodeSettings]:
    return [FakeNodeSettings(name=f"n{i}", per_image_s=per_image_s) for i in range(2)]


def saved_seeds(folder: Path) -> list[int]:
    """The seeds in the names of the images autosave wrote (``...-seed300-n0.png``)."""
    return sorted(int(p.name.split("seed")[1].split("-")[0]) for p in folder.glob("*.png"))


def interrupts(node: RunningNode) -> int:
    return node.node.requests["POST /sdapi/v1/interrupt"]


async def leave_while_rendering(
    session: aiohttp.ClientSession, url: str, nodes: list[RunningNode], body: dict[str, Any]
) -> None:
    """Send ``body``, wait until every node renders part of it, then hang up."""
    leaver = aiohttp.ClientSession()
    task = asyncio.create_task(post_json(leaver, f"{url}/sdapi/v1/txt2img", body))
    await wait_until(lambda: all(rendering(n) for n in nodes), what="every node to render")
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)  # cancelled: the client left
    await leaver.close()


class TestCancelAfterDisconnect:
    """Abort, then POST /interrupt: the nodes stop, and the next request is not delayed."""

    async def test_abort_then_interrupt_reaches_the_abandoned_jobs(self) -> None:
        """The interrupt sent 50 ms after the abort reaches both nodes, which stop early."""
        async with (
            fake_nodes(*slow_nodes(SLOW)) as nodes,
            proxy(nodes, scheduler={"on_disconnect": "finish"}) as url,
            aiohttp.ClientSession() as session,
        ):
            body = {"batch_size": 1, "n_iter": 12, "seed": 200, **SMALL}
            await leave_while_rendering(session, url, nodes, body)
            status = await cluster_status(session, url)
            assert [r["client_left"] for r in status["in_flight"]] == [False]  # finish: kept on
            async with session.get(f"{url}/sdapi/v1/progress") as resp:
                progress = await resp.json()
            assert progress["state"]["job_count"] > 0  # the left request's jobs, still shown
            async with session.post(f"{url}/sdapi/v1/interrupt") as resp:
                assert resp.status == 200
            assert [interrupts(n) for n in nodes] == [1, 1]
            await wait_until(lambda: not any(n.node.state.job_count for n in nodes), what="stop")
            assert sum(n.node.images_rendered for n in nodes) < 12

    async def test_abort_then_interrupt_by_default(self) -> None:
        """With no autosave, the left request is interrupted; the client's interrupt is fine."""
        async with (
            fake_nodes(*slow_nodes(SLOW)) as nodes,
            proxy(nodes) as url,
            aiohttp.ClientSession() as session,
        ):
            body = {"batch_size": 1, "n_iter": 12, "seed": 200, **SMALL}
            await leave_while_rendering(session, url, nodes, body)
            await asyncio.sleep(0.05)  # the front-end's gap between abort and interrupt
            async with session.post(f"{url}/sdapi/v1/interrupt") as resp:
                assert resp.status == 200
            await wait_until(lambda: all(interrupts(n) >= 1 for n in nodes), what="interrupts")
            await wait_until(lambda: not any(n.node.state.job_count for n in nodes), what="stop")
            status = await cluster_status(session, url)
            assert status["in_flight"] == []
            assert sum(n.node.images_rendered for n in nodes) < 12
            status_code, answer, _ = await post_json(
                session, f"{url}/sdapi/v1/txt2img", {"batch_size": 2, **SMALL}
            )
            assert status_code == 200, answer

    async def test_left_request_is_finished_and_autosaved(self, tmp_path: Path) -> None:
        """With autosave on, the request whose client left renders to the end, saved to disk."""
        async with (
            fake_nodes(*slow_nodes(16.0)) as nodes,
            proxy(nodes, autosave={"dir": str(tmp_path)}) as url,
            aiohttp.ClientSession() as session,
        ):
            body = {"batch_size": 1, "n_iter": 4, "seed": 300, **SMALL}
            await leave_while_rendering(session, url, nodes, body)
            await wait_until(lambda: len(saved_seeds(tmp_path)) == 4, what="4 saved images")
            assert [interrupts(n) for n in nodes] == [0, 0]
            assert saved_seeds(tmp_path) == [300, 301, 302, 303]
