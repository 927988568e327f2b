"""Nodes that answer wrongly, or with something in their way, are failed nodes.

Each misbehaviour of the fake webui runs through a real sdproxy: the client gets exactly one
clean node's answer, and the misbehaving node is down, with the reason in /cluster/status and a
count in /metrics. With no other node the client gets a 502 naming the node.
"""

from __future__ import annotations

import re
from typing import Any

import aiohttp
import pytest

from sdproxy.cli import free_port
from sdproxy.fakewebui import FakeNodeSettings, Fault, FaultMode
from tests.support import (
    SMALL,
    NodeProcess,
    assert_complete,
    assert_same_as_one_node,
    fake_nodes,
    fast,
    node_state,
    post_json,
    proxy,
    reference_answer,
)

BODY = {"prompt": "a fox", "batch_size": 4, "seed": 1000, **SMALL}
# A failed node is probed again only after a minute: it stays down for the assertions.
STAY_DOWN = {"cooldown_base_s": 60, "cooldown_max_s": 60}

# Each fault mode: the node's reason in /cluster/status (a regex), and its metrics kind.
WRONG, STATUS = "wrong_answer", "unexpected_status"
MISBEHAVIOURS: dict[FaultMode, tuple[str, str]] = {
    "wrong_seeds": (
        r"wrong answer: all_seeds \[\d+(, \d+)+\] where \[\d+(, \d+)+\] were sent",
        WRONG,
    ),
    "duplicate_seeds": (r"wrong answer: all_seeds \[(\d+)(, \1)+\] \(repeating \1\)", WRONG),
    "extra_image": (r"wrong answer: infotexts for (\d+) images where \d+ were asked", WRONG),
    "bad_base64": (r"wrong answer: images\[0\] is not base64", WRONG),
    "not_image": (r"wrong answer: images\[0\] is not a PNG, JPEG or WEBP image", WRONG),
    "deep_info": (r"wrong answer: info is nested deeper than 128 levels", WRONG),
    "redirect": (
        r"answered 307 Temporary Redirect: a redirect to http://127\.0\.0\.1:\d+, not",
        STATUS,
    ),
    "huge_body": (r"answer larger than \d+\.\d MiB", "too_large"),
    "huge_stream": (r"answer larger than \d+\.\d MiB", "too_large"),
    "html404": (r"answered 404 Not Found, with a body that is not JSON", STATUS),
    "error429": (r"answered 429 Too Many Requests: a status the webui does not answer", STATUS),
    "error413": (r"answered 413 Request Entity Too Large: a status the webui does not", STATUS),
}


