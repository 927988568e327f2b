"""The fake node's lies and the answers of servers in its way (fakewebui/faults.py), and gzip."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from sdproxy.fakewebui import FakeNode, FakeNodeSettings, Fault, FaultMode, create_fake_app
from tests.support import SMALL, info_of, pixels

Client = TestClient[web.Request, web.Application]
BODY = {"prompt": "a fox", "seed": 500, "subseed": 40, "batch_size": 2, **SMALL}


@asynccontextmanager
async def serving(fault: Fault | None = None) -> AsyncIterator[tuple[FakeNode, Client]]:
    """A fake node (with ``fault``) on 127.0.0.1 and a client for it."""
    node = FakeNode(FakeNodeSettings(fault=fault or Fault()))
    async with TestClient(TestServer(create_fake_app(node), host="127.0.0.1")) as client:
        yield node, client


async def txt2img(client: Client, body: dict[str, Any] = BODY) -> dict[str, Any]:
    async with client.post("/sdapi/v1/txt2img", json=body) as resp:
        assert resp.status == 200
        answer: dict[str, Any] = await resp.json()
        return answer


class TestLies:
    """A lying node renders, then answers something else than what it was asked."""

    async def test_wrong_seeds_renders_and_reports_other_seeds(self) -> None:
        """Seeds 1000 off, and the pixels are those of the seeds it reports."""
        async with serving(Fault("wrong_seeds")) as (_, liar), serving() as (_, honest):
            lie = await txt2img(liar)
            truth = await txt2img(honest, dict(BODY, seed=1500))
        assert info_of(lie)["all_seeds"] == [1500, 1501]
        assert info_of(lie)["all_subseeds"] == [40, 41]
        assert list(map(pixels, lie["images"])) == list(map(pixels, truth["images"]))

    async def test_duplicate_seeds_repeats_the_first(self) -> None:
        """Every image from the first seed and subseed: identical images."""
        async with serving(Fault("duplicate_seeds")) as (_, liar):
            lie = await txt2img(liar)
        info = info_of(lie)
        assert (info["all_seeds"], info["all_subseeds"]) == ([500, 500], [40, 40])
        assert pixels(lie["images"][0]) == pixels(lie["images"][1])

    async def test_extra_image_renders_one_more_per_batch(self) -> None:
        """batch_size + 1 images, each with its infotext and seed."""
        async with serving(Fault("extra_image")) as (_, liar):
            lie = await txt2img(liar)
        info = info_of(lie)
        assert len(lie["images"]) == len(info["infotexts"]) == 3
        assert info["all_seeds"] == [500, 501, 502]

    async def test_bad_base64_sends_a_data_uri(self) -> None:
        """The first image comes as a data: URI, the others as raw base64."""
        async with serving(Fault("bad_base64")) as (_, liar), serving() as (_, honest):
            lie = await txt2img(liar)
            truth = await txt2img(honest)
        assert lie["images"][0] == "data:image/png;base64," + truth["images"][0]
        assert lie["images"][1:] == truth["images"][1:]

    async def test_not_image_sends_text(self) -> None:
        """The first image is base64 of something that is not an image."""
        async with serving(Fault("not_image")) as (_, liar):
            lie = await txt2img(liar)
        assert not base64.b64decode(lie["images"][0]).startswith(b"\x89PNG")
        assert base64.b64decode(lie["images"][1]).startswith(b"\x89PNG")

    async def test_deep_info_breaks_a_recursive_parser(self) -> None:
        """info holds a value nested far deeper than json.loads can follow."""
        async with serving(Fault("deep_info")) as (_, liar):
            lie = await txt2img(liar)
        with pytest.raises(RecursionError):
            json.loads(lie["info"])
        assert lie["info"].startswith('{"prompt": "a fox"')


class TestInTheWay:
    """Answers of a server in front of the webui: nothing is rendered."""

    async def test_redirect_points_elsewhere(self) -> None:
        """307 to the configured base URL plus the request's path and query."""
        fault = Fault("redirect", redirect_url="http://127.0.0.1:7/base/")
        async with serving(fault) as (node, client):
            async with client.post(
                "/sdapi/v1/txt2img?x=1", json=BODY, allow_redirects=False
            ) as resp:
                assert resp.status == 307
                assert resp.headers["Location"] == "http://127.0.0.1:7/base/sdapi/v1/txt2img?x=1"
            assert node.images_rendered == 0

    @pytest.mark.parametrize(
        ("mode", "status", "content_type"),
        [
            ("html404", 404, "text/html"),
            ("error413", 413, "text/html"),
            ("error429", 429, "application/json"),
        ],
    )
    async def test_error_pages(self, mode: FaultMode, status: int, content_type: str) -> None:
        """nginx's HTML 404 and 413, a rate limiter's 429 with Retry-After; times counts them."""
        async with serving(Fault(mode, times=1)) as (node, client):
            async with client.post("/sdapi/v1/txt2img", json=BODY) as resp:
                assert (resp.status, resp.content_type) == (status, content_type)
                text = await resp.text()
                if mode == "error429":
                    assert resp.headers["Retry-After"] == "1"
            assert ("nginx" in text) == (content_type == "text/html")
            assert node.images_rendered == 0
            await txt2img(client)  # the fault was for one request only
            assert node.images_rendered == 2

    @pytest.mark.parametrize("mode", ["huge_body", "huge_stream"])
    async def test_huge_answers(self, mode: FaultMode) -> None:
        """huge_body announces its size; huge_stream sends chunks with no length; both are big."""
        async with (
            serving(Fault(mode, huge_mb=3)) as (_, client),
            client.post("/sdapi/v1/txt2img", json=BODY) as resp,
        ):
            body = await resp.read()
            announced = resp.content_length
        assert len(body) == 3 << 20
        assert body.startswith(b'{"images": ["AAAA')
        assert announced == (3 << 20 if mode == "huge_body" else None)


class TestHeadersAndGzip:
    """The fake records request headers and gzips like the webui's GZipMiddleware."""

    @pytest.mark.parametrize(
        ("accept", "body", "gzipped"),
        [
            ("gzip, deflate", BODY, True),
            ("identity", BODY, False),
            ("gzip", None, False),  # /progress while idle is under 1000 bytes
        ],
    )
    async def test_gzip_above_1000_bytes_when_accepted(
        self, accept: str, body: dict[str, Any] | None, gzipped: bool
    ) -> None:
        """Only an answer of 1000 bytes or more to a client that accepts gzip is compressed."""
        method, path = ("POST", "txt2img") if body else ("GET", "progress")
        async with (
            serving() as (node, client),
            client.request(
                method, f"/sdapi/v1/{path}", json=body, headers={"Accept-Encoding": accept}
            ) as resp,
        ):
            assert resp.status == 200
            await resp.json()
            assert (resp.headers.get("Content-Encoding") == "gzip") == gzipped
            assert node.last_headers[f"{method} /sdapi/v1/{path}"]["Accept-Encoding"] == accept
