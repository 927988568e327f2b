"""Client authentication: the webui's --api-auth behaviour, API keys, and which routes it guards."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
import webuiapi
from aiohttp import web

from sdproxy.config import ServerSettings, Settings
from sdproxy.errors import NotAuthenticated
from sdproxy.fakewebui import FakeNodeSettings
from sdproxy.server.app import create_app
from sdproxy.server.auth import ClientAuth, needs_credentials
from sdproxy.server.site import start_site
from tests.support import RunningNode, bound_port, fake_nodes, proxy

AUTH = {"api_auth": "alice:wonder:land,bob:builder", "api_keys": ["key-0123456789"]}
TXT2IMG = {"prompt": "x", "width": 64, "height": 64, "steps": 20}


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def webui_401(detail: str) -> dict[str, str]:
    return {"error": "HTTPException", "detail": detail, "body": "", "errors": ""}


async def call(
    session: aiohttp.ClientSession, method: str, url: str, header: str | None = None, **kw: Any
) -> tuple[int, Any, Any]:
    headers = {"Authorization": header} if header is not None else {}
    async with session.request(method, url, headers=headers, **kw) as resp:
        json = resp.content_type == "application/json"
        return resp.status, await resp.json() if json else await resp.text(), resp.headers


class TestNeedsCredentials:
    """The decision is made from the route's path and the method alone."""

    @pytest.mark.parametrize(
        ("method", "path", "public", "needed"),
        [
            ("POST", "/sdapi/v1/txt2img", True, True),
            ("GET", "/sdapi/v1/sd-models", True, True),
            ("GET", "/sdapi/v1/loras", False, False),
            ("POST", "/sdapi/v1/refresh-loras", False, False),
            ("GET", "/internal/ping", False, False),
            ("GET", "/openapi.json", False, False),
            ("GET", "/docs", False, False),
            ("GET", "/cluster/status", False, True),
            ("GET", "/cluster/status", True, False),
            ("HEAD", "/cluster", True, False),
            ("GET", "/metrics", True, False),
            ("GET", "/metrics", False, True),
            ("POST", "/cluster/benchmark", True, True),
            ("POST", "/cluster/nodes/{name}/disable", True, True),
            ("DELETE", "/cluster/status", True, True),
            ("GET", "/clusterfoo", True, True),
            ("GET", "/controlnet/model_list", True, True),
        ],
    )
    def test_needs_credentials_by_path_and_method(
        self, method: str, path: str, public: bool, needed: bool
    ) -> None:
        """Open paths as the webui's; status reads follow public_status; writes never open."""
        assert needs_credentials(method, path, public_status=public) is needed


class TestClientAuth:
    """ClientAuth checks an Authorization header as FastAPI's HTTPBasic and Api.auth do."""

    auth = ClientAuth(ServerSettings.model_validate(AUTH))

    @pytest.mark.parametrize(
        ("header", "detail"),
        [
            (None, "Not authenticated"),
            ("", "Not authenticated"),
            ("Digest abc", "Not authenticated"),
            ("Basic !!!!", "Invalid authentication credentials"),
            (
                "Basic " + base64.b64encode(b"no-colon").decode(),
                "Invalid authentication credentials",
            ),
            (
                "Basic " + base64.b64encode(b"\xff:\xfe").decode(),
                "Invalid authentication credentials",
            ),
            (basic("alice", "wonder"), "Incorrect username or password"),
            (basic("bob", "wonder:land"), "Incorrect username or password"),
            (basic("carol", "builder"), "Incorrect username or password"),
            ("Bearer key-wrong-0000", "Incorrect API key"),
        ],
    )
    def test_check_rejects(self, header: str | None, detail: str) -> None:
        """Each failure carries the webui's detail text."""
        with pytest.raises(NotAuthenticated, match=f"^{detail}$"):
            self.auth.check(header)

    @pytest.mark.parametrize(
        "header",
        [
            basic("alice", "wonder:land"),
            basic("bob", "builder"),
            "basic " + base64.b64encode(b"bob:builder").decode(),
            "Bearer key-0123456789",
        ],
    )
    def test_check_accepts(self, header: str) -> None:
        """Every configured user (a password may hold ':') and every key is accepted."""
        self.auth.check(header)

    def test_disabled_without_credentials(self) -> None:
        """No api_auth and no api_keys: authentication is off."""
        assert not ClientAuth(ServerSettings()).enabled


