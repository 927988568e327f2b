"""Fuzzing a running sdproxy: arbitrary bodies, headers and queries never cause a 5xx or a hang.

Each fuzz test runs under several fixed hypothesis seeds (FUZZ_SEEDS), so CI explores more than
one corner and a failure names the seed that reproduces it; examples found by earlier runs are
pinned with ``@example``.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import threading
import zlib
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, event, example, given, seed, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.core.result import Ok
from yarl import URL

from sdproxy.config import Settings
from sdproxy.fakewebui import FakeNodeSettings
from sdproxy.server.app import create_app
from sdproxy.server.site import connection_limits, start_site
from tests.fuzzing import (
    GOOD_AUTH,
    PASSWORD,
    SEED_MAX,
    VALID,
    bodies,
    encodings,
    extension_paths,
    generation_bodies,
    headers,
    methods,
    queries,
)
from tests.support import bound_port, fake_nodes

CLIENT_TIMEOUT_S = 60  # a hang, not a slow machine, should trip this
FUZZ_SEEDS = [0, 6, 2026]  # 6: the seed that once wedged a lane (a null height, a huge seed)
# Small bounds, so that every request the fuzzer makes valid renders quickly on the fake node.
SERVER = {
    "port": 0,
    "max_width": 512,
    "max_height": 512,
    "max_steps": 60,
    "max_images_per_request": 4,
    "max_body_mb": 1,
}


@dataclass
class Target:
    """sdproxy serving on a loop in a background thread, open and guarded."""

    open_url: str
    guarded_url: str
    routes: list[tuple[str, str]]


def _routes(app: web.Application) -> list[tuple[str, str]]:
    found = []
    for route in app.router.routes():
        info = route.get_info()
        path = info.get("path") or info.get("formatter") or info.get("prefix", "/")
        found.append((route.method, path.replace("{name}", "n0")))
    return found


async def _serve(ready: Future[tuple[Target, asyncio.AbstractEventLoop, asyncio.Event]]) -> None:
    stop = asyncio.Event()
    async with fake_nodes(FakeNodeSettings(name="n0"), FakeNodeSettings(name="n1")) as nodes:
        node_list = [{"name": n.name, "url": n.url} for n in nodes]
        runners = []
        try:
            urls = []
            app = None
            for extra in ({}, {"api_auth": f"fuzz:{PASSWORD}", "api_keys": ["fuzz-key-0001"]}):
                settings = Settings.model_validate({"server": SERVER | extra, "nodes": node_list})
                app = create_app(settings)
                limits = connection_limits(settings.server)
                runners.append(await start_site(app, "127.0.0.1", 0, **limits))
                urls.append(f"http://127.0.0.1:{bound_port(runners[-1])}")
            assert app is not None
            target = Target(urls[0], urls[1], _routes(app))
            ready.set_result((target, asyncio.get_running_loop(), stop))
            await stop.wait()
        finally:
            for runner in runners:
                await runner.cleanup()


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    """One cluster for every example: starting servers per example would dominate the run."""
    ready: Future[tuple[Target, asyncio.AbstractEventLoop, asyncio.Event]] = Future()
    # asyncio.run cancels and awaits whatever the servers leave behind when _serve returns.
    thread = threading.Thread(target=asyncio.run, args=(_serve(ready),), daemon=True)
    thread.start()
    target, loop, stop = ready.result(timeout=CLIENT_TIMEOUT_S)
    try:
        yield target
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=CLIENT_TIMEOUT_S)


def _encode(body: Any, encoding: str) -> tuple[bytes, dict[str, str]]:
    """A JSON body as bytes in ``encoding``, with the headers that say so."""
    raw = json.dumps(body).encode()
    if encoding in ("", "x-unknown", "br"):
        return raw, ({"Content-Encoding": encoding} if encoding else {})
    packed = gzip.compress(raw) if encoding.startswith("gzip") else zlib.compress(raw)
    if encoding.endswith("-cut"):
        packed = packed[: len(packed) // 2]
    return packed, {"Content-Encoding": encoding.removesuffix("-cut")}


async def _send(
    url: str, method: str, path: str, body: Any, head: Any, query: Any, encoding: str = ""
) -> int:
    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S)
    kwargs: dict[str, Any] = {"headers": dict(head), "params": query}
    if isinstance(body, tuple):
        kwargs["data"], extra = _encode(body[1], encoding)
        kwargs["headers"].update({"Content-Type": "application/json", **extra})
    elif body is not None:
        kwargs["data"] = body
    async with aiohttp.ClientSession(timeout=timeout) as session:
        try:
            # encoded=True: the path goes out as written, dot segments and escapes included.
            target = URL(f"{url}{path}", encoded=True)
            async with session.request(method, target, **kwargs) as resp:
                await resp.read()
                return resp.status
        except aiohttp.ClientResponseError as exc:
            # aiohttp's server answers a head it cannot parse with a body even to HEAD, which
            # aiohttp's client then refuses; the status line did arrive.
            return exc.status


def _no_5xx(status: int, path: str) -> bool:
    # 501 is sdproxy's deliberate answer to node-local actions (create/*, train/*).
    node_local = path.startswith(("/sdapi/v1/create/", "/sdapi/v1/train/"))
    return status < 500 or (status == 501 and node_local)


class TestSchemathesis:
    """schemathesis, driven by sdproxy's own /openapi.json: no operation answers 5xx."""

    @pytest.mark.parametrize("fuzz_seed", FUZZ_SEEDS[:2])
    def test_schema_operations_never_5xx(self, target: Target, fuzz_seed: int) -> None:
        """Valid and invalid requests for every documented operation get answers below 500.

        schemathesis' pytest plugin does not run under pytest 9 yet, so each operation's
        strategy is driven by hypothesis directly.
        """
        schema = schemathesis.openapi.from_url(f"{target.open_url}/openapi.json")
        operations = []
        for result in schema.get_all_operations():
            assert isinstance(result, Ok), result.err()  # the document itself must load
            operations.append(result.ok())
        assert any(op.path == "/sdapi/v1/txt2img" for op in operations)

        for operation in operations:

            @seed(fuzz_seed)
            @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
            @given(
                case=st.one_of(
                    operation.as_strategy(GenerationMode.POSITIVE),
                    operation.as_strategy(GenerationMode.NEGATIVE),
                )
            )
            def check(case: schemathesis.Case[Any]) -> None:
                response = case.call(base_url=target.open_url, timeout=CLIENT_TIMEOUT_S)
                assert _no_5xx(response.status_code, case.path), (
                    case.method,
                    case.path,
                    response.text[:500],
                )

            check()


