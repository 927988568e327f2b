"""Failover: failed shares are rendered elsewhere with the same seeds; node health and states."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from sdproxy.fakewebui import FakeNode, FakeNodeSettings, Fault, FaultMode, create_fake_app
from sdproxy.server.site import start_site
from tests.support import (
    SMALL,
    RunningNode,
    assert_complete,
    assert_same_as_one_node,
    cluster_status,
    fake_nodes,
    fast,
    free_port,
    node_state,
    post_json,
    proxy,
    reference_answer,
    wait_until,
)


async def generate_and_compare(
    session: aiohttp.ClientSession, url: str, reference: RunningNode, body: dict[str, Any]
) -> tuple[dict[str, Any], str]:
    """POST ``body`` through sdproxy; assert it is complete and equal to one clean node's answer."""
    status, proxied, headers = await post_json(session, f"{url}/sdapi/v1/txt2img", body)
    assert status == 200, proxied
    assert_complete(proxied, body)
    single = await reference_answer(session, reference, "txt2img", body, proxied)
    assert_same_as_one_node(proxied, single, body)
    return proxied, headers["X-Sdproxy-Shares"]


class TestFailoverInsideARequest:
    """A node failing mid-request costs no image: its share is rendered by the others."""

    @pytest.mark.parametrize(
        ("mode", "extra", "error"),
        [
            ("error500", {}, "raised RuntimeError: simulated failure"),
            ("truncated", {}, "not JSON"),
            ("reset", {}, "connection failed"),
            ("hang", {"share_timeout_floor_s": 3}, "no answer within 3 s"),
        ],
    )
    async def test_failed_share_is_rendered_elsewhere(
        self, mode: FaultMode, extra: dict[str, Any], error: str
    ) -> None:
        """One faulty node of three: same seeds, pixels and info as one clean node."""
        async with (
            fake_nodes(*(FakeNodeSettings(name=f"n{i}") for i in range(4))) as nodes,
            proxy(nodes[1:], **fast(**extra)) as url,
            aiohttp.ClientSession() as session,
        ):
            nodes[1].node.fault = Fault(mode, after_s=0.05, times=1)
            body = {"prompt": "a fox", "batch_size": 3, "n_iter": 2, "seed": 1000, **SMALL}
            _, shares = await generate_and_compare(session, url, nodes[0], body)
            assert "n1" not in shares
            state = await node_state(session, url, "n1")
            assert error in state["last_error"]
            assert state["last_error_at"] is not None
            rendered = sum(n.node.images_rendered for n in nodes[2:])
            assert rendered == 6  # the clean nodes rendered each image exactly once

    async def test_random_seed_is_kept_across_failover(self) -> None:
        """A -1 seed is drawn once: images rendered after a failover continue the same range."""
        async with (
            fake_nodes(*(FakeNodeSettings(name=f"n{i}") for i in range(3))) as nodes,
            proxy(nodes[1:], **fast()) as url,
            aiohttp.ClientSession() as session,
        ):
            nodes[2].node.fault = Fault("error500", times=1)
            body = {"batch_size": 6, "seed": -1, "subseed_strength": 0.25, **SMALL}
            await generate_and_compare(session, url, nodes[0], body)

    async def test_webui_error_on_every_node_is_the_requests_fault(self) -> None:
        """Two nodes raise the same webui 500: the client gets its body as 422; both stay up."""
        async with (
            fake_nodes(*(FakeNodeSettings(name=f"n{i}") for i in range(2))) as nodes,
            proxy(nodes, **fast()) as url,
            aiohttp.ClientSession() as session,
        ):
            for node in nodes:
                node.node.fault = Fault("error500")
            body = {"batch_size": 4, "seed": 5, **SMALL}
            status, answer, _ = await post_json(session, f"{url}/sdapi/v1/txt2img", body)
            direct = await post_json(session, f"{nodes[0].url}/sdapi/v1/txt2img", body)
            assert direct[0] == 500
            assert (status, answer) == (422, direct[1])
            assert answer["errors"] == "simulated failure"
            states = [(await node_state(session, url, n.name))["state"] for n in nodes]
            assert states == ["up", "up"]  # no node is taken out for the request's fault

    async def test_one_node_raising_passes_its_error_on(self) -> None:
        """A lone node raises a webui 500: no other node can tell, so the client gets it (422)."""
        async with (
            fake_nodes(FakeNodeSettings(name="n0")) as nodes,
            proxy(nodes, **fast()) as url,
            aiohttp.ClientSession() as session,
        ):
            nodes[0].node.fault = Fault("error500")
            status, answer, _ = await post_json(
                session, f"{url}/sdapi/v1/txt2img", {"batch_size": 2, **SMALL}
            )
            assert status == 422
            assert answer == {
                "error": "RuntimeError",
                "detail": "",
                "body": "",
                "errors": "simulated failure",
            }
            assert (await node_state(session, url, "n0"))["state"] == "up"

    async def test_node_raising_on_work_another_renders_is_taken_out(self) -> None:
        """One node raises, the other renders the same images: the first is marked down."""
        async with (
            fake_nodes(*(FakeNodeSettings(name=f"n{i}") for i in range(2))) as nodes,
            proxy(nodes, **fast()) as url,
            aiohttp.ClientSession() as session,
        ):
            nodes[0].node.fault = Fault("error500")
            body = {"batch_size": 4, "seed": 5, **SMALL}
            status, answer, _ = await post_json(session, f"{url}/sdapi/v1/txt2img", body)
            assert status == 200, answer
            assert json.loads(answer["info"])["all_seeds"] == [5, 6, 7, 8]
            assert nodes[1].node.images_rendered == 4
            assert (await node_state(session, url, "n0"))["state"] == "down"

    async def test_no_node_left_is_502_naming_the_nodes(self) -> None:
        """Every node fails and the re-dispatch limit is reached: 502 names each node."""
        async with (
            fake_nodes(*(FakeNodeSettings(name=f"n{i}") for i in range(2))) as nodes,
            proxy(nodes, **fast(max_redispatches=1)) as url,
            aiohttp.ClientSession() as session,
        ):
            nodes[0].node.fault = Fault("truncated")
            nodes[1].node.fault = Fault("reset")
            status, answer, _ = await post_json(
                session, f"{url}/sdapi/v1/txt2img", {"batch_size": 4, **SMALL}
            )
            assert status == 502
            assert answer["error"] == "GenerationFailed"
            assert set(answer["nodes"]) == {"n0", "n1"}
            assert "not JSON" in answer["nodes"]["n0"]