@asynccontextmanager
async def guarded_proxy(nodes: list[RunningNode], **server: Any) -> AsyncIterator[str]:
    """sdproxy with client auth, plus routes registered after create_app, as a later module."""
    node_list = [{"name": n.name, "url": n.url} for n in nodes]
    settings = Settings.model_validate({"server": {"port": 0, **server}, "nodes": node_list})
    app = create_app(settings)

    async def later(_: web.Request) -> web.Response:
        return web.json_response({"done": True})

    app.router.add_post("/cluster/later-write", later)
    app.router.add_post("/cluster/nodes/{name}/later", later)
    app.router.add_get("/sdapi/v1/later", later)
    runner = await start_site(app, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{bound_port(runner)}"
    finally:
        await runner.cleanup()


class TestAuthOverHttp:
    """A running sdproxy with api_auth answers as a webui started with --api-auth."""

    async def test_unauthenticated_request_gets_webui_401(self) -> None:
        """No header: 401, the webui's body, no WWW-Authenticate; the node sees nothing."""
        async with fake_nodes(FakeNodeSettings()) as nodes, proxy(nodes, server=AUTH) as url:
            async with aiohttp.ClientSession() as session:
                status, body, headers = await call(
                    session, "POST", f"{url}/sdapi/v1/txt2img", json=TXT2IMG
                )
            assert status == 401
            assert body == webui_401("Not authenticated")
            assert "WWW-Authenticate" not in headers
            assert nodes[0].node.images_rendered == 0

    async def test_wrong_password_and_bad_base64(self) -> None:
        """A wrong password and undecodable credentials get their own webui details."""
        async with fake_nodes(FakeNodeSettings()) as nodes, proxy(nodes, server=AUTH) as url:
            async with aiohttp.ClientSession() as session:
                target = f"{url}/sdapi/v1/txt2img"
                wrong = await call(session, "POST", target, basic("bob", "x"), json=TXT2IMG)
                garbled = await call(session, "POST", target, "Basic @@@", json=TXT2IMG)
            assert wrong[:2] == (401, webui_401("Incorrect username or password"))
            assert garbled[:2] == (401, webui_401("Invalid authentication credentials"))

    async def test_basic_and_bearer_reach_the_nodes(self) -> None:
        """Right credentials, Basic or Bearer, are served normally."""
        async with fake_nodes(FakeNodeSettings()) as nodes, proxy(nodes, server=AUTH) as url:
            async with aiohttp.ClientSession() as session:
                target = f"{url}/sdapi/v1/txt2img"
                by_basic = await call(
                    session, "POST", target, basic("bob", "builder"), json=TXT2IMG
                )
                by_key = await call(session, "POST", target, "Bearer key-0123456789", json=TXT2IMG)
            assert by_basic[0] == by_key[0] == 200
            assert nodes[0].node.images_rendered == 2

    async def test_webuiapi_set_auth(self) -> None:
        """webuiapi's set_auth, the way its users authenticate against a webui, works."""
        async with fake_nodes(FakeNodeSettings()) as nodes, proxy(nodes, server=AUTH) as url:
            parts = urlsplit(url)

            def generate() -> int:
                api = webuiapi.WebUIApi(host=parts.hostname, port=parts.port)
                api.set_auth("bob", "builder")
                return len(api.txt2img(prompt="x", width=64, height=64).images)

            assert await asyncio.to_thread(generate) == 1

    @pytest.mark.parametrize("public", [False, True])
    async def test_routes_added_later_are_guarded(self, public: bool) -> None:
        """Routes other modules add are protected by path: writes always, reads unless public."""
        async with (
            fake_nodes(FakeNodeSettings()) as nodes,
            guarded_proxy(nodes, public_status=public, **AUTH) as url,
            aiohttp.ClientSession() as session,
        ):
            for method, path in [
                ("POST", "/cluster/later-write"),
                ("POST", "/cluster/nodes/n/later"),
                ("GET", "/sdapi/v1/later"),
            ]:
                status, body, _ = await call(session, method, f"{url}{path}")
                assert (status, body) == (401, webui_401("Not authenticated")), path
                good = await call(session, method, f"{url}{path}", basic("bob", "builder"))
                assert good[0] == 200, path
            for path in ["/cluster", "/cluster/status", "/metrics"]:
                status, _, _ = await call(session, "GET", f"{url}{path}")
                assert status == (200 if public else 401), path

    async def test_unknown_route_is_404_without_credentials(self) -> None:
        """As on the webui, routing errors come before authentication."""
        async with (
            fake_nodes(FakeNodeSettings()) as nodes,
            proxy(nodes, server=AUTH) as url,
            aiohttp.ClientSession() as session,
        ):
            assert (await call(session, "GET", f"{url}/nope"))[:2] == (404, {"detail": "Not Found"})
            status, _, _ = await call(session, "GET", f"{url}/sdapi/v1/txt2img")
            assert status == 405

    async def test_no_credentials_configured_means_open(self) -> None:
        """Without api_auth or api_keys every route is open, as on a webui without --api-auth."""
        async with (
            fake_nodes(FakeNodeSettings()) as nodes,
            guarded_proxy(nodes) as url,
            aiohttp.ClientSession() as session,
        ):
            assert (await call(session, "POST", f"{url}/cluster/later-write"))[0] == 200
            assert (await call(session, "GET", f"{url}/cluster/status"))[0] == 200
