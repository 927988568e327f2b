"""Fuzzing a running sdproxy: arbitrary bodies, headers and queries never cause a 5xx or a hang."""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.core.result import Ok

from sdproxy.config import Settings
from sdproxy.fakewebui import FakeNodeSettings
from sdproxy.server.app import create_app
from sdproxy.server.site import connection_limits, start_site
from tests.support import bound_port, fake_nodes

PASSWORD = "fuzz-password-1"
GOOD_AUTH = "Basic " + base64.b64encode(f"fuzz:{PASSWORD}".encode()).decode()
CLIENT_TIMEOUT_S = 60  # a hang, not a slow machine, should trip this
# Small bounds, so that every request the fuzzer makes valid renders quickly on the fake node.
SERVER = {
    "port": 0,
    "max_width": 512,
    "max_height": 512,
    "max_steps": 60,
    "max_images_per_request": 4,
    "max_body_mb": 1,
}
FIELDS = [
    "prompt", "negative_prompt", "batch_size", "n_iter", "seed", "subseed", "subseed_strength",
    "steps", "width", "height", "send_images", "save_images", "script_name", "script_args",
    "init_images", "mask", "alwayson_scripts", "override_settings", "enable_hr", "hr_scale",
    "hr_resize_x", "hr_resize_y", "sampler_name", "scheduler", "cfg_scale", "denoising_strength",
    "styles", "infotext", "force_task_id", "include_init_images", "resize_mode",
]  # fmt: skip
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGNgYGAAAAAEAAH2FzhVAAAAAElFTkSuQmCC"


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


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-2, max_value=70),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.sampled_from([PNG, "data:image/png;base64," + PNG, "http://10.0.0.1/x.png", "-1", "1"]),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
# Half start from a body that works, so that mutations reach the nodes and their errors.
VALID = {"prompt": "x", "width": 64, "height": 64, "steps": 20, "init_images": [PNG]}
generation_bodies = st.builds(
    lambda base, extra: {**base, **extra},
    st.sampled_from([{}, VALID]),
    st.dictionaries(
        st.one_of(st.sampled_from(FIELDS), st.text(max_size=10)), json_values, max_size=5
    ),
)
bodies = st.one_of(
    generation_bodies.map(lambda d: ("json", d)),
    st.none(),
    st.binary(max_size=256),
    json_values.map(lambda v: ("json", v)),
)
header_names = st.sampled_from(
    ["Authorization", "Content-Type", "Content-Encoding", "Accept", "Expect", "Cookie", "X-Any"]
    + ["Accept"] * 6  # harmless most of the time, so more requests get past the head
)
header_values = st.one_of(
    st.sampled_from(
        [
            GOOD_AUTH,
            "Basic",
            "Basic ===",
            "Bearer fuzz-key-0001",
            "Bearer",
            "gzip",
            "br",
            "deflate",
            "100-continue",
            "application/json",
            "text/plain; charset=utf-32",
        ]
    ),
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
)
headers = st.dictionaries(header_names, header_values, max_size=3)
queries = st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=3)
methods = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])


async def _send(url: str, method: str, path: str, body: Any, head: Any, query: Any) -> int:
    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S)
    kwargs: dict[str, Any] = {"headers": head, "params": query}
    if isinstance(body, tuple):
        kwargs["json"] = body[1]
    elif body is not None:
        kwargs["data"] = body
    async with aiohttp.ClientSession(timeout=timeout) as session:
        try:
            async with session.request(method, f"{url}{path}", **kwargs) as resp:
                await resp.read()
                return resp.status
        except aiohttp.ClientResponseError as exc:
            # aiohttp's server answers a head it cannot parse with a body even to HEAD, which
            # aiohttp's client then refuses; the status line did arrive.
            return exc.status


class TestSchemathesis:
    """schemathesis, driven by sdproxy's own /openapi.json: no operation answers 5xx."""

    def test_schema_operations_never_5xx(self, target: Target) -> None:
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

            @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
            @given(
                case=st.one_of(
                    operation.as_strategy(GenerationMode.POSITIVE),
                    operation.as_strategy(GenerationMode.NEGATIVE),
                )
            )
            def check(case: schemathesis.Case[Any]) -> None:
                response = case.call(base_url=target.open_url, timeout=CLIENT_TIMEOUT_S)
                status = response.status_code
                node_local = case.path.startswith(("/sdapi/v1/create/", "/sdapi/v1/train/"))
                assert status < 500 or (status == 501 and node_local), (
                    case.method,
                    case.path,
                    response.text[:500],
                )

            check()


class TestFuzz:
    """Whatever a client sends, sdproxy answers below 500, promptly, and keeps serving."""

    @settings(
        max_examples=300,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(
        data=st.data(),
        body=bodies,
        head=headers,
        query=queries,
        guarded=st.sampled_from([False, False, True]),
    )
    def test_fuzz_every_route(
        self,
        target: Target,
        data: st.DataObject,
        body: Any,
        head: dict[str, str],
        query: dict[str, str],
        guarded: bool,
    ) -> None:
        """Any method on any route (or near one), any body, headers and query: no 5xx, no hang."""
        generation = [r for r in target.routes if r[1].endswith(("txt2img", "img2img"))]
        method, path = data.draw(
            st.one_of(st.sampled_from(generation), st.sampled_from(target.routes))
        )
        method = data.draw(st.one_of(st.just(method), methods))
        path = data.draw(st.sampled_from([path, path, path, path + "/x", "/sdapi/v1/"]))
        url = target.guarded_url if guarded else target.open_url
        if guarded and "Authorization" not in head and data.draw(st.booleans()):
            head = {**head, "Authorization": GOOD_AUTH}
        status = asyncio.run(_send(url, method, path, body, head, query))
        event(f"{method} {path} -> {status}")
        # 501 is sdproxy's deliberate answer to node-local actions (create/*, train/*).
        node_local = path.startswith(("/sdapi/v1/create/", "/sdapi/v1/train/"))
        assert status < 500 or (status == 501 and node_local), (method, path, body, head, query)

    def test_still_serving_after_fuzzing(self, target: Target) -> None:
        """After the fuzzing (same module, runs after it) both proxies answer and nodes are up."""
        for url in (target.open_url, target.guarded_url):
            status = asyncio.run(
                _send(url, "GET", "/cluster/status", None, {"Authorization": GOOD_AUTH}, {})
            )
            assert status == 200
        body = ("json", {"prompt": "x", "width": 64, "height": 64, "steps": 20, "batch_size": 4})
        assert asyncio.run(_send(target.open_url, "POST", "/sdapi/v1/txt2img", body, {}, {})) == 200
