"""Clients that leave and a proxy that stops: unstarted work is dropped, in-flight work ends."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest

from sdproxy.fakewebui import FakeNodeSettings
from tests.support import (
    SMALL,
    assert_complete,
    cluster_status,
    fake_nodes,
    fast,
    free_port,
    node_processes,
    post_json,
    proxy,
    wait_until,
    wait_until_serving,
)

SLOW_NODE = FakeNodeSettings(name="n0", per_image_s=64.0)  # about 1 s an image at 64 px


class TestClientDisconnect:
    """A client that disconnects: its jobs not yet started are never sent to a node."""

    async def test_disconnected_request_is_dropped_from_the_queue(self) -> None:
        """B waits behind A, B's client leaves; after A, the node renders C, never B."""
        async with (
            fake_nodes(SLOW_NODE) as nodes,
            proxy(nodes, **fast()) as url,
            aiohttp.ClientSession() as session,
        ):
            body = {"batch_size": 1, **SMALL}
            first = asyncio.create_task(post_json(session, f"{url}/sdapi/v1/txt2img", body))

            async def queued(images: int) -> bool:
                status = await cluster_status(session, url)
                return bool(status["nodes"][0]["queued_images"] == images)

            await wait_until(lambda: queued(1), what="A to be queued")
            leaver_session = aiohttp.ClientSession()
            leaver = asyncio.create_task(
                post_json(leaver_session, f"{url}/sdapi/v1/txt2img", {"batch_size": 2, **SMALL})
            )
            await wait_until(lambda: queued(3), what="B to queue behind A")
            leaver.cancel()
            await leaver_session.close()
            await wait_until(lambda: queued(1), what="B to be dropped")
            status, _, _ = await first
            assert status == 200
            status, answer, _ = await post_json(session, f"{url}/sdapi/v1/txt2img", body)
            assert status == 200, answer
            assert (nodes[0].node.generations, nodes[0].node.images_rendered) == (2, 2)
            with pytest.raises(asyncio.CancelledError):
                await leaver


@asynccontextmanager
async def sdproxy_process(
    tmp_path: Path, node_url: str, grace_s: float
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """``sdproxy serve`` as a subprocess in front of one node, serving; killed at the end."""
    port = free_port()
    config = tmp_path / "sdproxy.toml"
    config.write_text(
        f"[server]\nport = {port}\nshutdown_grace_s = {grace_s}\n\n"
        "[benchmark]\non_start = false\n\n"
        f'[[nodes]]\nname = "n0"\nurl = "{node_url}"\n'
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sdproxy", "serve", "--config", str(config),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def alive() -> None:
        if process.returncode is not None:
            raise RuntimeError("sdproxy exited early")

    try:
        await wait_until_serving(url, alive=alive)
        yield process, url
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def refusing(port: int) -> bool:
    """Nothing accepts connections on ``port`` any more."""
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return True
    writer.close()
    await writer.wait_closed()
    return False


@pytest.mark.slow
class TestSigterm:
    """SIGTERM on ``sdproxy serve``: no new connections, requests in flight get the grace."""

    async def test_sigterm_lets_in_flight_request_finish(self, tmp_path: Path) -> None:
        """A request running at SIGTERM completes; new connections are refused; status 0."""
        async with (
            fake_nodes(SLOW_NODE) as nodes,
            aiohttp.ClientSession() as session,
            sdproxy_process(tmp_path, nodes[0].url, grace_s=30) as (process, url),
        ):
            body = {"batch_size": 2, "seed": 3, **SMALL}
            request = asyncio.create_task(post_json(session, f"{url}/sdapi/v1/txt2img", body))
            await wait_until(
                lambda: nodes[0].node.state.job_count != 0, what="the node to start rendering"
            )
            process.send_signal(signal.SIGTERM)
            port = int(url.rsplit(":", 1)[1])
            await wait_until(lambda: refusing(port), what="sdproxy to stop accepting")
            status, proxied, _ = await request
            assert status == 200, proxied
            assert_complete(proxied, body)
            async with asyncio.timeout(30):
                assert await process.wait() == 0

    async def test_sigterm_answers_stuck_request_after_grace(self, tmp_path: Path) -> None:
        """A request still running when shutdown_grace_s ends gets a 503; sdproxy exits 0.

        Before, the grace was not enforced: aiohttp waited it twice, then dropped the
        connection without an answer (61.5 s with a 30 s grace).
        """
        grace_s = 1.0
        async with (
            node_processes(["--fail-mode", "hang"]) as (node,),
            aiohttp.ClientSession() as session,
            sdproxy_process(tmp_path, node.url, grace_s=grace_s) as (process, url),
        ):
            request = asyncio.create_task(
                post_json(session, f"{url}/sdapi/v1/txt2img", {"batch_size": 1, **SMALL})
            )
            await wait_until(lambda: node.busy(session), what="the node to start the job")
            process.send_signal(signal.SIGTERM)
            status, answer, headers = await request
            assert status == 503, answer
            assert answer["error"] == "ShuttingDown"
            assert set(answer) == {"error", "detail", "body", "errors"}
            assert "X-Request-ID" in headers
            # The grace, the answer and closing the cluster: far less than aiohttp's 2 x grace.
            async with asyncio.timeout(grace_s + 14):
                assert await process.wait() == 0