# Found by fuzzing; each once hung the cluster or answered 5xx.
PINNED = [
    # hypothesis seed 6 (TestSchemathesis): a seed below -2**63 made the node body unencodable
    # and killed a lane (every later request on it hung); a null height was a node 500.
    {
        "height": None,
        "prompt": "WÑ",
        "send_images": False,
        "seed": -384717329275980283904,
        "batch_size": None,
        "save_images": True,
    },
    {"batch_size": 1, "height": None, "prompt": "WÑ", "seed": 1, "send_images": False},
    {"seed": SEED_MAX, "batch_size": 2, **VALID},
    {"width": 4096, "height": 64, "enable_hr": True, "hr_resize_y": 512},
    {"enable_hr": True, "hr_scale": 1e308},
]


class TestFuzz:
    """Whatever a client sends, sdproxy answers below 500, promptly, and keeps serving."""

    @pytest.mark.parametrize("fuzz_seed", FUZZ_SEEDS)
    def test_fuzz_every_route(self, target: Target, fuzz_seed: int) -> None:
        """Any method on any route (or near one), any body, headers and query: no 5xx, no hang."""
        generation = [r for r in target.routes if r[1].endswith(("txt2img", "img2img"))]

        @seed(fuzz_seed)
        @settings(
            max_examples=100,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        )
        @given(
            data=st.data(),
            body=bodies,
            head=headers,
            query=queries,
            encoding=encodings,
            guarded=st.sampled_from([False, False, True]),
        )
        def check(
            data: st.DataObject,
            body: Any,
            head: dict[str, str],
            query: dict[str, str],
            encoding: str,
            guarded: bool,
        ) -> None:
            method, path = data.draw(
                st.one_of(st.sampled_from(generation), st.sampled_from(target.routes))
            )
            method = data.draw(st.one_of(st.just(method), methods))
            path = data.draw(st.sampled_from([path, path, path, path + "/x", "/sdapi/v1/"]))
            url = target.guarded_url if guarded else target.open_url
            if guarded and "Authorization" not in head and data.draw(st.booleans()):
                head = {**head, "Authorization": GOOD_AUTH}
            status = asyncio.run(_send(url, method, path, body, head, query, encoding))
            event(f"{method} {path} -> {status}")
            assert _no_5xx(status, path), (method, path, body, head, query, encoding)

        check()

    @pytest.mark.parametrize("fuzz_seed", FUZZ_SEEDS)
    def test_fuzz_generation_bodies(self, target: Target, fuzz_seed: int) -> None:
        """Generation bodies (seeds at 64-bit edges, hires combinations, deep values, codings)."""

        @seed(fuzz_seed)
        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
        @given(
            kind=st.sampled_from(["txt2img", "img2img"]), body=generation_bodies, encoding=encodings
        )
        @example(kind="txt2img", body=PINNED[0], encoding="")
        @example(kind="txt2img", body=PINNED[1], encoding="")
        @example(kind="txt2img", body=PINNED[2], encoding="gzip")
        @example(kind="txt2img", body=PINNED[3], encoding="")
        @example(kind="txt2img", body=PINNED[4], encoding="deflate")
        def check(kind: str, body: dict[str, Any], encoding: str) -> None:
            path, sent = f"/sdapi/v1/{kind}", ("json", body)
            status = asyncio.run(_send(target.open_url, "POST", path, sent, {}, {}, encoding))
            event(f"{kind} -> {status}")
            assert status < 500, (kind, body, encoding)

        check()

    @pytest.mark.parametrize("fuzz_seed", FUZZ_SEEDS)
    def test_fuzz_extension_paths(self, target: Target, fuzz_seed: int) -> None:
        """Traversal spellings on an extension route are 404s, whatever the method."""

        @seed(fuzz_seed)
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
        @given(path=extension_paths, method=st.sampled_from(["GET", "POST", "DELETE"]))
        def check(path: str, method: str) -> None:
            status = asyncio.run(_send(target.open_url, method, path, None, {}, {}))
            assert status == 404, (method, path)

        check()

    def test_still_serving_after_fuzzing(self, target: Target) -> None:
        """After the fuzzing (same module, runs after it) both proxies answer and nodes are up."""
        for url in (target.open_url, target.guarded_url):
            status = asyncio.run(
                _send(url, "GET", "/cluster/status", None, {"Authorization": GOOD_AUTH}, {})
            )
            assert status == 200
        body = ("json", {"prompt": "x", "width": 64, "height": 64, "steps": 20, "batch_size": 4})
        assert asyncio.run(_send(target.open_url, "POST", "/sdapi/v1/txt2img", body, {}, {})) == 200