class TestHealth:
    """Nodes go down on failures, come back after a cooldown probe, and report what they have."""

    async def test_node_recovers_after_cooldown(self) -> None:
        """Down after a failed request, up again once a probe succeeds; then it gets work."""
        async with (
            fake_nodes(*(FakeNodeSettings(name=f"n{i}") for i in range(2))) as nodes,
            proxy(nodes, **fast(health_interval_s=30)) as url,
            aiohttp.ClientSession() as session,
        ):
            nodes[0].node.fault = Fault("error500", times=1)
            body = {"batch_size": 4, "seed": 9, **SMALL}
            status, answer, _ = await post_json(session, f"{url}/sdapi/v1/txt2img", body)
            assert status == 200, answer
            assert nodes[0].node.generations == 0

            async def back_up() -> bool:
                state = await node_state(session, url, "n0")
                return bool(state["state"] == "up" and state["consecutive_failures"] == 0)

            # health_interval_s is 30: only the short cooldown probe can bring it back in time.
            await wait_until(back_up, timeout_s=15, what="n0 to come back")
            state = await node_state(session, url, "n0")
            assert "simulated failure" in state["last_error"]
            status, _, headers = await post_json(session, f"{url}/sdapi/v1/txt2img", body)
            assert status == 200
            assert "n0:" in headers["X-Sdproxy-Shares"]
            assert nodes[0].node.generations == 1

    async def test_status_shows_state_error_and_next_probe(self) -> None:
        """A dead node is down with its error text, time, failures and next probe time."""
        dead = {"name": "dead", "url": f"http://127.0.0.1:{free_port()}"}
        async with (
            fake_nodes(FakeNodeSettings(name="n0")) as nodes,
            proxy([nodes[0], dead], **fast()) as url,
            aiohttp.ClientSession() as session,
        ):

            async def failed_twice() -> bool:
                return bool((await node_state(session, url, "dead"))["consecutive_failures"] >= 2)

            await wait_until(failed_twice, what="two failed probes")
            state = await node_state(session, url, "dead")
            assert state["state"] == "down"
            assert state["healthy"] is False
            assert "cannot connect" in state["last_error"]
            assert state["next_probe_at"] > state["last_error_at"]
            up = await node_state(session, url, "n0")
            assert (up["state"], up["next_probe_at"], up["last_error"]) == ("up", None, None)

    async def test_status_shows_models_and_current_checkpoint(self) -> None:
        """The poller reads sd-models and options into node state."""
        models = ("a.safetensors [0123456789]", "b.safetensors [abcdef0123]")
        async with (
            fake_nodes(FakeNodeSettings(name="n0", models=models)) as nodes,
            proxy(nodes, **fast()) as url,
            aiohttp.ClientSession() as session,
        ):
            state = await node_state(session, url, "n0")
            assert state["models"] == list(models)
            assert state["current_model"] == nodes[0].node.options["sd_model_checkpoint"]
            assert state["current_model"] == models[0]

    async def test_disable_and_enable_by_hand(self) -> None:
        """A disabled node gets no work until enabled; an unknown name is 404."""
        async with (
            fake_nodes(*(FakeNodeSettings(name=f"n{i}") for i in range(2))) as nodes,
            proxy(nodes, **fast()) as url,
            aiohttp.ClientSession() as session,
        ):
            status, answer, _ = await post_json(session, f"{url}/cluster/nodes/n0/disable", {})
            assert (status, answer["state"]) == (200, "disabled")
            body = {"batch_size": 4, **SMALL}
            status, _, headers = await post_json(session, f"{url}/sdapi/v1/txt2img", body)
            assert (status, headers["X-Sdproxy-Shares"]) == (200, "n1:0-3")
            assert (await node_state(session, url, "n0"))["state_reason"] == "disabled by hand"
            status, answer, _ = await post_json(session, f"{url}/cluster/nodes/n0/enable", {})
            assert (status, answer["state"]) == (200, "up")
            status, _, headers = await post_json(session, f"{url}/sdapi/v1/txt2img", body)
            assert headers["X-Sdproxy-Shares"] == "n0:0-1,n1:2-3"
            status, answer, _ = await post_json(session, f"{url}/cluster/nodes/nope/enable", {})
            assert status == 404
            assert answer["error"] == "HTTPException"
            assert "nope" in answer["detail"]


