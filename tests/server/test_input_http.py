"""Bad input over HTTP: body size and speed, header limits, images checked before fan-out."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from PIL import Image

from sdproxy.core import images
from sdproxy.fakewebui import FakeNodeSettings, Fault
from tests.support import SMALL, RunningNode, fake_nodes, post_json, proxy

WAIT_S = 30  # generous: the machine is shared; nothing here should take more than a moment


def png_b64(size: int = 16) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (9, 99, 199)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


async def raw_exchange(url: str, request: bytes, *, close_after: bool = False) -> bytes:
    """Send ``request`` bytes on a fresh connection; everything read until the server closes."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(request)
        await writer.drain()
        if close_after:
            writer.write_eof()
        async with asyncio.timeout(WAIT_S):
            chunks = []
            while chunk := await reader.read(65536):
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks) and not close_after:
                    break
            return b"".join(chunks)
    finally:
        writer.close()


class TestBodyLimits:
    """Bodies over max_body_mb get 413 JSON without being read whole; slow bodies get 408."""

    async def test_content_length_over_limit_is_413_before_the_body(self) -> None:
        """A Content-Length over the limit is answered with nothing of the body sent."""
        async with (
            fake_nodes(FakeNodeSettings()) as nodes,
            proxy(nodes, server={"max_body_mb": 1}) as url,
        ):
            head = (
                b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\nContent-Length: 999999999\r\n\r\n"
            )
            answer = await raw_exchange(url, head)
        assert answer.startswith(b"HTTP/1.1 413 ")
        assert b"application/json" in answer

    async def test_streamed_body_is_cut_off_with_413(self) -> None:
        """A chunked body that would be 1 GiB gets 413 after little more than the limit."""
        sent = 0

        async def endless() -> AsyncIterator[bytes]:
            nonlocal sent
            chunk = b"x" * 65536
            for _ in range(16384):
                sent += len(chunk)
                yield chunk

        async with (
            fake_nodes(FakeNodeSettings()) as nodes,
            proxy(nodes, server={"max_body_mb": 1}) as url,
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT_S)) as session,
            session.post(f"{url}/sdapi/v1/txt2img", data=endless()) as resp,
        ):
            body = await resp.json()
        assert resp.status == 413
        assert body == {
            "error": "HTTPException",
            "detail": "request body larger than 1 MiB",
            "body": "",
            "errors": "",
        }
        assert sent < 1024**3 // 4
        assert nodes[0].node.images_rendered == 0

    async def test_slow_body_gets_408(self) -> None:
        """A body that stops arriving is answered 408 after body_timeout_s."""
        async with (
            fake_nodes(FakeNodeSettings()) as nodes,
            proxy(nodes, server={"body_timeout_s": 0.3}) as url,
        ):
            head = (
                b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\n"
                b'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"pro'
            )
            answer = await raw_exchange(url, head)
        assert answer.startswith(b"HTTP/1.1 408 ")

    async def test_client_leaving_mid_body_is_not_an_error(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A client that hangs up halfway through its body is logged as 499, not a 500."""
        caplog.set_level(logging.INFO)
        answered = asyncio.Event()

        class Watch(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if "status=499" in record.getMessage():
                    answered.set()  # the server runs on this loop's thread

        watch = Watch()
        logging.getLogger("sdproxy.access").addHandler(watch)
        async with fake_nodes(FakeNodeSettings()) as nodes, proxy(nodes) as url:
            parts = urlsplit(url)
            _, writer = await asyncio.open_connection(parts.hostname, parts.port)
            writer.write(
                b'POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"pro'
            )
            await writer.drain()
            writer.close()
            try:
                async with asyncio.timeout(WAIT_S):
                    await answered.wait()
            finally:
                logging.getLogger("sdproxy.access").removeHandler(watch)
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


class TestConnectionLimits:
    """Request heads are bounded in size, count and time."""

    @pytest.mark.parametrize(
        "headers",
        [
            {"X-Big": "a" * 9000},
            {f"X-H{i}": "v" for i in range(200)},
        ],
    )
    async def test_oversized_head_is_4xx(self, headers: dict[str, str]) -> None:
        """A header over max_field_size, or more than max_headers of them: 4xx, no 5xx."""
        async with (
            fake_nodes(FakeNodeSettings()) as nodes,
            proxy(nodes) as url,
            aiohttp.ClientSession() as session,
            session.get(f"{url}/cluster/status", headers=headers) as resp,
        ):
            assert 400 <= resp.status < 500
        async with (
            fake_nodes(FakeNodeSettings()) as nodes,
            proxy(nodes, server={"max_field_size": 65536, "max_headers": 512}) as url,
            aiohttp.ClientSession() as session,
            session.get(f"{url}/cluster/status", headers=headers) as resp,
        ):
            assert resp.status == 200

    async def test_slow_head_is_disconnected(self) -> None:
        """A client that never finishes its request head is dropped after keepalive_timeout_s."""
        async with (
            fake_nodes(FakeNodeSettings()) as nodes,
            proxy(nodes, server={"keepalive_timeout_s": 0.3}) as url,
        ):
            answer = await raw_exchange(url, b"GET /cluster/status HTTP/1.1\r\nHost: x\r\nX-A: ")
        assert answer == b""


async def img2img(nodes: list[RunningNode], body: dict[str, Any], **server: Any) -> Any:
    async with proxy(nodes, server=server) as url, aiohttp.ClientSession() as session:
        return await post_json(session, f"{url}/sdapi/v1/img2img", body)


class TestImagesBeforeFanOut:
    """Init images and masks are decoded once by sdproxy; bad ones never reach a node."""

    async def test_undecodable_init_image_and_mask_are_422(self) -> None:
        """Each bad image is named by its field and index."""
        body = {
            "init_images": [png_b64(), "bm90IGFuIGltYWdl", "data:image/png;base64," + png_b64()],
            "mask": "%%%",
            "batch_size": 3,
            "width": 64,
            "height": 64,
        }
        async with fake_nodes(FakeNodeSettings()) as nodes:
            status, answer, _ = await img2img(nodes, body)
        assert status == 422
        assert [e["loc"] for e in answer["detail"]] == [
            ["body", "init_images", 1],
            ["body", "mask"],
        ]
        assert {e["type"] for e in answer["detail"]} == {"value_error.image"}
        assert nodes[0].node.images_rendered == 0

    async def test_image_url_is_422_unless_allowed(self) -> None:
        """An http(s) init image is refused; with allow_image_urls it goes to the node."""
        body = {"init_images": ["http://127.0.0.1:1/a.png"], "width": 64, "height": 64}
        async with fake_nodes(FakeNodeSettings()) as nodes:
            status, answer, _ = await img2img(nodes, body)
            assert status == 422
            assert answer["detail"][0]["loc"] == ["body", "init_images", 0]
            assert answer["detail"][0]["type"] == "value_error.url.not_allowed"
            status, answer, _ = await img2img(nodes, body, allow_image_urls=True)
            # It reached the node, which (like the webui) fails to fetch it: its own body.
            assert status == 422
            assert answer["detail"] == "Invalid image url"

    async def test_oversized_request_is_422(self) -> None:
        """width, height and steps over the configured bounds never reach a node."""
        body = {"init_images": [png_b64()], "width": 8192, "steps": 10_000}
        async with fake_nodes(FakeNodeSettings()) as nodes:
            status, answer, _ = await img2img(nodes, body)
        assert status == 422
        assert [e["loc"] for e in answer["detail"]] == [["body", "steps"], ["body", "width"]]
        assert nodes[0].node.images_rendered == 0


class TestNodeRaises:
    """A node that answers with the webui's exception body is up; the request may be at fault."""

    async def test_request_raising_everywhere_is_422_and_nodes_stay_up(self) -> None:
        """An unknown override_settings key: the node's KeyError body with 422, nodes healthy."""
        body = {"override_settings": {"no_such_option": 1}, "batch_size": 4, **SMALL}
        async with (
            fake_nodes(FakeNodeSettings(name="a"), FakeNodeSettings(name="b")) as nodes,
            proxy(nodes) as url,
            aiohttp.ClientSession() as session,
        ):
            status, answer, _ = await post_json(session, f"{url}/sdapi/v1/txt2img", body)
            assert status == 422
            assert answer["error"] == "KeyError"
            assert "no_such_option" in answer["errors"]
            async with session.get(f"{url}/cluster/status") as resp:
                cluster = await resp.json()
            assert [n["healthy"] for n in cluster["nodes"]] == [True, True]
            status, answer, _ = await post_json(session, f"{url}/sdapi/v1/txt2img", SMALL)
            assert status == 200

    async def test_one_node_raising_is_retried_elsewhere(self) -> None:
        """A node whose jobs raise loses its share to another node; no image is lost."""
        async with fake_nodes(FakeNodeSettings(name="a"), FakeNodeSettings(name="b")) as nodes:
            nodes[0].node.settings.fault = Fault(mode="error500")
            async with proxy(nodes) as url, aiohttp.ClientSession() as session:
                body = {"batch_size": 2, "n_iter": 3, "seed": 40, **SMALL}
                status, answer, headers = await post_json(session, f"{url}/sdapi/v1/txt2img", body)
        assert status == 200, answer
        assert len(answer["images"]) == 6
        assert json.loads(answer["info"])["all_seeds"] == list(range(40, 46))
        assert {share.split(":")[0] for share in headers["X-Sdproxy-Shares"].split(",")} == {"b"}


class TestUrlsOnForwardedRoutes:
    """One-node work and extension routes refuse URLs anywhere in the body, too."""

    @pytest.mark.parametrize(
        ("path", "body", "loc"),
        [
            ("/sdapi/v1/extra-single-image", {"image": "https://x/a.png"}, ["body", "image"]),
            ("/sdapi/v1/interrogate", {"image": "http://10.0.0.1/a"}, ["body", "image"]),
            (
                "/sdapi/v1/extra-batch-images",
                {"imageList": [{"data": "http://x/a.png", "name": "a"}]},
                ["body", "imageList", 0, "data"],
            ),
            (
                "/controlnet/detect",
                {"controlnet_input_images": ["https://x/b.png"]},
                ["body", "controlnet_input_images", 0],
            ),
        ],
    )
    async def test_forwarded_url_is_422(self, path: str, body: Any, loc: list[Any]) -> None:
        """The URL is named in a 422 and no node is called."""
        async with (
            fake_nodes(FakeNodeSettings()) as nodes,
            proxy(nodes) as url,
            aiohttp.ClientSession() as session,
        ):
            status, answer, _ = await post_json(session, f"{url}{path}", body)
        assert status == 422
        assert [e["loc"] for e in answer["detail"]] == [loc]

    async def test_forwarded_url_allowed(self) -> None:
        """With allow_image_urls the body goes to the node, which answers for itself."""
        async with (
            fake_nodes(FakeNodeSettings()) as nodes,
            proxy(nodes, server={"allow_image_urls": True}) as url,
            aiohttp.ClientSession() as session,
        ):
            body = {"image": "http://127.0.0.1:1/a.png"}
            status, answer, _ = await post_json(session, f"{url}/sdapi/v1/interrogate", body)
        assert (status, answer.get("detail")) == (422, "Invalid image url")


class TestInitImageCost:
    """Init images are bounded in decoded pixels per request and decoded a few at a time."""

    async def test_request_total_is_bounded_before_decoding(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Three 1 MP images against a 2 MP total: 422 at the third, no pixel decoded."""
        decoded: list[bytes] = []
        real = images.check_decodes

        def counting(raw: bytes) -> str | None:
            decoded.append(raw)
            return real(raw)

        monkeypatch.setattr(images, "check_decodes", counting)
        one_mp = png_b64(1000)
        body = {"init_images": [one_mp] * 3, "batch_size": 3, **SMALL}
        async with fake_nodes(FakeNodeSettings()) as nodes:
            server = {"max_input_megapixels": 1, "max_request_megapixels": 2}
            status, answer, _ = await img2img(nodes, body, **server)
        assert status == 422
        (error,) = answer["detail"]
        assert error["loc"] == ["body", "init_images", 2]
        assert error["type"] == "value_error.image.total"
        assert decoded == []
        assert nodes[0].node.images_rendered == 0

    async def test_decoding_is_bounded_across_requests(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Eight requests at once decode at most image_decode_threads images at a time."""
        running, peak = 0, 0
        lock = threading.Lock()
        real = images.check_decodes

        def counting(raw: bytes) -> str | None:
            nonlocal running, peak
            with lock:
                running += 1
                peak = max(peak, running)
            try:
                time.sleep(0.02)  # inside a worker thread: long enough for requests to overlap
                return real(raw)
            finally:
                with lock:
                    running -= 1

        monkeypatch.setattr(images, "check_decodes", counting)
        body = {"init_images": [png_b64(64)], **SMALL}
        async with (
            fake_nodes(FakeNodeSettings()) as nodes,
            proxy(nodes, server={"image_decode_threads": 2}) as url,
            aiohttp.ClientSession() as session,
        ):
            results = await asyncio.gather(
                *(post_json(session, f"{url}/sdapi/v1/img2img", body) for _ in range(8))
            )
        assert [status for status, _, _ in results] == [200] * 8
        assert 1 <= peak <= 2


class TestParseTimeRefusals:
    """Issue 10's inputs that reached nodes (and wedged or overflowed) are 422s at parse time."""

    @pytest.mark.parametrize(
        ("body", "field"),
        [
            ({"seed": 18446744073709551615, "batch_size": 2}, "seed"),
            ({"seed": 1e20}, "seed"),
            ({"subseed": 2**64}, "subseed"),
            ({"seed": -(2**70)}, "seed"),
            ({"height": None}, "height"),
            ({"width": 4096, "height": 64, "enable_hr": True, "hr_resize_y": 512}, "hr_resize_y"),
            ({"enable_hr": True, "hr_scale": 1e308}, "hr_scale"),
        ],
    )
    async def test_refused_before_any_node(self, body: dict[str, Any], field: str) -> None:
        """A 422 naming the field, and no node is asked to render anything."""
        async with (
            fake_nodes(FakeNodeSettings(name="a"), FakeNodeSettings(name="b")) as nodes,
            proxy(nodes) as url,
            aiohttp.ClientSession() as session,
        ):
            status, answer, _ = await post_json(
                session, f"{url}/sdapi/v1/txt2img", {**SMALL, **body}
            )
            assert status == 422, answer
            assert [e["loc"] for e in answer["detail"]] == [["body", field]]
            assert sum(n.node.requests["POST /sdapi/v1/txt2img"] for n in nodes) == 0
            status, _, _ = await post_json(session, f"{url}/sdapi/v1/txt2img", SMALL)
            assert status == 200  # and the cluster still serves
