"""End to end: sdproxy in front of fake webui nodes answers exactly as one node would."""

from __future__ import annotations

import base64
import io

import aiohttp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from sdproxy.fakewebui import FakeNodeSettings
from tests.support import (
    SMALL,
    assert_same_as_one_node,
    fake_nodes,
    free_port,
    info_of,
    post_json,
    proxy,
    reference_answer,
)


def png_b64(colour: tuple[int, int, int], size: int = 32) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


class TestSplitMatchesOneNode:
    """Any split over any cluster gives one node's answer."""

    @settings(
        max_examples=25,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(
        batch_size=st.integers(1, 8),
        n_iter=st.integers(1, 4),
        seed=st.one_of(st.just(-1), st.integers(0, 2**32)),
        strength=st.sampled_from([0, 0.25]),
        weights=st.lists(st.floats(0.1, 10), min_size=1, max_size=4),
        max_batch=st.one_of(st.none(), st.integers(1, 3)),
    )
    async def test_txt2img_split_matches_single_node(
        self,
        batch_size: int,
        n_iter: int,
        seed: int,
        strength: float,
        weights: list[float],
        max_batch: int | None,
    ) -> None:
        """Random batches on 1-4 weighted nodes: same pixels and info as one node."""
        count = len(weights) + 1
        async with (
            fake_nodes(*(FakeNodeSettings(name=f"n{i}") for i in range(count))) as nodes,
            proxy(
                [
                    {"name": n.name, "url": n.url, "weight": w, "max_batch_size": max_batch}
                    for n, w in zip(nodes[1:], weights, strict=True)
                ]
            ) as url,
            aiohttp.ClientSession() as session,
        ):
            body = {
                "prompt": "a red fox",
                "negative_prompt": "blur",
                "batch_size": batch_size,
                "n_iter": n_iter,
                "seed": seed,
                "subseed_strength": strength,
                **SMALL,
            }
            status, proxied, headers = await post_json(session, f"{url}/sdapi/v1/txt2img", body)
            assert status == 200, proxied
            single = await reference_answer(session, nodes[0], "txt2img", body, proxied)
            assert_same_as_one_node(proxied, single, body)
            rendered = sum(n.node.images_rendered for n in nodes[1:])
            assert rendered == batch_size * n_iter
            assert "X-Sdproxy-Shares" in headers


class TestImg2img:
    """img2img is split like txt2img, or by whole batches with several init images."""

    async def test_img2img_one_init_image_matches_single_node(self) -> None:
        """One init image goes to every node; images split one by one."""
        async with (
            fake_nodes(*(FakeNodeSettings(name=f"n{i}") for i in range(3))) as nodes,
            proxy(nodes[1:]) as url,
            aiohttp.ClientSession() as session,
        ):
            body = {
                "init_images": [png_b64((200, 10, 10))],
                "batch_size": 3,
                "n_iter": 2,
                "seed": 42,
                **SMALL,
            }
            status, proxied, headers = await post_json(session, f"{url}/sdapi/v1/img2img", body)
            assert status == 200, proxied
            single = await reference_answer(session, nodes[0], "img2img", body, proxied)
            assert_same_as_one_node(proxied, single, body)
            assert headers["X-Sdproxy-Shares"] == "n1:0-2,n2:3-5"

    async def test_img2img_three_init_images_split_by_iteration(self) -> None:
        """Three init images: the batch is three, and nodes get whole batches."""
        inits = [png_b64((i * 80, 0, 0)) for i in range(3)]
        async with (
            fake_nodes(*(FakeNodeSettings(name=f"n{i}") for i in range(3))) as nodes,
            proxy(nodes[1:]) as url,
            aiohttp.ClientSession() as session,
        ):
            body = {"init_images": inits, "batch_size": 4, "n_iter": 3, "seed": 7, **SMALL}
            status, proxied, headers = await post_json(session, f"{url}/sdapi/v1/img2img", body)
            assert status == 200, proxied
            single = await reference_answer(session, nodes[0], "img2img", body, proxied)
            assert_same_as_one_node(proxied, single, body)
            assert len(proxied["images"]) == 9
            assert len(info_of(proxied)["all_seeds"]) == 12
            assert headers["X-Sdproxy-Shares"] == "n1:0-5,n2:6-8"


class TestRequestShapes:
    """Grids, send_images and scripts behave as on one webui."""

    async def test_save_images_builds_one_grid(self) -> None:
        """With save_images the nodes' grids are dropped and one grid of all images leads."""
        async with (
            fake_nodes(*(FakeNodeSettings(name=f"n{i}") for i in range(3))) as nodes,
            proxy(nodes[1:]) as url,
            aiohttp.ClientSession() as session,
        ):
            body = {"batch_size": 5, "seed": 3, "save_images": True, **SMALL}
            status, proxied, _ = await post_json(session, f"{url}/sdapi/v1/txt2img", body)
            assert status == 200, proxied
            single = await reference_answer(session, nodes[0], "txt2img", body, proxied)
            assert len(proxied["images"]) == 6
            assert info_of(proxied)["index_of_first_image"] == 1
            assert_same_as_one_node(proxied, single, body)

    async def test_send_images_false_returns_no_images(self) -> None:
        """send_images false: images is empty, info still describes every image."""
        async with (
            fake_nodes(*(FakeNodeSettings(name=f"n{i}") for i in range(2))) as nodes,
            proxy(nodes) as url,
            aiohttp.ClientSession() as session,
        ):
            body = {"batch_size": 4, "seed": 3, "send_images": False, **SMALL}
            status, proxied, _ = await post_json(session, f"{url}/sdapi/v1/txt2img", body)
            assert status == 200, proxied
            assert proxied["images"] == []
            assert info_of(proxied)["all_seeds"] == [3, 4, 5, 6]
            assert len(info_of(proxied)["infotexts"]) == 4

    async def test_script_request_goes_whole_to_one_node(self) -> None:
        """A script_name request is not split: one node renders all of it."""
        async with (
            fake_nodes(*(FakeNodeSettings(name=f"n{i}") for i in range(2))) as nodes,
            proxy(nodes) as url,
            aiohttp.ClientSession() as session,
        ):
            script = nodes[0].node.settings.scripts_txt2img[0]
            body = {"batch_size": 4, "seed": 3, "script_name": script, **SMALL}
            status, proxied, headers = await post_json(session, f"{url}/sdapi/v1/txt2img", body)
            assert status == 200, proxied
            assert sorted(n.node.generations for n in nodes) == [0, 1]
            assert len(proxied["images"]) == 4
            rendered_by = next(n.name for n in nodes if n.node.generations)
            assert headers["X-Sdproxy-Shares"] == f"{rendered_by}:0-3"


class TestErrors:
    """Bad input and node trouble get the webui's error shapes."""

    async def test_bad_body_is_422_naming_the_field(self) -> None:
        """A wrong type is answered by sdproxy itself, before any node is asked."""
        async with (
            fake_nodes(FakeNodeSettings()) as nodes,
            proxy(nodes) as url,
            aiohttp.ClientSession() as session,
        ):
            status, body, _ = await post_json(
                session, f"{url}/sdapi/v1/txt2img", {"batch_size": "many"}
            )
            assert status == 422
            assert body == {
                "detail": [
                    {
                        "loc": ["body", "batch_size"],
                        "msg": "value is not a valid integer",
                        "type": "type_error.integer",
                    }
                ]
            }
            async with session.post(f"{url}/sdapi/v1/txt2img", data=b"{oops") as resp:
                assert resp.status == 422
                assert (await resp.json())["detail"][0]["type"] == "value_error.jsondecode"
            assert nodes[0].node.generations == 0

    async def test_node_rejection_is_passed_through(self) -> None:
        """A node's 4xx (an unknown always-on script) reaches the client unchanged."""
        async with (
            fake_nodes(FakeNodeSettings()) as nodes,
            proxy(nodes) as url,
            aiohttp.ClientSession() as session,
        ):
            body = {"alwayson_scripts": {"NoSuchScript": {"args": []}}, **SMALL}
            status, answer, _ = await post_json(session, f"{url}/sdapi/v1/txt2img", body)
            direct = await post_json(session, f"{nodes[0].url}/sdapi/v1/txt2img", body)
            assert (status, answer) == direct[:2]
            assert status == 422

    async def test_no_reachable_node_is_503(self) -> None:
        """With every node unreachable the client gets 503 and a webui-shaped body."""
        dead = {"name": "dead", "url": f"http://127.0.0.1:{free_port()}"}
        async with (
            proxy([dead], scheduler={"wait_for_node_s": 0}) as url,
            aiohttp.ClientSession() as session,
        ):
            status, body, headers = await post_json(session, f"{url}/sdapi/v1/txt2img", SMALL)
            assert status == 503
            assert body["error"] == "NoNodeAvailable"
            assert "Retry-After" in headers

    async def test_unknown_route_and_method(self) -> None:
        """Unknown routes and wrong methods answer FastAPI's JSON bodies."""
        async with (
            fake_nodes(FakeNodeSettings()) as nodes,
            proxy(nodes) as url,
            aiohttp.ClientSession() as session,
        ):
            async with session.get(f"{url}/nope") as resp:
                assert (resp.status, await resp.json()) == (404, {"detail": "Not Found"})
            async with session.get(f"{url}/sdapi/v1/txt2img") as resp:
                assert (resp.status, await resp.json()) == (405, {"detail": "Method Not Allowed"})


class TestClusterStatus:
    """/cluster/status reports every node."""

    async def test_status_lists_nodes_and_counts(self) -> None:
        """After a request the status shows each node healthy with its images."""
        async with (
            fake_nodes(*(FakeNodeSettings(name=f"n{i}") for i in range(2))) as nodes,
            proxy(nodes) as url,
            aiohttp.ClientSession() as session,
        ):
            await post_json(session, f"{url}/sdapi/v1/txt2img", {"batch_size": 4, **SMALL})
            async with session.get(f"{url}/cluster/status") as resp:
                status = await resp.json()
            assert [n["name"] for n in status["nodes"]] == ["n0", "n1"]
            assert all(n["healthy"] for n in status["nodes"])
            assert sum(n["images_rendered"] for n in status["nodes"]) == 4
            assert status["nodes"][0]["url"] == nodes[0].url
