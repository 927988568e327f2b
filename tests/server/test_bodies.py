"""Request bodies over HTTP: nesting depth on every route, content encodings, Expect."""

from __future__ import annotations

import asyncio
import base64
import gzip
import logging
import zlib
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
import pytest

from sdproxy.fakewebui import FakeNodeSettings
from tests.support import SMALL, fake_nodes, proxy

WAIT_S = 30


def nested(depth: int, leaf: Any = 1) -> Any:
    """``leaf`` inside ``depth`` lists."""
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


async def exchange(url: str, data: bytes) -> tuple[bytes, bytes]:
    """Send raw bytes on a new connection; (head, body) of everything read until it closes."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(WAIT_S):
            answer = await reader.read()
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return head, body


def post(path: str, body: bytes, *headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: x", "Connection: close", *headers]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


DEEP, DEEPEST = "<300 levels>", "<1000 levels>"
MAX_DEPTH = 64  # the limit README's Security section documents (core.jsondepth.MAX_DEPTH)


class TestDepth:
    """Nesting beyond 64 levels in any body sdproxy reads is a 422; no node hears of it."""

    @pytest.mark.parametrize(
        ("path", "body"),
        [
            ("/sdapi/v1/txt2img", {"alwayson_scripts": {"x": {"args": DEEP}}, **SMALL}),
            ("/sdapi/v1/img2img", {"init_images": ["x"], "script_args": DEEP}),
            ("/sdapi/v1/options", {"sd_vae": DEEP}),
            ("/sdapi/v1/png-info", {"image": "x", "extra": DEEP}),
            ("/sdapi/v1/extra-single-image", {"image": DEEP}),
            ("/sdapi/v1/interrogate", {"image": DEEP}),
            ("/controlnet/detect", {"controlnet_input_images": DEEP}),
            ("/sdapi/v1/txt2img", {"prompt": DEEPEST}),  # orjson's own limit is 1024
        ],
    )
    async def test_deep_body_is_422_on_every_route(self, path: str, body: Any) -> None:
        """300 levels anywhere: 422 naming where, and no node hears of it (was 500 or a hang)."""
        text = orjson.dumps(body).decode()
        for marker, depth in ((DEEP, 300), (DEEPEST, 1000)):  # too deep for any JSON encoder
            text = text.replace(f'"{marker}"', "[" * depth + "1" + "]" * depth)
        async with (
            fake_nodes(FakeNodeSettings()) as nodes,
            proxy(nodes) as url,
            aiohttp.ClientSession() as session,
        ):
            before = sum(nodes[0].node.requests.values())
            headers = {"Content-Type": "application/json"}
            async with session.post(f"{url}{path}", data=text, headers=headers) as resp:
                status, answer = resp.status, await resp.json()
            after = sum(nodes[0].node.requests.values())
        assert status == 422, answer
        (error,) = answer["detail"]
        assert error["type"] == "value_error.json.depth"
        assert len(error["loc"]) == MAX_DEPTH + 1
        assert after == before


class TestContentEncoding:
    """gzip and deflate are inflated with the body limit on the inflated size; others are 415."""

    async def test_compressed_bodies_work(self) -> None:
        """gzip, zlib-wrapped and raw deflate bodies are read like plain ones."""
        body = orjson.dumps({"prompt": "x", **SMALL})
        raw_deflate = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        encodings = {
            "gzip": gzip.compress(body),
            "deflate": zlib.compress(body),
            "Deflate": raw_deflate.compress(body) + raw_deflate.flush(),
            "identity": body,
        }
        async with fake_nodes(FakeNodeSettings()) as nodes, proxy(nodes) as url:
            for coding, data in encodings.items():
                head, _ = await exchange(
                    url, post("/sdapi/v1/txt2img", data, f"Content-Encoding: {coding}")
                )
                assert head.startswith(b"HTTP/1.1 200 "), (coding, head)

    async def test_inflated_size_is_limited(self) -> None:
        """50 KB of deflate that would inflate to 50 MB: 413 against a 1 MiB limit."""
        bomb = zlib.compress(b'{"prompt": "' + b"a" * 50_000_000 + b'"}', 9)
        assert len(bomb) < 100_000
        request = post("/sdapi/v1/txt2img", bomb, "Content-Encoding: deflate")
        async with (
            fake_nodes(FakeNodeSettings()) as nodes,
            proxy(nodes, server={"max_body_mb": 1}) as url,
        ):
            head, body = await exchange(url, request)
        assert head.startswith(b"HTTP/1.1 413 ")
        assert orjson.loads(body)["detail"] == "request body larger than 1 MiB"
        assert nodes[0].node.requests["POST /sdapi/v1/txt2img"] == 0

    @pytest.mark.parametrize(
        ("coding", "data", "status"),
        [
            ("br", b"{}", 415),
            ("zstd", b"{}", 415),
            ("compress", b"{}", 415),
            ("gzip, gzip", gzip.compress(gzip.compress(b"{}")), 415),
            ("gzip", b"\x1f\x8b\x08\x00garbage", 400),
            ("gzip", gzip.compress(b'{"prompt": "x"}')[:-6], 400),  # cut short
            ("deflate", zlib.compress(b"{}") + b"trailing", 400),
        ],
    )
    async def test_unknown_or_broken_encoding_is_one_clean_4xx(
        self, caplog: pytest.LogCaptureFixture, coding: str, data: bytes, status: int
    ) -> None:
        """The webui's error shape, one access line, and no error or traceback in the log."""
        caplog.set_level(logging.DEBUG)
        async with fake_nodes(FakeNodeSettings()) as nodes, proxy(nodes) as url:
            head, body = await exchange(
                url, post("/sdapi/v1/png-info", data, f"Content-Encoding: {coding}")
            )
        assert head.startswith(f"HTTP/1.1 {status} ".encode()), head
        assert set(orjson.loads(body)) == {"error", "detail", "body", "errors"}
        access = [r for r in caplog.records if r.name == "sdproxy.access"]
        assert [f"status={status}" in r.getMessage() for r in access] == [True]
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]


