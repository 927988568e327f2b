"""NodeClient against real servers on loopback: which answers are whose fault, redirects, caps."""

from __future__ import annotations

import gzip
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from sdproxy.config import NodeSettings, SchedulerSettings
from sdproxy.core.answers import AnswerBudget
from sdproxy.errors import (
    NodeAnswerTooLarge,
    NodeBadResponse,
    NodeError,
    NodeRaised,
    NodeRejected,
    NodesFailed,
    NodeUnexpectedStatus,
)
from sdproxy.nodes.client import NodeClient
from sdproxy.nodes.fanout import call_each, first_answer, is_node_failure
from sdproxy.server.site import start_site
from tests.support import bound_port

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
A1111_500 = {"error": "KeyError", "detail": "", "body": "", "errors": "'nope'"}
FORGE_500 = {"error": "KeyError", "detail": "", "body": "", "message": "'nope'"}
NOT_FOUND_HTML = "<html><body><center><h1>404 Not Found</h1></center>nginx</body></html>"


@asynccontextmanager
async def stub(handler: Handler) -> AsyncIterator[str]:
    """A server on loopback answering every route with ``handler``; yields its base URL."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = await start_site(app, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{bound_port(runner)}"
    finally:
        await runner.cleanup()


def answering(
    status: int, body: Any, content_type: str = "application/json", **headers: str
) -> Handler:
    async def handle(_: web.Request) -> web.StreamResponse:
        raw = body if isinstance(body, bytes | str) else orjson.dumps(body)
        text = raw.decode() if isinstance(raw, bytes) else raw
        return web.Response(status=status, text=text, content_type=content_type, headers=headers)

    return handle


def client(
    session: aiohttp.ClientSession, url: str, name: str = "n", **scheduler: Any
) -> NodeClient:
    node = NodeSettings.model_validate({"name": name, "url": url})
    return NodeClient(session, node, SchedulerSettings(**scheduler))


class TestWhoseFault:
    """A webui-shaped 4xx is the request's fault; any other status is the node's."""

    @pytest.mark.parametrize(
        ("status", "body", "content_type", "expected"),
        [
            (
                422,
                {"detail": [{"loc": ["body", "x"], "msg": "m", "type": "t"}]},
                None,
                NodeRejected,
            ),
            (404, {"detail": "Init image not found"}, None, NodeRejected),
            (
                422,
                {**A1111_500, "error": "HTTPException", "detail": "Script 'x' not found"},
                None,
                NodeRejected,
            ),
            (500, A1111_500, None, NodeRaised),
            (500, FORGE_500, None, NodeRaised),
            (500, {"detail": "Invalid image format"}, None, NodeRaised),
            (404, NOT_FOUND_HTML, "text/html", NodeUnexpectedStatus),
            (404, {"message": "no route"}, None, NodeUnexpectedStatus),
            (400, "Bad Request", "text/plain", NodeUnexpectedStatus),
            (429, {"detail": "Too Many Requests"}, None, NodeUnexpectedStatus),
            (413, "<html>413 Request Entity Too Large</html>", "text/html", NodeUnexpectedStatus),
            (503, {"detail": "Service Unavailable"}, None, NodeUnexpectedStatus),
            (502, "<html>Bad Gateway</html>", "text/html", NodeUnexpectedStatus),
            (500, {"detail": "x", "trace": "..."}, None, NodeUnexpectedStatus),
            (201, {"images": []}, None, NodeUnexpectedStatus),
            (200, "<html>ok</html>", "text/html", NodeBadResponse),
        ],
    )
    async def test_status_and_body_decide_the_error(
        self, status: int, body: Any, content_type: str | None, expected: type[NodeError]
    ) -> None:
        """Each answer raises exactly the NodeError its status and body mean."""
        handler = answering(status, body, content_type or "application/json")
        async with stub(handler) as url, aiohttp.ClientSession() as session:
            with pytest.raises(NodeError) as caught:
                await client(session, url).request("GET", "sdapi/v1/options", timeout_s=5)
        assert type(caught.value) is expected
        if expected is NodeUnexpectedStatus:
            assert caught.value.reason.startswith(f"answered {status}")
            assert "nginx" not in caught.value.reason  # the node's text is never echoed
        if expected is NodeRejected:
            assert caught.value.status == status
            assert caught.value.body() == body

    async def test_missing_generation_route_is_node_trouble(self) -> None:
        """A 404 "Not Found" for txt2img or the probe: not a webui serving its API."""
        async with (
            stub(answering(404, {"detail": "Not Found"})) as url,
            aiohttp.ClientSession() as session,
        ):
            node = client(session, url)
            with pytest.raises(NodeUnexpectedStatus, match="no such route"):
                await node.generate("txt2img", {}, timeout_s=5)
            with pytest.raises(NodeRejected):  # an extension's route may be missing
                await node.request("GET", "controlnet/version", timeout_s=5)
            with pytest.raises(NodeUnexpectedStatus, match="no such route") as probed:
                await node.probe(timeout_s=5)
        assert is_node_failure(probed.value)

    async def test_deep_json_is_not_passed_on(self) -> None:
        """An answer nested deeper than the limit is a NodeBadResponse, never a crash later."""
        deep = b"[" * 300 + b"]" * 300
        async with stub(answering(200, deep)) as url, aiohttp.ClientSession() as session:
            with pytest.raises(NodeBadResponse, match="nested deeper than 128"):
                await client(session, url).request("GET", "sdapi/v1/options", timeout_s=5)


class TestRedirects:
    """Redirects from nodes are never followed."""

    @pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
    async def test_redirect_is_node_trouble_and_not_followed(self, status: int) -> None:
        """The body never reaches the redirect's target; the reason names its origin only."""
        reached: list[str] = []

        async def elsewhere(request: web.Request) -> web.StreamResponse:
            reached.append(await request.text())
            return web.json_response({"images": [], "parameters": {}, "info": "{}"})

        async with stub(elsewhere) as other:
            target = f"{other}/sdapi/v1/txt2img?token=secret"
            async with (
                stub(answering(status, "", Location=target)) as url,
                aiohttp.ClientSession() as session,
            ):
                with pytest.raises(NodeUnexpectedStatus) as caught:
                    await client(session, url).generate("txt2img", {"prompt": "p"}, timeout_s=5)
        assert reached == []
        assert caught.value.reason.endswith(f"a redirect to {other}, not followed")
        assert "secret" not in caught.value.reason


