"""No secret in any response or log line, whatever route is called and however it fails."""

from __future__ import annotations

import base64
import logging
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

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
