"""Towards nodes: HTTP Basic with per-node credentials, and TLS with per-node verification."""

from __future__ import annotations

import errno
import os
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web

from sdproxy.fakewebui import FakeNode, FakeNodeSettings, create_fake_app
from tests.support import bound_port, fake_nodes, free_port, post_json, proxy

TXT2IMG = {"prompt": "x", "width": 64, "height": 64, "steps": 20, "batch_size": 2}
NODE_PASSWORD = "n0de-pa55word-d0-not-leak"

# A node refused by sdproxy stays down: answer 503 at once instead of waiting for it.
NO_WAIT = {"wait_for_node_s": 0}


class TestNodeBasicAuth:
    """sdproxy authenticates to nodes started with --api-auth."""

    async def test_credentials_reach_an_api_auth_node(self) -> None:
        """With the node's username and password, sdproxy renders on it."""
        fake = FakeNodeSettings(name="locked", api_auth=f"sd:{NODE_PASSWORD}")
        async with fake_nodes(fake) as nodes:
            node = {"name": "locked", "url": nodes[0].url, "username": "sd"}
            async with (
                proxy([{**node, "password": NODE_PASSWORD}]) as url,
                aiohttp.ClientSession() as session,
            ):
                status, body, _ = await post_json(session, f"{url}/sdapi/v1/txt2img", TXT2IMG)
            assert status == 200, body
            assert len(body["images"]) == 2
            assert nodes[0].node.images_rendered == 2

    async def test_wrong_node_password_names_the_node_not_the_password(self) -> None:
        """A refused password is a 503 naming the node and the cause, never the password."""
        fake = FakeNodeSettings(name="locked", api_auth="sd:the-right-one")
        async with fake_nodes(fake) as nodes:
            node = {"name": "locked", "url": nodes[0].url, "username": "sd"}
            async with (
                proxy([{**node, "password": NODE_PASSWORD}], scheduler=NO_WAIT) as url,
                aiohttp.ClientSession() as session,
            ):
                status, body, _ = await post_json(session, f"{url}/sdapi/v1/txt2img", TXT2IMG)
                async with session.get(f"{url}/cluster/status") as resp:
                    status_text = await resp.text()
            assert status == 503
            assert "locked" in body["detail"]
            assert "credentials" in body["detail"]
            assert NODE_PASSWORD not in str(body)
            assert NODE_PASSWORD not in status_text
            assert nodes[0].node.images_rendered == 0

    async def test_wrong_password_on_one_node_fails_over(self) -> None:
        """A node refusing sdproxy's credentials is down; the others render everything."""
        async with fake_nodes(
            FakeNodeSettings(name="locked", api_auth="sd:other"), FakeNodeSettings(name="open")
        ) as nodes:
            locked = {"name": "locked", "url": nodes[0].url, "username": "sd", "password": "x"}
            async with proxy([locked, nodes[1]]) as url, aiohttp.ClientSession() as session:
                status, body, _ = await post_json(session, f"{url}/sdapi/v1/txt2img", TXT2IMG)
            assert status == 200, body
            assert nodes[1].node.images_rendered == 2


class TestNodeAddresses:
    """Error texts name the node, not its address (they reach clients and the shared state)."""

    async def test_refused_connection_error_holds_no_address(self) -> None:
        """A node where nothing listens: "cannot connect: Connection refused", no host:port."""
        port = free_port()
        dead = {"name": "dead", "url": f"http://127.0.0.1:{port}"}
        async with (
            proxy([dead], scheduler=NO_WAIT) as url,
            aiohttp.ClientSession() as session,
        ):
            status, body, _ = await post_json(session, f"{url}/sdapi/v1/txt2img", TXT2IMG)
            async with session.get(f"{url}/cluster/status") as resp:
                (node,) = (await resp.json())["nodes"]
        assert status == 503
        refused = f"cannot connect: {os.strerror(errno.ECONNREFUSED)}"
        assert node["last_error"] == refused
        assert refused in body["detail"]
        assert str(port) not in body["detail"]


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@asynccontextmanager
async def https_node(ca: trustme.CA, name: str) -> AsyncIterator[tuple[FakeNode, str]]:
    """A fake node serving https on loopback with a certificate for 127.0.0.1 signed by ``ca``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    node = FakeNode(FakeNodeSettings(name=name))
    runner = web.AppRunner(create_fake_app(node), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context).start()
        yield node, f"https://127.0.0.1:{bound_port(runner)}"
    finally:
        await runner.cleanup()


class TestNodeTls:
    """https nodes: verified by default, against ca_file when given, or not at all on request."""

    @pytest.mark.parametrize(
        ("extra", "works"),
        [({}, False), ({"verify_tls": False}, True), ({"ca_file": "CA"}, True)],
    )
    async def test_https_node_verification(
        self, ca: trustme.CA, ca_file: Path, extra: dict[str, Any], works: bool
    ) -> None:
        """A self-signed node fails verification, works with verify_tls off or its CA."""
        async with https_node(ca, "tls") as (node, node_url):
            config = {"name": "tls", "url": node_url}
            config.update({k: str(ca_file) if v == "CA" else v for k, v in extra.items()})
            async with (
                proxy([config], scheduler=NO_WAIT) as url,
                aiohttp.ClientSession() as session,
            ):
                status, body, _ = await post_json(session, f"{url}/sdapi/v1/txt2img", TXT2IMG)
        if works:
            assert status == 200, body
            assert node.images_rendered == 2
        else:
            assert status == 503
            assert "tls: probe failed (TLS certificate rejected" in body["detail"]
            assert node.images_rendered == 0
