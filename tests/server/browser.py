"""Headless Chromium driven over the DevTools protocol, for tests that click in a real page."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support import wait_until

# Recorded before any page script runs (scripts added over the protocol bypass the page's CSP).
_WATCH = """
window.__violations = [];
document.addEventListener("securitypolicyviolation",
  (e) => window.__violations.push(e.violatedDirective + " " + e.blockedURI));
"""


class Page:
    """One browser tab: send protocol commands, evaluate JavaScript, collect events."""

    def __init__(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        self._socket = socket
        self._ids = itertools.count(1)
        self._replies: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: list[dict[str, Any]] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self._socket:
            if message.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(message.data)
            if "id" in data and data["id"] in self._replies:
                self._replies.pop(data["id"]).set_result(data)
            elif "method" in data:
                self.events.append(data)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        ident = next(self._ids)
        reply: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies[ident] = reply
        await self._socket.send_json({"id": ident, "method": method, "params": params})
        async with asyncio.timeout(30):
            data = await reply
        assert "error" not in data, data
        result: dict[str, Any] = data.get("result", {})
        return result

    async def evaluate(self, expression: str) -> Any:
        """The JSON value of ``expression`` (awaited if it is a promise); page errors fail."""
        result = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    async def wait_for(self, expression: str, what: str) -> Any:
        """Poll ``expression`` until it is truthy; return its value."""
        found: list[Any] = []

        async def holds() -> bool:
            found[:] = [await self.evaluate(expression)]
            return bool(found[0])

        await wait_until(holds, what, timeout_s=30)
        return found[0]

    async def open(self, url: str) -> None:
        await self.send("Page.enable")
        await self.send("Runtime.enable")
        await self.send("Log.enable")
        await self.send("Page.addScriptToEvaluateOnNewDocument", source=_WATCH)
        await self.send("Page.navigate", url=url)

    def problems(self, ignore: str | None = None) -> list[str]:
        """Uncaught exceptions and console errors seen so far (CSP violations log there).

        ``ignore``: leave out console errors containing this text (a failure asked for).
        """
        found = []
        for event in self.events:
            if event["method"] == "Runtime.exceptionThrown":
                found.append(json.dumps(event["params"]["exceptionDetails"])[:500])
            elif event["method"] == "Log.entryAdded":
                entry = event["params"]["entry"]
                if entry.get("level") == "error" and "favicon.ico" not in entry.get("url", ""):
                    found.append(f"{entry.get('source')}: {entry.get('text')}")
            elif (
                event["method"] == "Runtime.consoleAPICalled" and event["params"]["type"] == "error"
            ):
                found.append(json.dumps(event["params"]["args"])[:500])
        return [text for text in found if ignore is None or ignore not in text]

    async def aclose(self) -> None:
        await self._socket.close()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)  # cancelled on purpose


def chromium_command(profile: Path) -> list[str]:
    """Headless Chromium with a fresh profile (skips the test when there is no Chromium)."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("chromium is not installed (Debian package 'chromium'; .ci/run installs it)")
    return [
        binary,
        "--headless",
        "--no-sandbox",  # tests run as root, where Chromium's sandbox cannot start
        "--disable-gpu",
        f"--user-data-dir={profile}",
    ]


@asynccontextmanager
async def chromium_page(profile: Path) -> AsyncIterator[Page]:
    """A tab of a fresh headless Chromium (skips the test when there is no Chromium)."""
    process = await asyncio.create_subprocess_exec(
        *chromium_command(profile),
        "--no-first-run",
        "--remote-debugging-address=127.0.0.1",
        "--remote-debugging-port=0",
        "about:blank",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stderr is not None
        port = None
        async with asyncio.timeout(60):
            while port is None:
                line = (await process.stderr.readline()).decode(errors="replace")
                assert line, "chromium exited before it listened"
                match = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
                port = int(match.group(1)) if match else None
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/json/list") as resp:
                targets = await resp.json()
            [tab] = [t for t in targets if t["type"] == "page"]
            socket = await session.ws_connect(tab["webSocketDebuggerUrl"], max_msg_size=0)
            page = Page(socket)
            try:
                yield page
            finally:
                await page.aclose()
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