class TestEveryNodeDown:
    """With no usable node, requests wait for one to come back, then 503."""

    async def test_request_waits_for_a_node_to_come_back(self) -> None:
        """A request queued while every node is down completes once one starts."""
        port = free_port()
        async with (
            fake_nodes(FakeNodeSettings(name="ref")) as reference,
            proxy([{"name": "late", "url": f"http://127.0.0.1:{port}"}], **fast()) as url,
            aiohttp.ClientSession() as session,
        ):
            body = {"batch_size": 3, "seed": 77, **SMALL}
            request = asyncio.create_task(
                post_json(session, f"{url}/sdapi/v1/txt2img", body), name="waiting request"
            )

            async def queued() -> bool:
                return bool((await cluster_status(session, url))["waiting_images"] == 3)

            await wait_until(queued, what="the request to be parked")
            node = FakeNode(FakeNodeSettings(name="late"))
            runner = await start_site(create_fake_app(node), "127.0.0.1", port)
            try:
                status, proxied, _ = await request
                assert status == 200, proxied
                assert_complete(proxied, body)
                single = await reference_answer(session, reference[0], "txt2img", body, proxied)
                assert_same_as_one_node(proxied, single, body)
                assert node.images_rendered == 3
            finally:
                await runner.cleanup()

    async def test_waits_then_503_with_retry_after(self) -> None:
        """Nothing comes back within wait_for_node_s: 503, Retry-After and a JSON body."""
        dead = {"name": "dead", "url": f"http://127.0.0.1:{free_port()}"}
        async with (
            proxy([dead], **fast(wait_for_node_s=1)) as url,
            aiohttp.ClientSession() as session,
        ):
            request = asyncio.create_task(
                post_json(session, f"{url}/sdapi/v1/txt2img", {"batch_size": 2, **SMALL}),
                name="doomed request",
            )

            async def queued() -> bool:
                return bool((await cluster_status(session, url))["waiting_images"] == 2)

            await wait_until(queued, what="the request to be parked")
            status, body, headers = await request
            assert status == 503
            assert body["error"] == "NoNodeAvailable"
            assert int(headers["Retry-After"]) >= 1
            assert (await cluster_status(session, url))["waiting_images"] == 0
