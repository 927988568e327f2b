"""Bugs inside sdproxy cost one retry, then a 500 naming the request: never a wedged node."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from sdproxy.cluster import execute
from sdproxy.core.answers import read_part as real_read_part
from sdproxy.core.merge import Part
from sdproxy.fakewebui import FakeNodeSettings
from tests.support import (
    SMALL,
    assert_same_as_one_node,
    cluster_status,
    fake_nodes,
    post_json,
    proxy,
    reference_answer,
)


def failing_read_part(times: int) -> Any:
    """read_part that raises KeyError the first ``times`` calls (a bug reading an answer)."""
    calls = 0

    def read_part(*args: Any, **kwargs: Any) -> Part:
        nonlocal calls
        calls += 1
        if calls <= times:
            raise KeyError("a bug")
        return real_read_part(*args, **kwargs)

    return read_part


class TestCrashedJobs:
    """A job whose handling raises is retried once elsewhere; the lane goes on."""

    async def test_one_crash_is_retried_on_another_node(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The request still gets one node's answer; both nodes stay up and keep serving."""
        monkeypatch.setattr(execute, "read_part", failing_read_part(1))
        async with (
            fake_nodes(FakeNodeSettings(name="a"), FakeNodeSettings(name="b")) as nodes,
            proxy(nodes) as url,
            aiohttp.ClientSession() as session,
        ):
            body = {"batch_size": 1, "seed": 7, **SMALL}
            status, answer, _ = await post_json(session, f"{url}/sdapi/v1/txt2img", body)
            assert status == 200, answer
            single = await reference_answer(session, nodes[0], "txt2img", body, answer)
            assert_same_as_one_node(answer, single, body)
            status, answer, _ = await post_json(session, f"{url}/sdapi/v1/txt2img", SMALL)
            assert status == 200, answer
            assert [n["state"] for n in (await cluster_status(session, url))["nodes"]] == [
                "up",
                "up",
            ]

    async def test_repeated_crash_is_a_500_naming_the_request(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Two crashes: a webui-shaped 500 with the request id; the node still serves after."""
        monkeypatch.setattr(execute, "read_part", failing_read_part(2))
        async with (
            fake_nodes(FakeNodeSettings(name="a")) as nodes,
            proxy(nodes) as url,
            aiohttp.ClientSession() as session,
        ):
            headers = {"X-Request-ID": "req-crash-1"}
            async with session.post(f"{url}/sdapi/v1/txt2img", json=SMALL, headers=headers) as resp:
                assert resp.status == 500
                body = await resp.json()
            assert body["error"] == "InternalError"
            assert "req-crash-1" in body["detail"]
            assert set(body) >= {"error", "detail", "body", "errors"}
            status, answer, _ = await post_json(session, f"{url}/sdapi/v1/txt2img", SMALL)
            assert status == 200, answer
            assert nodes[0].node.generations == 3
