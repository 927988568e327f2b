"""The access log and log formats: one line per request, its id, never a secret."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sdproxy.fakewebui import FakeNodeSettings
from sdproxy.logs import JsonFormatter, RequestIdFilter, request_id_var
from sdproxy.server.accesslog import request_id_for
from tests.support import SMALL, fake_nodes, free_port, proxy


def access_fields(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [
        record.fields  # type: ignore[attr-defined]  # set through extra= by the middleware
        for record in caplog.records
        if record.name == "sdproxy.access"
    ]


class TestRequestId:
    """X-Request-ID is honoured when sane, generated otherwise, and always returned."""

    @pytest.mark.parametrize(
        "incoming", ["abc-123", "7f3c2a9e-1b2c-4d5e-8f90-0123456789ab", "job:42/part=1"]
    )
    def test_request_id_sane_is_kept(self, incoming: str) -> None:
        """Ordinary ids (tokens, UUIDs) pass through unchanged."""
        assert request_id_for(incoming) == incoming

    @pytest.mark.parametrize("incoming", [None, "", "has space", "x" * 129, "-lead", 'a"b', "é"])
    def test_request_id_insane_is_replaced(self, incoming: str | None) -> None:
        """Missing, long or odd ids are replaced by a fresh 32-hex-digit id."""
        generated = request_id_for(incoming)
        assert generated != incoming
        assert len(generated) == 32
        assert int(generated, 16) >= 0
        assert request_id_for(incoming) != generated


class TestAccessLog:
    """Every request is one INFO line with id, route, status, images, shares, duration."""

    async def test_access_line_for_generation(self, caplog: pytest.LogCaptureFixture) -> None:
        """A split txt2img logs its id, images and shares; the id comes back in the header."""
        caplog.set_level(logging.INFO, logger="sdproxy.access")
        async with (
            fake_nodes(*(FakeNodeSettings(name=f"n{i}") for i in range(2))) as nodes,
            proxy(nodes) as url,
            aiohttp.ClientSession() as session,
            session.post(
                f"{url}/sdapi/v1/txt2img",
                json={"batch_size": 5, **SMALL},
                headers={"X-Request-ID": "client-42"},
            ) as resp,
        ):
            assert resp.status == 200
            assert resp.headers["X-Request-ID"] == "client-42"
            assert float(resp.headers["X-Process-Time"]) > 0  # as the webui's api_middleware
            shares = resp.headers["X-Sdproxy-Shares"]
        [line] = access_fields(caplog)
        assert line["request_id"] == "client-42"
        assert line["method"] == "POST"
        assert line["route"] == "/sdapi/v1/txt2img"
        assert line["status"] == 200
        assert line["images"] == 5
        expected = {}
        for share in shares.split(","):  # "n0:0-2,n1:3-4" -> "n0=3,n1=2"
            node, _, span = share.partition(":")
            first, _, last = span.partition("-")
            expected[node] = int(last) - int(first) + 1
        assert line["shares"] == ",".join(f"{n}={c}" for n, c in expected.items())
        assert line["duration_ms"] > 0

    async def test_access_line_for_errors_and_generated_id(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A 422 and a 404 are logged with their status and a generated, returned id."""
        caplog.set_level(logging.INFO, logger="sdproxy.access")
        async with (
            fake_nodes(FakeNodeSettings()) as nodes,
            proxy(nodes) as url,
            aiohttp.ClientSession() as session,
        ):
            async with session.post(f"{url}/sdapi/v1/txt2img", json={"steps": "x"}) as resp:
                assert resp.status == 422
                first_id = resp.headers["X-Request-ID"]
            async with session.get(f"{url}/no/such/path") as resp:
                assert resp.status == 404
                assert "X-Process-Time" in resp.headers
                second_id = resp.headers["X-Request-ID"]
        lines = access_fields(caplog)
        assert [(x["status"], x["route"]) for x in lines] == [
            (422, "/sdapi/v1/txt2img"),
            (404, "unmatched"),
        ]
        assert [x["request_id"] for x in lines] == [first_id, second_id]
        assert first_id != second_id

    async def test_access_log_has_no_secrets(self, caplog: pytest.LogCaptureFixture) -> None:
        """Credentials, query strings and prompts never reach the log, in either format."""
        caplog.set_level(logging.DEBUG)
        basic = base64.b64encode(b"user:hunter2-password").decode()
        secrets = ["hunter2-password", "tok3n-in-query", "secret-prompt-words", basic]
        async with (
            fake_nodes(FakeNodeSettings()) as nodes,
            proxy(nodes) as url,
            aiohttp.ClientSession() as session,
            session.post(
                f"{url}/sdapi/v1/txt2img?token={secrets[1]}",
                json={"prompt": secrets[2], **SMALL},
                headers={"Authorization": f"Basic {basic}", "Cookie": f"session={secrets[0]}"},
            ) as resp,
        ):
            assert resp.status == 200
        assert access_fields(caplog)
        request_filter = RequestIdFilter()
        for record in caplog.records:
            request_filter.filter(record)
            for text in (record.getMessage(), JsonFormatter().format(record)):
                for secret in secrets:
                    assert secret not in text


