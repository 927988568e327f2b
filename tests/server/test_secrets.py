"""No secret in any response or log line, whatever route is called and however it fails."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp import web

from sdproxy.config import Settings
from sdproxy.fakewebui import FakeNodeSettings, Fault
from sdproxy.server.app import create_app
from sdproxy.server.site import connection_limits, start_site
from tests.support import bound_port, fake_nodes

CLIENT_PASSWORD = "client-pw-7f3a9c"
CLIENT_KEY = "client-key-b81d44e0"
NODE_PASSWORD = "node-pw-e52c10"
WRONG_NODE_PASSWORD = "node-pw-wrong-9a7b"
SECRETS = [CLIENT_PASSWORD, CLIENT_KEY, NODE_PASSWORD, WRONG_NODE_PASSWORD]
# The encoded forms a leak would take in a header or a log line.
SECRETS += [base64.b64encode(f"{u}:{p}".encode()).decode() for u, p in [
    ("client", CLIENT_PASSWORD), ("sd", NODE_PASSWORD), ("sd", WRONG_NODE_PASSWORD)
]]  # fmt: skip

GOOD = "Basic " + base64.b64encode(f"client:{CLIENT_PASSWORD}".encode()).decode()
BODIES: list[Any] = [
    None,
    b"{not json",
    {"prompt": "x", "width": 64, "height": 64, "steps": 20, "batch_size": 3},
    {"prompt": ["x"], "seed": "abc"},
    {"init_images": ["bm9wZQ=="], "mask": "http://10.0.0.1/m.png"},
    {"sd_model_checkpoint": "nope", "override_settings": {"nope": 1}},
]
HEADERS: list[dict[str, str]] = [
    {},
    {"Authorization": "Basic " + base64.b64encode(b"client:guess").decode()},
    {"Authorization": "Bearer wrong-key-0000"},
    {"Authorization": GOOD},
    {"Authorization": f"Bearer {CLIENT_KEY}"},
]


def concrete_paths(app: web.Application, fill: str) -> list[tuple[str, str]]:
    """(method, path) for every registered route, dynamic segments filled with ``fill``."""
    calls = []
    for route in app.router.routes():
        info = route.get_info()
        if "path" in info:
            path = info["path"]
        elif "formatter" in info:
            path = info["formatter"].format_map(defaultdict(lambda: fill))
        else:
            path = info.get("prefix", "/") + "/x"
        calls.append((route.method, path))
    return calls


@asynccontextmanager
async def guarded_cluster() -> AsyncIterator[tuple[web.Application, str]]:
    """sdproxy with client credentials before three nodes: good, wrong password, failing."""
    async with fake_nodes(
        FakeNodeSettings(name="good", api_auth=f"sd:{NODE_PASSWORD}"),
        FakeNodeSettings(name="refusing", api_auth=f"sd:{NODE_PASSWORD}"),
        FakeNodeSettings(name="failing", api_auth=f"sd:{NODE_PASSWORD}"),
    ) as nodes:
        nodes[2].node.settings.fault = Fault(mode="error500")
        passwords = [NODE_PASSWORD, WRONG_NODE_PASSWORD, NODE_PASSWORD]
        settings = Settings.model_validate(
            {
                "server": {"port": 0, "api_auth": f"client:{CLIENT_PASSWORD}"}
                | {"api_keys": [CLIENT_KEY]},
                "nodes": [
                    {"name": n.name, "url": n.url, "username": "sd", "password": p}
                    for n, p in zip(nodes, passwords, strict=True)
                ],
            }
        )
        app = create_app(settings)
        runner = await start_site(app, "127.0.0.1", 0, **connection_limits(settings.server))
        try:
            yield app, f"http://127.0.0.1:{bound_port(runner)}"
        finally:
            await runner.cleanup()


def leaks(text: str) -> list[str]:
    return [secret for secret in SECRETS if secret in text]


class TestNoSecretLeaks:
    """Every route, with and without credentials, good and bad bodies, nodes up and failing."""

    async def test_no_secret_in_responses_or_logs(self, caplog: pytest.LogCaptureFixture) -> None:
        """Bodies, headers and every log record (with tracebacks) are free of secrets."""
        caplog.set_level(logging.DEBUG)
        seen: list[str] = []
        async with guarded_cluster() as (app, url), aiohttp.ClientSession() as session:
            calls = concrete_paths(app, "good") + concrete_paths(app, "refusing")
            assert any(path == "/sdapi/v1/txt2img" for _, path in calls)
            for method, path in calls:
                for headers in HEADERS:
                    for body in BODIES if method == "POST" else [None]:
                        data = body if isinstance(body, bytes | None) else None
                        json = None if isinstance(body, bytes | None) else body
                        async with session.request(
                            method, f"{url}{path}", headers=headers, data=data, json=json
                        ) as resp:
                            text = await resp.text()
                            seen.append(f"{method} {path} {resp.status}")
                            # 501: node-local actions (create/*, train/*), refused on purpose.
                            assert resp.status < 500 or resp.status in (501, 502, 503), text
                            where = f"{method} {path} {headers}"
                            assert not leaks(text), where
                            assert not leaks(str(dict(resp.headers))), where
        statuses = {line.rsplit(" ", 1)[1] for line in seen}
        # The sweep went through success, client errors and node failures.
        assert {"200", "401", "422"} <= statuses
        formatter = logging.Formatter()
        for record in caplog.records:
            assert not leaks(formatter.format(record)), record.getMessage()
        assert any(
            "refusing" in r.getMessage() or "failing" in r.getMessage() for r in caplog.records
        )


# Request heads aiohttp's parser refuses, each carrying a credential in the offending line.
BAD_HEADS = [
    b"GET /cluster/status HTTP/1.1\r\nHost: x\r\nAuthorization: " + GOOD.encode() + b"\x01\r\n\r\n",
    b"GET /cluster/status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
    + CLIENT_KEY.encode() * 600
    + b"\r\n\r\n",
    b"GET /cluster/status HTTP/1.1\r\nHost: x\r\nX-K\x00: " + CLIENT_KEY.encode() + b"\r\n\r\n",
    b"GET /?key=" + CLIENT_KEY.encode() + b" HTTP/1.1\x7f\r\nHost: x\r\n\r\n",
    b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nAuthorization: "
    + GOOD.encode()
    + b"\r\nTransfer-Encoding: chunked, "
    + CLIENT_PASSWORD.encode()
    + b"\r\n\r\n",
]


async def send_raw(url: str, data: bytes) -> bytes:
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(30):
            return await reader.read()
    finally:
        writer.close()


class TestMalformedHeads:
    """Heads aiohttp cannot parse: JSON answers, no credential logged, no flood of lines."""

    async def test_bad_heads_are_answered_and_logged_without_secrets(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Each gets the webui's 400 body; the log names the error kind, never the bytes."""
        caplog.set_level(logging.DEBUG)
        async with guarded_cluster() as (_, url):
            for head in BAD_HEADS:
                answer = await send_raw(url, head)
                status_line, _, rest = answer.partition(b"\r\n")
                assert b" 400 " in status_line, (head[:60], answer[:200])
                body = json.loads(rest.partition(b"\r\n\r\n")[2])
                assert set(body) == {"error", "detail", "body", "errors"}
                assert not leaks(answer.decode("latin-1"))
        formatter = logging.Formatter()
        for record in caplog.records:
            assert not leaks(formatter.format(record)), record.getMessage()
            if record.name.startswith(("aiohttp", "sdproxy.access", "sdproxy.server")):
                assert record.exc_info is None, record.getMessage()
        lines = [r.getMessage() for r in caplog.records if "route=bad-request" in r.getMessage()]
        kinds = [line.rpartition("error=")[2] for line in lines]
        assert len(kinds) == len(set(kinds)) >= 2  # one line per kind within the interval
        assert all(line.startswith("method=- route=bad-request status=400") for line in lines)

    async def test_many_bad_heads_write_few_lines(self, caplog: pytest.LogCaptureFixture) -> None:
        """300 malformed requests of one kind: one line now, the rest counted (was 33k lines)."""
        caplog.set_level(logging.DEBUG)
        async with guarded_cluster() as (_, url):
            for _ in range(300):
                await send_raw(url, BAD_HEADS[0])
        messages = [(r.name, r.getMessage()) for r in caplog.records]
        about_heads = [m for m in messages if m[0].startswith("aiohttp") or "bad-request" in m[1]]
        assert len(about_heads) == 1
