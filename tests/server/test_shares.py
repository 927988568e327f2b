"""X-Sdproxy-Shares and the access log's shares: one entry per node range, every generation."""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
import pytest

from sdproxy.fakewebui import FakeNodeSettings
from sdproxy.server.generation import format_shares
from tests.support import SMALL, fake_nodes, post_json, proxy


def access_shares(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.fields["shares"]  # type: ignore[attr-defined]  # set through extra=
        for record in caplog.records
        if record.name == "sdproxy.access" and record.fields["route"].endswith("txt2img")  # type: ignore[attr-defined]
    ]


class TestSharesHeader:
    """Every generation names the nodes that rendered it, each node range once."""

    def test_format_shares(self) -> None:
        """(node, first, last) triples become node:first-last, comma-separated."""
        assert format_shares([("a", 0, 4), ("b", 5, 5)]) == "a:0-4,b:5-5"

    async def test_range_sent_as_two_requests_is_one_entry(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """5 images on a node of max_batch_size 4 go as 4 + 1 but show as a:0-4 (a=5)."""
        caplog.set_level(logging.INFO, logger="sdproxy.access")
        async with fake_nodes(FakeNodeSettings(name="a")) as nodes, aiohttp.ClientSession() as s:
            node: dict[str, Any] = {"name": "a", "url": nodes[0].url, "max_batch_size": 4}
            async with proxy([node]) as url:
                status, answer, headers = await post_json(
                    s, f"{url}/sdapi/v1/txt2img", dict(SMALL, batch_size=5)
                )
        assert status == 200, answer
        assert nodes[0].node.requests["POST /sdapi/v1/txt2img"] == 2
        assert headers["X-Sdproxy-Shares"] == "a:0-4"
        assert access_shares(caplog) == ["a=5"]

    async def test_script_request_names_its_node(self, caplog: pytest.LogCaptureFixture) -> None:
        """An unsplit script_name request names the one node that rendered it."""
        caplog.set_level(logging.INFO, logger="sdproxy.access")
        async with (
            fake_nodes(FakeNodeSettings(name="a"), FakeNodeSettings(name="b")) as nodes,
            proxy(nodes) as url,
            aiohttp.ClientSession() as session,
        ):
            body = dict(SMALL, batch_size=2, script_name="x/y/z plot")
            status, answer, headers = await post_json(session, f"{url}/sdapi/v1/txt2img", body)
        assert status == 200, answer
        [rendered_by] = [n.name for n in nodes if n.node.generations == 1]
        assert headers["X-Sdproxy-Shares"] == f"{rendered_by}:0-1"
        assert access_shares(caplog) == [f"{rendered_by}=2"]