class TestLogFormats:
    """Text and JSON lines carry the request id of the request they belong to."""

    def test_json_formatter_fields(self) -> None:
        """A JSON line holds level, logger, message, request id and the structured fields."""
        token = request_id_var.set("rid-1")
        try:
            record = logging.LogRecord(
                "sdproxy.x", logging.WARNING, __file__, 1, "a %s", ("b",), None
            )
            record.fields = {"status": 502}
            RequestIdFilter().filter(record)
        finally:
            request_id_var.reset(token)
        entry = json.loads(JsonFormatter().format(record))
        assert entry["level"] == "WARNING"
        assert entry["logger"] == "sdproxy.x"
        assert entry["message"] == "a b"
        assert entry["request_id"] == "rid-1"
        assert entry["status"] == 502
        assert entry["ts"].endswith("Z")

    def test_text_suffix_names_request(self) -> None:
        """A text line logged during a request ends with its id; outside one it does not."""
        record = logging.LogRecord("sdproxy.x", logging.INFO, __file__, 1, "m", None, None)
        RequestIdFilter().filter(record)
        assert record.request_suffix == ""  # type: ignore[attr-defined]  # set by the filter
        token = request_id_var.set("rid-2")
        try:
            record = logging.LogRecord("sdproxy.x", logging.INFO, __file__, 1, "m", None, None)
            RequestIdFilter().filter(record)
        finally:
            request_id_var.reset(token)
        assert record.request_suffix == " [request_id=rid-2]"  # type: ignore[attr-defined]

    async def test_serve_logs_json_lines(self, tmp_path: Path) -> None:
        """`[server] log_format = "json"` makes every stderr line a JSON object; SIGTERM exits 0."""
        port = free_port()
        config = tmp_path / "c.toml"
        config.write_text(
            f'[server]\nport = {port}\nlog_format = "json"\n'
            "[scheduler]\nwait_for_node_s = 0\n"
            f'[[nodes]]\nname = "a"\nurl = "http://127.0.0.1:{free_port()}"\n'
        )
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sdproxy",
            "serve",
            "--config",
            str(config),
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert process.stderr is not None
        try:
            async with asyncio.timeout(30):
                while "listening" not in json.loads(await process.stderr.readline())["message"]:
                    pass
            async with (
                aiohttp.ClientSession() as session,
                session.post(f"http://127.0.0.1:{port}/sdapi/v1/txt2img", json=SMALL) as resp,
            ):
                assert resp.status == 503
        finally:
            process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            rest = (await process.stderr.read()).decode()
            code = await process.wait()
        assert code == 0
        entries = [json.loads(line) for line in rest.splitlines() if line.strip()]
        access = [e for e in entries if e["logger"] == "sdproxy.access"]
        assert [(e["status"], e["route"]) for e in access] == [(503, "/sdapi/v1/txt2img")]
        assert access[0]["request_id"] == resp.headers["X-Request-ID"]
