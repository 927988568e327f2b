"""End to end: the webui API beyond generation, through sdproxy in front of fake nodes."""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import AsyncExitStack
from typing import Any

import aiohttp
from openapi_spec_validator import validate

from sdproxy.core.inventory import REDACTED
from sdproxy.core.progress import idle_progress
from sdproxy.fakewebui import FakeNode, FakeNodeSettings, Fault, create_fake_app
from sdproxy.server.site import start_site
from tests.support import (
    SMALL,
    RunningNode,
    assert_same_as_one_node,
    fake_nodes,
    free_port,
    pixels,
    post_json,
    proxy,
    reference_answer,
    wait_until,
)

M1 = "m1.safetensors [1111111111]"
M2 = "m2.safetensors [2222222222]"
# 64x64 images at this speed take about 4 s each (0.2 s a step): time to act mid-generation.
SLOW = 256.0


async def get_json(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with session.get(url) as resp:
        return resp.status, await resp.json(content_type=None)


def rendering(node: RunningNode) -> bool:
    return node.node.state.job_count > 0 and node.node.state.sampling_step >= 1


def calls(node: RunningNode, route: str) -> int:
    return node.node.requests[route]


class TestReads:
    """Lists are merged over the nodes: intersections for what runs, unions for what routes."""

    async def test_scripts_and_samplers_are_the_intersection(self) -> None:
        """A script or sampler only one node has is not offered (clients would inject it)."""
        async with (
            fake_nodes(
                FakeNodeSettings(name="a", scripts_txt2img=("adetailer", "lora", "seed")),
                FakeNodeSettings(
                    name="b", scripts_txt2img=("lora", "seed"), samplers=("Euler", "DDIM")
                ),
            ) as nodes,
            proxy(nodes) as url,
            aiohttp.ClientSession() as session,
        ):
            _, scripts = await get_json(session, f"{url}/sdapi/v1/scripts")
            _, samplers = await get_json(session, f"{url}/sdapi/v1/samplers")
        assert scripts["txt2img"] == ["lora", "seed"]
        assert [s["name"] for s in samplers] == ["Euler", "DDIM"]

    async def test_models_loras_embeddings_are_the_union(self) -> None:
        """Checkpoints, LoRAs, VAEs and embeddings any node has are listed once."""
        async with (
            fake_nodes(
                FakeNodeSettings(name="a", models=(M1,), loras=("x",), embeddings=("e1",)),
                FakeNodeSettings(
                    name="b", models=(M1, M2), loras=("x", "y"), vaes=("v.pt",), embeddings=("e2",)
                ),
            ) as nodes,
            proxy(nodes) as url,
            aiohttp.ClientSession() as session,
        ):
            _, models = await get_json(session, f"{url}/sdapi/v1/sd-models")
            _, loras = await get_json(session, f"{url}/sdapi/v1/loras")
            _, vaes = await get_json(session, f"{url}/sdapi/v1/sd-vae")
            _, embeddings = await get_json(session, f"{url}/sdapi/v1/embeddings")
        assert [m["title"] for m in models] == [M1, M2]
        assert [lora["name"] for lora in loras] == ["x", "y"]
        assert [vae["model_name"] for vae in vaes] == ["v.pt"]
        assert sorted(embeddings["loaded"]) == ["e1", "e2"]

    async def test_cmd_flags_redacted_other_reads_from_one_node(self) -> None:
        """cmd-flags hides credentials; options, memory and the rest are one node's answer."""
        async with (
            fake_nodes(
                FakeNodeSettings(name="a", gradio_auth="admin:hunter2"), FakeNodeSettings(name="b")
            ) as nodes,
            proxy(nodes) as url,
            aiohttp.ClientSession() as session,
        ):
            status, flags = await get_json(session, f"{url}/sdapi/v1/cmd-flags")
            assert status == 200
            assert flags["gradio_auth"] == REDACTED
            assert flags["api_auth"] is None
            _, direct = await get_json(session, f"{nodes[0].url}/sdapi/v1/cmd-flags")
            assert {k: v for k, v in flags.items() if k != "gradio_auth"} == {
                k: v for k, v in direct.items() if k != "gradio_auth"
            }
            for path in ("options", "memory", "face-restorers", "latent-upscale-modes"):
                status, answer = await get_json(session, f"{url}/sdapi/v1/{path}")
                _, expected = await get_json(session, f"{nodes[0].url}/sdapi/v1/{path}")
                assert (status, answer) == (200, expected), path
            status, ping = await get_json(session, f"{url}/internal/ping")
            assert (status, ping) == (200, {})

    async def test_one_node_read_falls_back_when_a_node_is_gone(self) -> None:
        """A node gone since the last health check: the next node answers, the gone one is down."""
        async with AsyncExitStack() as stack:
            a_stack = AsyncExitStack()
            (a,) = await a_stack.enter_async_context(fake_nodes(FakeNodeSettings(name="a")))
            (b,) = await stack.enter_async_context(fake_nodes(FakeNodeSettings(name="b")))
            url = await stack.enter_async_context(proxy([a, b]))
            session = await stack.enter_async_context(aiohttp.ClientSession())
            await a_stack.aclose()
            status, answer = await get_json(session, f"{url}/sdapi/v1/memory")
            assert (status, answer["ram"]["total"]) == (200, 32 * 1024.0**3)
            assert calls(b, "GET /sdapi/v1/memory") == 1
            _, cluster = await get_json(session, f"{url}/cluster/status")
            assert [n["healthy"] for n in cluster["nodes"]] == [False, True]


class TestWrites:
    """Writes reach every healthy node; failures name the nodes."""

    async def test_refresh_and_options_reach_every_node(self) -> None:
        """refresh-checkpoints answers null after every node refreshed; options set everywhere."""
        async with (
            fake_nodes(FakeNodeSettings(name="a"), FakeNodeSettings(name="b")) as nodes,
            proxy(nodes) as url,
            aiohttp.ClientSession() as session,
        ):
            status, answer, _ = await post_json(
                session, f"{url}/sdapi/v1/refresh-checkpoints", None
            )
            assert (status, answer) == (200, None)
            status, answer, _ = await post_json(session, f"{url}/sdapi/v1/unload-checkpoint", None)
            assert (status, answer) == (200, {})
            status, answer, _ = await post_json(session, f"{url}/sdapi/v1/options", {"n_rows": 3})
            assert (status, answer) == (200, None)
        for node in nodes:
            assert calls(node, "POST /sdapi/v1/refresh-checkpoints") == 1
            assert node.node.options["n_rows"] == 3

    async def test_options_errors_as_the_webui(self) -> None:
        """An unknown option or model: the webui's 500 bodies, as 422 (the input is at fault)."""
        async with (
            fake_nodes(FakeNodeSettings(name="a"), FakeNodeSettings(name="b")) as nodes,
            proxy(nodes) as url,
            aiohttp.ClientSession() as session,
        ):
            status, answer, _ = await post_json(session, f"{url}/sdapi/v1/options", {"nope": 1})
            assert status == 422
            assert (answer["error"], answer["errors"]) == ("KeyError", "'nope'")
            status, answer, _ = await post_json(session, f"{url}/sdapi/v1/options", [1])
            assert status == 422
            assert answer["detail"][0]["loc"] == ["body"]
            url_m = f"{url}/sdapi/v1/options"
            status, answer, _ = await post_json(session, url_m, {"sd_model_checkpoint": "zz"})
            assert status == 422
            assert answer["errors"] == "model 'zz' not found"

    async def test_write_failure_names_the_node(self) -> None:
        """A node gone since the last health check: 502 naming it; the others still got it."""
        async with AsyncExitStack() as stack:
            (a,) = await stack.enter_async_context(fake_nodes(FakeNodeSettings(name="a")))
            b_stack = AsyncExitStack()
            (b,) = await b_stack.enter_async_context(fake_nodes(FakeNodeSettings(name="b")))
            url = await stack.enter_async_context(proxy([a, b]))
            session = await stack.enter_async_context(aiohttp.ClientSession())
            await b_stack.aclose()
            status, answer, _ = await post_json(session, f"{url}/sdapi/v1/options", {"n_rows": 2})
            assert status == 502
            assert list(answer["nodes"]) == ["b"]
            assert "b" in answer["detail"]
            assert a.node.options["n_rows"] == 2

    async def test_create_and_train_refused_server_kill_absent(self) -> None:
        """create/* and train/* are 501 with a reason; server-kill is not a route at all."""
        async with (
            fake_nodes(FakeNodeSettings(name="a")) as nodes,
            proxy(nodes) as url,
            aiohttp.ClientSession() as session,
        ):
            status, answer, _ = await post_json(session, f"{url}/sdapi/v1/train/embedding", {})
            assert status == 501
            assert "not supported" in answer["detail"]
            status, answer, _ = await post_json(session, f"{url}/sdapi/v1/server-kill", None)
            assert (status, answer) == (404, {"detail": "Not Found"})
            async with session.get(f"{url}/sdapi/v1/options/x") as resp:
                assert resp.status == 404
            async with session.put(f"{url}/sdapi/v1/options") as resp:
                assert resp.status == 405
                assert await resp.json() == {"detail": "Method Not Allowed"}


class TestCheckpointRouting:
    """Generations go only to nodes with their checkpoint."""

    async def test_override_goes_to_nodes_that_have_it(self) -> None:
        """A named checkpoint only one node has is rendered there, and only there."""
        async with (
            fake_nodes(
                FakeNodeSettings(name="a", models=(M1,)),
                FakeNodeSettings(name="b", models=(M1, M2)),
            ) as nodes,
            proxy(nodes) as url,
            aiohttp.ClientSession() as session,
        ):
            body = dict(SMALL, batch_size=4, override_settings={"sd_model_checkpoint": "m2"})
            status, answer, headers = await post_json(session, f"{url}/sdapi/v1/txt2img", body)
            assert status == 200, answer
            assert headers["X-Sdproxy-Shares"] == "b:0-3"
            assert "X-Sdproxy-Warning" not in headers
            assert all("Model: m2" in text for text in json.loads(answer["info"])["infotexts"])
        assert nodes[0].node.images_rendered == 0

    async def test_unknown_override_renders_on_the_loaded_checkpoint(self) -> None:
        """As a webui does: a checkpoint no node has renders on the loaded one, with a warning."""
        async with (
            fake_nodes(FakeNodeSettings(name="a"), FakeNodeSettings(name="b")) as nodes,
            proxy(nodes) as url,
            aiohttp.ClientSession() as session,
        ):
            body = dict(
                SMALL, batch_size=4, seed=5, override_settings={"sd_model_checkpoint": "M3"}
            )
            status, answer, headers = await post_json(session, f"{url}/sdapi/v1/txt2img", body)
            assert status == 200, answer
            assert "checkpoint not found" in headers["X-Sdproxy-Warning"]
            direct = await reference_answer(session, nodes[0], "txt2img", body, answer)
            assert_same_as_one_node(answer, direct, body)

    async def test_unknown_override_is_404_with_strict_checkpoints(self) -> None:
        """[api] strict_checkpoints = true: a checkpoint no node has is a 404 naming it."""
        async with (
            fake_nodes(FakeNodeSettings(name="a")) as nodes,
            proxy(nodes, api={"strict_checkpoints": True}) as url,
            aiohttp.ClientSession() as session,
        ):
            body = dict(SMALL, override_settings={"sd_model_checkpoint": "m3"})
            status, answer, _ = await post_json(session, f"{url}/sdapi/v1/txt2img", body)
            assert status == 404
            assert "'m3'" in answer["detail"]
        assert nodes[0].node.images_rendered == 0

    async def test_failover_stays_on_nodes_with_the_checkpoint(self) -> None:
        """A failed share is planned again only onto nodes that have the request's checkpoint."""
        async with (
            fake_nodes(
                FakeNodeSettings(name="a", models=(M1, M2), fault=Fault("error500", times=1)),
                FakeNodeSettings(name="b", models=(M1, M2)),
                FakeNodeSettings(name="c", models=(M1,)),
            ) as nodes,
            proxy(nodes) as url,
            aiohttp.ClientSession() as session,
        ):
            body = dict(SMALL, batch_size=6, seed=1, override_settings={"sd_model_checkpoint": M2})
            status, answer, headers = await post_json(session, f"{url}/sdapi/v1/txt2img", body)
        assert status == 200, answer
        assert json.loads(answer["info"])["all_seeds"] == list(range(1, 7))
        assert {share.split(":")[0] for share in headers["X-Sdproxy-Shares"].split(",")} == {"b"}
        assert nodes[2].node.generations == 0

    async def test_cluster_checkpoint_set_and_pushed_to_a_returning_node(self) -> None:
        """POST options picks the checkpoint; a node that was down loads it before any work."""
        port = free_port()
        async with AsyncExitStack() as stack:
            (a,) = await stack.enter_async_context(
                fake_nodes(FakeNodeSettings(name="a", models=(M1, M2)))
            )
            b_entry = {"name": "b", "url": f"http://127.0.0.1:{port}"}
            url = await stack.enter_async_context(
                proxy([a, b_entry], scheduler={"health_interval_s": 0.05})
            )
            session = await stack.enter_async_context(aiohttp.ClientSession())
            body = {"sd_model_checkpoint": "m2.safetensors"}
            status, answer, _ = await post_json(session, f"{url}/sdapi/v1/options", body)
            assert (status, answer) == (200, None)
            assert a.node.loaded_title == M2
            b = FakeNode(FakeNodeSettings(name="b", models=(M1, M2), model_load_s=0.2))
            runner = await start_site(create_fake_app(b), "127.0.0.1", port)
            stack.push_async_callback(runner.cleanup)
            shares = ""
            deadline = time.monotonic() + 20
            while "b:" not in shares:
                assert time.monotonic() < deadline, "b never got work"
                request = dict(SMALL, batch_size=4)
                status, answer, headers = await post_json(
                    session, f"{url}/sdapi/v1/txt2img", request
                )
                assert status == 200, answer
                shares = headers["X-Sdproxy-Shares"]
                infotexts = json.loads(answer["info"])["infotexts"]
                assert all("Model: m2" in text for text in infotexts), shares
            assert b.loaded_title == M2

    async def test_options_checkpoint_only_to_nodes_that_have_it(self) -> None:
        """A checkpoint on one node is loaded there; the other keeps its own and gets no work."""
        async with (
            fake_nodes(
                FakeNodeSettings(name="a", models=(M1,)),
                FakeNodeSettings(name="b", models=(M1, M2)),
            ) as nodes,
            proxy(nodes) as url,
            aiohttp.ClientSession() as session,
        ):
            body = {"sd_model_checkpoint": M2, "n_rows": 5}
            status, answer, _ = await post_json(session, f"{url}/sdapi/v1/options", body)
            assert (status, answer) == (200, None)
            assert [n.node.options["n_rows"] for n in nodes] == [5, 5]
            assert nodes[0].node.loaded_title == M1
            request = dict(SMALL, batch_size=3)
            status, answer, headers = await post_json(session, f"{url}/sdapi/v1/txt2img", request)
            assert status == 200
            assert headers["X-Sdproxy-Shares"] == "b:0-2"
            # Unloading does not change the checkpoint: the next generation loads it again.
            status, _, _ = await post_json(session, f"{url}/sdapi/v1/unload-checkpoint", None)
            assert status == 200
            status, answer, headers = await post_json(session, f"{url}/sdapi/v1/txt2img", request)
            assert status == 200, answer
            assert headers["X-Sdproxy-Shares"] == "b:0-2"


class TestRunningRequests:
    """interrupt, skip and progress concern the nodes working for running requests."""

    async def test_progress_idle_is_a_fresh_webuis(self) -> None:
        """With nothing running, the answer is exactly a fresh webui's."""
        async with (
            fake_nodes(FakeNodeSettings(name="a")) as nodes,
            proxy(nodes) as url,
            aiohttp.ClientSession() as session,
        ):
            _, answer = await get_json(session, f"{url}/sdapi/v1/progress")
            fresh = FakeNode(FakeNodeSettings()).state.progress(skip_current_image=False)
            assert answer == fresh == idle_progress()
            status, answer = await get_json(
                session, f"{url}/sdapi/v1/progress?skip_current_image=x"
            )
            assert status == 422
            assert answer["detail"][0]["loc"] == ["query", "skip_current_image"]

    async def test_interrupt_returns_finished_images_and_progress_while_busy(self) -> None:
        """Mid-generation: progress is busy; interrupt returns the finished images, merged."""
        async with (
            fake_nodes(
                FakeNodeSettings(name="a", per_image_s=SLOW),
                FakeNodeSettings(name="b", per_image_s=SLOW),
                FakeNodeSettings(name="idle"),
            ) as nodes,
            proxy(nodes[:2]) as url,
            aiohttp.ClientSession() as session,
        ):
            body = dict(SMALL, batch_size=1, n_iter=6, seed=100)
            task = asyncio.create_task(post_json(session, f"{url}/sdapi/v1/txt2img", body))
            await wait_until(
                lambda: all(rendering(node) for node in nodes[:2]), what="the nodes to render"
            )
            _, busy = await get_json(session, f"{url}/sdapi/v1/progress")
            assert 0 < busy["progress"] < 1
            # The client's 6 batches, though each node runs one job of 1 image x 3 iterations.
            assert busy["state"]["job_count"] == 6
            assert busy["state"]["job"] == "Batch 1 out of 6"
            assert busy["current_image"] is not None
            _, no_image = await get_json(session, f"{url}/sdapi/v1/progress?skip_current_image=1")
            assert no_image["current_image"] is None
            status, answer, _ = await post_json(session, f"{url}/sdapi/v1/interrupt", None)
            assert (status, answer) == (200, {})
            status, result, headers = await task
            assert status == 200, result
            info = json.loads(result["info"])
            # Each image is its listed seed's: the idle node renders that seed alone the same.
            for image, seed in zip(result["images"], info["all_seeds"], strict=False):
                clean = dict(SMALL, seed=seed)
                _, alone, _ = await post_json(session, f"{nodes[2].url}/sdapi/v1/txt2img", clean)
                assert pixels(image) == pixels(alone["images"][0])
        assert len(result["images"]) == 2  # the image each node was rendering
        # Entry i of every list describes images[i]: rendered seeds first, the rest after.
        assert info["all_seeds"] == [100, 103, 101, 102, 104, 105]
        assert [text.split("Seed: ")[1].split(",")[0] for text in info["infotexts"]] == [
            "100",
            "103",
        ]
        assert headers["X-Sdproxy-Shares"] == "a:0-0,b:1-1"
        assert [calls(node, "POST /sdapi/v1/interrupt") for node in nodes] == [1, 1, 0]

    async def test_skip_goes_to_running_nodes_only(self) -> None:
        """skip answers null and reaches the node rendering, not the idle one."""
        async with (
            fake_nodes(
                FakeNodeSettings(name="a", per_image_s=SLOW / 4), FakeNodeSettings(name="b")
            ) as nodes,
            proxy(nodes) as url,
            aiohttp.ClientSession() as session,
        ):
            body = dict(SMALL, script_name="x/y/z plot")  # unsplit: goes whole to one node
            task = asyncio.create_task(post_json(session, f"{url}/sdapi/v1/txt2img", body))
            await wait_until(
                lambda: rendering(nodes[0]) or rendering(nodes[1]), what="the nodes to render"
            )
            status, answer, _ = await post_json(session, f"{url}/sdapi/v1/skip", None)
            assert (status, answer) == (200, None)
            status, _, _ = await task
        assert status == 200
        skips = [calls(node, "POST /sdapi/v1/skip") for node in nodes]
        assert sorted(skips) == [0, 1]


class TestOneNodeWork:
    """Extras, png-info, interrogate and extension routes go to one node."""

    async def test_interrogate_to_the_least_busy_node(self) -> None:
        """While one node renders, interrogate goes to the other and answers as it does."""
        async with (
            fake_nodes(
                FakeNodeSettings(name="a", per_image_s=SLOW), FakeNodeSettings(name="b")
            ) as nodes,
            proxy(nodes) as url,
            aiohttp.ClientSession() as session,
        ):
            status, generated, _ = await post_json(
                session, f"{url}/sdapi/v1/txt2img", dict(SMALL, steps=1)
            )
            assert status == 200
            image = generated["images"][0]
            body = dict(SMALL, batch_size=1, n_iter=2, script_name="x/y/z plot")
            task = asyncio.create_task(post_json(session, f"{url}/sdapi/v1/txt2img", body))
            await wait_until(
                lambda: rendering(nodes[0]) or rendering(nodes[1]), what="the nodes to render"
            )
            busy, idle = (nodes[0], nodes[1]) if rendering(nodes[0]) else (nodes[1], nodes[0])
            request = {"image": image, "model": "clip"}
            status, caption, _ = await post_json(session, f"{url}/sdapi/v1/interrogate", request)
            _, direct, _ = await post_json(session, f"{idle.url}/sdapi/v1/interrogate", request)
            assert (status, caption) == (200, direct)
            assert calls(busy, "POST /sdapi/v1/interrogate") == 0
            status, info, _ = await post_json(session, f"{url}/sdapi/v1/png-info", {"image": image})
            assert status == 200
            assert "Seed:" in info["info"]
            await post_json(session, f"{url}/sdapi/v1/interrupt", None)
            await task

    async def test_extension_routes_forwarded_for_configured_prefixes(self) -> None:
        """/controlnet/* reaches a node; a prefix not configured is sdproxy's 404."""
        async with (
            fake_nodes(FakeNodeSettings(name="a")) as nodes,
            proxy(nodes, api={"extension_prefixes": ["controlnet"]}) as url,
            aiohttp.ClientSession() as session,
        ):
            status, answer = await get_json(session, f"{url}/controlnet/module_list")
            assert (status, answer["module_list"][:2]) == (200, ["none", "canny"])
            status, answer = await get_json(session, f"{url}/adetailer/v1/ad_model")
            assert (status, answer) == (404, {"detail": "Not Found"})


class TestOpenapi:
    """GET /openapi.json describes what this sdproxy serves."""

    async def test_openapi_is_valid_and_lists_every_route(self) -> None:
        """The document passes an OpenAPI 3 validator and has every route served, templated too."""
        async with (
            fake_nodes(FakeNodeSettings(name="a")) as nodes,
            proxy(nodes) as url,
            aiohttp.ClientSession() as session,
        ):
            status, document = await get_json(session, f"{url}/openapi.json")
        assert status == 200
        validate(document)
        paths = document["paths"]
        for path, method in [
            ("/sdapi/v1/txt2img", "post"),
            ("/sdapi/v1/options", "get"),
            ("/sdapi/v1/options", "post"),
            ("/sdapi/v1/progress", "get"),
            ("/cluster/status", "get"),
            ("/internal/ping", "get"),
            ("/cluster/nodes/{name}/disable", "post"),
            ("/cluster/nodes/{name}/enable", "post"),
        ]:
            assert method in paths[path], (path, method)
        enable = paths["/cluster/nodes/{name}/enable"]["post"]
        assert {"name": "name", "in": "path"}.items() <= enable["parameters"][0].items()
        assert not any(path.startswith("/controlnet/") for path in paths)  # named in info
        assert "/controlnet/..." in document["info"]["description"]
        txt2img = paths["/sdapi/v1/txt2img"]["post"]["requestBody"]["content"]
        assert txt2img["application/json"]["schema"]["$ref"].endswith("/Txt2ImgRequest")
        assert "/sdapi/v1/server-kill" not in paths