GOOD = "Basic " + base64.b64encode(b"alice:wonderland").decode()


class TestExpectContinue:
    """100 Continue is sent only to a request that passed authentication and the size check."""

    async def read_first_line(self, url: str, *headers: str) -> bytes:
        parts = urlsplit(url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        lines = ["POST /sdapi/v1/txt2img HTTP/1.1", "Host: x", "Expect: 100-continue", *headers]
        writer.write(("\r\n".join([*lines, "Content-Length: 60"]) + "\r\n\r\n").encode())
        try:
            async with asyncio.timeout(WAIT_S):
                return await reader.readline()
        finally:
            writer.close()

    async def test_unauthenticated_gets_401_not_continue(self) -> None:
        """Without credentials the answer is 401 at once, and no body is asked for."""
        async with (
            fake_nodes(FakeNodeSettings()) as nodes,
            proxy(nodes, server={"api_auth": "alice:wonderland"}) as url,
        ):
            assert (await self.read_first_line(url)).startswith(b"HTTP/1.1 401 ")
            wrong = "Authorization: Basic " + base64.b64encode(b"alice:x").decode()
            assert (await self.read_first_line(url, wrong)).startswith(b"HTTP/1.1 401 ")
            ok = await self.read_first_line(url, f"Authorization: {GOOD}")
        assert ok == b"HTTP/1.1 100 Continue\r\n"

    async def test_too_large_gets_413_not_continue(self) -> None:
        """A Content-Length over the limit is refused before the body is asked for."""
        async with fake_nodes(FakeNodeSettings()) as nodes, proxy(nodes) as url:
            parts = urlsplit(url)
            reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
            writer.write(
                b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                b"Content-Length: 999999999\r\n\r\n"
            )
            async with asyncio.timeout(WAIT_S):
                first = await reader.readline()
            writer.close()
        assert first.startswith(b"HTTP/1.1 413 ")

    async def test_unknown_expectation_is_417(self) -> None:
        """Any other expectation: 417 in the webui's error shape."""
        async with fake_nodes(FakeNodeSettings()) as nodes, proxy(nodes) as url:
            head, body = await exchange(url, post("/sdapi/v1/txt2img", b"{}", "Expect: teapot"))
        assert head.startswith(b"HTTP/1.1 417 ")
        assert orjson.loads(body)["error"] == "HTTPException"

    async def test_continue_then_the_answer(self) -> None:
        """A client that waits for 100 Continue, then sends its body, gets its images."""
        async with (
            fake_nodes(FakeNodeSettings()) as nodes,
            proxy(nodes) as url,
            aiohttp.ClientSession() as session,
            session.post(
                f"{url}/sdapi/v1/txt2img", json={"prompt": "x", **SMALL}, expect100=True
            ) as resp,
        ):
            assert resp.status == 200
            assert len((await resp.json())["images"]) == 1
