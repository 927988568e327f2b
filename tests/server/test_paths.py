"""Extension routes forward a path to a node: no spelling of a path may leave its prefix."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

from sdproxy.fakewebui import FakeNodeSettings
from tests.support import PATH_ESCAPES as ESCAPES
from tests.support import fake_nodes, proxy


async def raw_get(url: str, target: str) -> bytes:
    """GET ``target`` written as is on the wire (clients would normalise it)."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        request = f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        writer.write(request.encode("latin-1"))
        async with asyncio.timeout(30):
            return await reader.read()
    finally:
        writer.close()


class TestExtensionRoutes:
    """Over HTTP: every escape is FastAPI's 404 and the node is never called."""

    async def test_escapes_never_reach_the_node(self) -> None:
        """GET /controlnet/%2e%2e/sdapi/v1/cmd-flags and the rest: 404, node not called."""
        async with fake_nodes(FakeNodeSettings()) as nodes, proxy(nodes) as url:
            before = dict(nodes[0].node.requests)
            for target in ESCAPES:
                answer = await raw_get(url, target)
                head, _, body = answer.partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 404 "), (target, head)
                assert body == b'{"detail":"Not Found"}', target
            ok = await raw_get(url, "/controlnet/model_list")
        assert ok.startswith(b"HTTP/1.1 200 ")
        calls = {k: v - before.get(k, 0) for k, v in nodes[0].node.requests.items()}
        assert calls.get("GET /sdapi/v1/cmd-flags", 0) == 0
        assert calls.get("GET /controlnet/model_list") == 1

    async def test_generation_through_an_extension_route_is_refused(self) -> None:
        """POST /controlnet/%2e%2e/sdapi/v1/txt2img cannot render around the limits."""
        async with fake_nodes(FakeNodeSettings()) as nodes, proxy(nodes) as url:
            parts = urlsplit(url)
            reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
            body = b'{"batch_size": 1500, "width": 64, "height": 64, "steps": 1}'
            writer.write(
                b"POST /controlnet/%2e%2e/sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\nConnection: close\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            async with asyncio.timeout(30):
                answer = await reader.read()
            writer.close()
        assert answer.startswith(b"HTTP/1.1 404 ")
        assert nodes[0].node.images_rendered == 0
        assert nodes[0].node.requests["POST /sdapi/v1/txt2img"] == 0