async def metric(session: aiohttp.ClientSession, url: str, line_start: str) -> float:
    """The value of the /metrics sample whose line starts with ``line_start`` (0 if none)."""
    async with session.get(f"{url}/metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def failures(node: str, kind: str) -> str:
    return f'sdproxy_node_failures_total{{kind="{kind}",node="{node}"}}'


class TestLyingNodes:
    """A misbehaving node's share is rendered elsewhere; the node is down and counted."""

    @pytest.mark.parametrize("mode", list(MISBEHAVIOURS))
    async def test_client_gets_one_clean_nodes_answer(self, mode: FaultMode) -> None:
        """Pixels and info equal a clean node's; the liar is down with its reason."""
        reason, kind = MISBEHAVIOURS[mode]
        async with fake_nodes(
            FakeNodeSettings(name="liar"),
            FakeNodeSettings(name="honest"),
            FakeNodeSettings(name="reference"),
            FakeNodeSettings(name="elsewhere"),
        ) as (liar, honest, reference, elsewhere):
            liar.node.fault = Fault(mode, redirect_url=elsewhere.url)
            async with (
                proxy([liar, honest], **fast(**STAY_DOWN)) as url,
                aiohttp.ClientSession() as session,
            ):
                status, proxied, headers = await post_json(session, f"{url}/sdapi/v1/txt2img", BODY)
                assert status == 200, proxied
                state = await node_state(session, url, "liar")
                counted = await metric(session, url, failures("liar", kind))
                single = await reference_answer(session, reference, "txt2img", BODY, proxied)
            assert liar.node.requests["POST /sdapi/v1/txt2img"] >= 1  # it was given a share
            assert_complete(proxied, BODY)
            assert_same_as_one_node(proxied, single, BODY)
            assert "liar" not in headers["X-Sdproxy-Shares"]
            assert (state["state"], state["state_reason"]) == ("down", "a request failed")
            assert re.fullmatch(reason + ".*", state["last_error"]), state["last_error"]
            assert counted == 1
            assert elsewhere.node.requests["POST /sdapi/v1/txt2img"] == 0  # no redirect followed

    @pytest.mark.parametrize("mode", list(MISBEHAVIOURS))
    async def test_no_other_node_is_a_502_naming_it(self, mode: FaultMode) -> None:
        """Alone, a misbehaving node fails the request with 502, the node and its reason."""
        reason, _ = MISBEHAVIOURS[mode]
        async with fake_nodes(FakeNodeSettings(name="liar"), FakeNodeSettings(name="x")) as (
            liar,
            elsewhere,
        ):
            liar.node.fault = Fault(mode, redirect_url=elsewhere.url)
            async with (
                proxy([liar], **fast(wait_for_node_s=0, **STAY_DOWN)) as url,
                aiohttp.ClientSession() as session,
            ):
                status, answer, _ = await post_json(session, f"{url}/sdapi/v1/txt2img", BODY)
        assert status == 502, answer
        assert list(answer["nodes"]) == ["liar"]
        assert re.fullmatch(reason + ".*", answer["nodes"]["liar"])
        assert elsewhere.node.requests["POST /sdapi/v1/txt2img"] == 0


class TestTheRequestsFault:
    """A webui-shaped refusal is still the request's fault, passed on unchanged."""

    async def test_webui_422_is_passed_on_and_nodes_stay_up(self) -> None:
        """An unknown alwayson script: the node's own 422 body, and no node taken out."""
        body = {**BODY, "alwayson_scripts": {"Nope": {"args": []}}}
        async with (
            fake_nodes(FakeNodeSettings(name="a"), FakeNodeSettings(name="b")) as nodes,
            proxy(nodes, **fast()) as url,
            aiohttp.ClientSession() as session,
        ):
            direct = await post_json(session, f"{nodes[0].url}/sdapi/v1/txt2img", body)
            status, answer, _ = await post_json(session, f"{url}/sdapi/v1/txt2img", body)
            states = [(await node_state(session, url, n))["state"] for n in ("a", "b")]
        assert (status, answer) == (422, direct[1])
        assert answer["detail"] == "Script 'Nope' not found"
        assert states == ["up", "up"]


class TestFromTheCommandLine:
    """`sdproxy fake-node --fail-mode` misbehaves the same way in its own process."""

    async def test_redirecting_process_is_failed_over(self) -> None:
        """A subprocess node answering 307 to another node: that node never sees the body."""
        async with fake_nodes(
            FakeNodeSettings(name="honest"), FakeNodeSettings(name="elsewhere")
        ) as (honest, elsewhere):
            node = NodeProcess("redirector", free_port())
            await node.start("--fail-mode", "redirect", "--redirect-url", elsewhere.url)
            try:
                redirector: dict[str, Any] = {"name": node.name, "url": node.url}
                async with (
                    proxy([redirector, honest], **fast(**STAY_DOWN)) as url,
                    aiohttp.ClientSession() as session,
                ):
                    status, proxied, _ = await post_json(session, f"{url}/sdapi/v1/txt2img", BODY)
                    state = await node_state(session, url, "redirector")
            finally:
                await node.stop()
        assert status == 200, proxied
        assert_complete(proxied, BODY)
        assert state["state"] == "down"
        assert "a redirect to" in state["last_error"]
        assert elsewhere.node.requests["POST /sdapi/v1/txt2img"] == 0
        assert honest.node.images_rendered == 4
