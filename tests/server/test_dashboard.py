"""GET /cluster and the in-flight view of /cluster/status, checked in a real headless browser."""

from __future__ import annotations

import asyncio
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import aiohttp

from sdproxy.fakewebui import FakeNodeSettings
from tests.server.browser import chromium_command
from tests.support import fake_nodes, free_port, post_json, proxy, wait_until

BIG = {"width": 512, "height": 512, "steps": 20}


async def get_status(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(f"{url}/cluster/status") as resp:
        assert resp.status == 200
        status: dict[str, Any] = await resp.json()
        return status


class TestInFlight:
    """/cluster/status lists the requests running now with each node's share."""

    async def test_status_in_flight_shows_shares(self) -> None:
        """A running split request shows its id, size and images rendering on each node."""
        async with (
            fake_nodes(
                FakeNodeSettings(name="a", per_image_s=0.4),
                FakeNodeSettings(name="b", per_image_s=0.4),
            ) as nodes,
            proxy(nodes) as url,
            aiohttp.ClientSession() as session,
        ):
            assert (await get_status(session, url))["in_flight"] == []
            request = asyncio.create_task(
                session.post(
                    f"{url}/sdapi/v1/txt2img",
                    json={"batch_size": 4, **BIG},
                    headers={"X-Request-ID": "watch-me"},
                )
            )
            await wait_until(
                lambda: all(n.node.queue_lock.locked() for n in nodes), "both nodes rendering"
            )
            running = (await get_status(session, url))["in_flight"]
            async with await request as resp:
                assert resp.status == 200
            after = (await get_status(session, url))["in_flight"]
        [entry] = running
        assert entry["id"] == "watch-me"
        assert (entry["kind"], entry["images"], entry["done"]) == ("txt2img", 4, 0)
        assert entry["age_s"] >= 0
        assert sorted(
            (s["node"], s["rendering"], s["queued"], s["done"]) for s in entry["shares"]
        ) == [
            ("a", 2, 0, 0),
            ("b", 2, 0, 0),
        ]
        assert after == []


class TestPage:
    """/cluster is one self-contained HTML page."""

    async def test_page_is_self_contained(self) -> None:
        """HTML with inline script and style only: nothing loaded from another origin."""
        dead = {"name": "dead", "url": f"http://127.0.0.1:{free_port()}"}
        async with (
            proxy([dead]) as url,
            aiohttp.ClientSession() as session,
            session.get(f"{url}/cluster") as resp,
        ):
            assert resp.status == 200
            assert resp.content_type == "text/html"
            html = await resp.text()
            csp = resp.headers["Content-Security-Policy"]
        assert "<script>" in html
        assert "default-src 'none'" in csp
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
        assert not re.search(r"@import|url\(\s*['\"]?(https?:)?//", html)


class _Rows(HTMLParser):
    """The text of each ``data-field`` cell of every ``tr[data-node]`` row."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, dict[str, str]] = {}
        self._node: str | None = None
        self._field: str | None = None
        self._depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "tr" and attributes.get("data-node"):
            self._node = attributes["data-node"]
            self.rows[self._node or ""] = {}
        elif self._node and tag == "td" and attributes.get("data-field"):
            self._field, self._depth = attributes["data-field"], 0
            self.rows[self._node][self._field or ""] = ""
        elif self._field:
            self._depth += 1

    def handle_endtag(self, tag: str) -> None:
        if self._field and tag == "td" and self._depth == 0:
            self._field = None
        elif self._field:
            self._depth -= 1
        if tag == "tr":
            self._node = None

    def handle_data(self, data: str) -> None:
        if self._node and self._field:
            self.rows[self._node][self._field] += data


async def dump_dom(url: str, profile: Path) -> str:
    """The DOM of ``url`` after its scripts ran, from headless Chromium."""
    process = await asyncio.create_subprocess_exec(
        *chromium_command(profile),
        "--virtual-time-budget=5000",  # let the page's fetch and first render finish
        "--dump-dom",
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(90):
            out, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode()


class TestInBrowser:
    """What a person sees: the page, rendered by a real Chromium, shows every node's state."""

    async def test_browser_shows_nodes_and_states(self, tmp_path: Path) -> None:
        """Node names, states, images and the down node's error are rendered by the script."""
        dead = {"name": "dead-node", "url": f"http://127.0.0.1:{free_port()}"}
        async with (
            fake_nodes(FakeNodeSettings(name="live-node")) as nodes,
            proxy([nodes[0], dead]) as url,
            aiohttp.ClientSession() as session,
        ):
            status, _, _ = await post_json(
                session, f"{url}/sdapi/v1/txt2img", {"batch_size": 3, "width": 64, "height": 64}
            )
            assert status == 200
            dom = await dump_dom(f"{url}/cluster", tmp_path / "profile")
        assert 'data-loaded="true"' in dom
        parser = _Rows()
        parser.feed(dom)
        rows = parser.rows
        assert list(rows) == ["live-node", "dead-node"]
        assert rows["live-node"]["state"].strip() == "up"
        assert rows["live-node"]["images_rendered"].strip() == "3"
        assert rows["live-node"]["last_error"].strip() == "none"
        assert rows["dead-node"]["state"].strip() == "down"
        assert "cannot connect" in rows["dead-node"]["last_error"]
        assert "no requests in flight" in dom
