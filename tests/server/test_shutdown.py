"""Clients that leave and a proxy that stops: unstarted work is dropped, in-flight work ends."""

from __future__ import annotations

import asyncio
import signal
import sys
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
    post_json,
    proxy,
    wait_until,
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


@pytest.mark.slow
class TestSigterm:
    """SIGTERM on ``sdproxy serve``: no new connections, requests in flight finish, exit 0."""

    async def test_sigterm_lets_in_flight_request_finish(self, tmp_path: Path) -> None:
        """A request running at SIGTERM completes; new connections are refused; status 0."""
        port = free_port()
        async with fake_nodes(SLOW_NODE) as nodes, aiohttp.ClientSession() as session:
            config = tmp_path / "sdproxy.toml"
            config.write_text(
                f"[server]\nport = {port}\nshutdown_grace_s = 30\n\n"
                "[benchmark]\non_start = false\n\n"
                f'[[nodes]]\nname = "n0"\nurl = "{nodes[0].url}"\n'
            )
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "sdproxy", "serve", "--config", str(config),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            url = f"http://127.0.0.1:{port}"
            try:

                async def serving() -> bool:
                    try:
                        await cluster_status(session, url)
                    except aiohttp.ClientError:
                        return False
                    return True

                await wait_until(serving, what="sdproxy to start")
                body = {"batch_size": 2, "seed": 3, **SMALL}
                request = asyncio.create_task(post_json(session, f"{url}/sdapi/v1/txt2img", body))

                async def rendering() -> bool:
                    return nodes[0].node.state.job_count != 0

                await wait_until(rendering, what="the node to start rendering")
                process.send_signal(signal.SIGTERM)

                async def refusing() -> bool:
                    try:
                        _, writer = await asyncio.open_connection("127.0.0.1", port)
                    except OSError:
                        return True
                    writer.close()
                    await writer.wait_closed()
                    return False

                await wait_until(refusing, what="sdproxy to stop accepting")
                status, proxied, _ = await request
                assert status == 200, proxied
                assert_complete(proxied, body)
                async with asyncio.timeout(30):
                    assert await process.wait() == 0
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