class TestAnswerCap:
    """At most the answer's byte limit is read from a node."""

    @pytest.mark.parametrize("announce", [True, False])
    async def test_oversized_answer_is_cut_off(self, announce: bool) -> None:
        """Announced (Content-Length) or streamed, an answer past the limit stops the read."""
        sent: list[int] = []

        async def huge(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            if announce:
                response.content_length = 1 << 30
            await response.prepare(request)
            total = 0
            try:
                while total < 1 << 30:
                    await response.write(b" " * (1 << 16))
                    total += 1 << 16
            except ConnectionError:
                pass
            sent.append(total)
            return response

        budget = AnswerBudget(pixels=0, other_bytes=1 << 20)
        async with stub(huge) as url, aiohttp.ClientSession() as session:
            with pytest.raises(NodeAnswerTooLarge, match=r"answer larger than 1\.0 MiB"):
                await client(session, url).generate("txt2img", {}, timeout_s=30, budget=budget)
        assert sent
        assert sent[0] < 64 << 20  # the node was stopped long before its gigabyte

    async def test_other_calls_take_max_node_answer_mb(self) -> None:
        """Non-generation calls are capped by the fixed setting."""
        body = orjson.dumps({"x": "a" * (2 << 20)})
        async with stub(answering(200, body)) as url, aiohttp.ClientSession() as session:
            small = client(session, url, max_node_answer_mb=1)
            with pytest.raises(NodeAnswerTooLarge, match=r"larger than 1\.0 MiB"):
                await small.request("GET", "sdapi/v1/options", timeout_s=5)
            answer = await client(session, url).request("GET", "sdapi/v1/options", timeout_s=5)
        assert len(answer["x"]) == 2 << 20


class TestAcceptEncoding:
    """sdproxy asks nodes for identity by default, and aiohttp adds nothing of its own."""

    @pytest.mark.parametrize("setting", ["identity", "gzip"])
    async def test_accept_encoding_is_the_setting(self, setting: str) -> None:
        """The node sees exactly the configured Accept-Encoding; gzip answers still decode."""
        seen: list[str | None] = []

        async def echo(request: web.Request) -> web.StreamResponse:
            seen.append(request.headers.get("Accept-Encoding"))
            body = orjson.dumps({"x": "a" * 5000})
            if "gzip" in (request.headers.get("Accept-Encoding") or ""):
                headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
                return web.Response(body=gzip.compress(body), headers=headers)
            return web.Response(body=body, content_type="application/json")

        async with stub(echo) as url, aiohttp.ClientSession() as session:
            node = client(session, url, node_accept_encoding=setting)
            answer = await node.request("GET", "sdapi/v1/options", timeout_s=5)
        assert seen == [setting]
        assert answer == {"x": "a" * 5000}

    async def test_cap_applies_to_the_inflated_answer(self) -> None:
        """A gzip answer small on the wire but large inflated is cut off by its inflated size."""
        bomb = gzip.compress(b'{"x": "' + b"a" * (8 << 20) + b'"}')

        async def gzipped(_: web.Request) -> web.StreamResponse:
            headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
            return web.Response(body=bomb, headers=headers)

        async with stub(gzipped) as url, aiohttp.ClientSession() as session:
            node = client(session, url, node_accept_encoding="gzip", max_node_answer_mb=1)
            with pytest.raises(NodeAnswerTooLarge):
                await node.request("GET", "sdapi/v1/options", timeout_s=5)
        assert len(bomb) < 1 << 20


class TestOneNodeCalls:
    """first_answer and call_each apply the same classification."""

    async def test_first_answer_skips_a_node_in_trouble(self) -> None:
        """An HTML 404 (a proxy in the way) is the node's failure; the next node answers."""
        async with (
            stub(answering(404, NOT_FOUND_HTML, "text/html")) as bad_url,
            stub(answering(200, {"ok": True})) as good_url,
            aiohttp.ClientSession() as session,
        ):
            bad, good = client(session, bad_url, "bad"), client(session, good_url, "good")
            failed: list[NodeError] = []
            answer = await first_answer(
                [bad, good],
                lambda c: c.request("GET", "sdapi/v1/options", timeout_s=5),
                failed.append,
            )
        assert answer == {"ok": True}
        assert [(e.node, is_node_failure(e)) for e in failed] == [("bad", True)]

    async def test_first_answer_passes_the_webuis_own_refusal(self) -> None:
        """A webui-shaped 422 is the answer: the second node is not asked."""
        asked: list[str] = []

        async def count(_: web.Request) -> web.StreamResponse:
            asked.append("second")
            return web.json_response({})

        refusal = {"detail": [{"loc": ["body"], "msg": "field required", "type": "missing"}]}
        async with (
            stub(answering(422, refusal)) as first_url,
            stub(count) as second_url,
            aiohttp.ClientSession() as session,
        ):
            nodes = [client(session, first_url, "a"), client(session, second_url, "b")]
            failed: list[NodeError] = []
            with pytest.raises(NodeRejected) as caught:
                await first_answer(
                    nodes,
                    lambda c: c.request("POST", "sdapi/v1/png-info", {}, timeout_s=5),
                    failed.append,
                )
        assert caught.value.body() == refusal
        assert (asked, failed) == ([], [])

    async def test_every_node_in_trouble_is_a_502_naming_them(self) -> None:
        """When no node answers as a webui, the error names each node and why."""
        async with (
            stub(answering(429, {"detail": "Too Many Requests"})) as a_url,
            stub(answering(307, "", Location="http://127.0.0.1:9/")) as b_url,
            aiohttp.ClientSession() as session,
        ):
            nodes = [client(session, a_url, "a"), client(session, b_url, "b")]
            failed: list[NodeError] = []
            with pytest.raises(NodesFailed) as caught:
                await first_answer(
                    nodes, lambda c: c.request("GET", "sdapi/v1/memory", timeout_s=5), failed.append
                )
            answers, errors = await call_each(
                nodes, lambda c: c.request("GET", "sdapi/v1/memory", timeout_s=5), failed.append
            )
        assert caught.value.status == 502
        assert set(caught.value.failures) == {"a", "b"}
        assert caught.value.failures["a"].startswith("answered 429")
        assert "redirect" in caught.value.failures["b"]
        assert answers == {}
        assert {type(e) for e in errors.values()} == {NodeUnexpectedStatus}
        assert sorted(e.node for e in failed) == ["a", "a", "b", "b"]
        assert all(map(is_node_failure, failed))
