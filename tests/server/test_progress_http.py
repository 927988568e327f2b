"""GET /sdapi/v1/progress through sdproxy, against the fake webui's own and real webuiapi."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from sdproxy.fakewebui import FakeNodeSettings
from tests.server.test_clients import client_for
from tests.support import SMALL, RunningNode, fake_nodes, info_of, post_json, proxy, wait_until

SLOW = 256.0  # seconds per 512x512 image: 4 s per SMALL image, 0.2 s a step


async def get_progress(session: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    async with session.get(f"{base}/sdapi/v1/progress") as resp:
        assert resp.status == 200
        answer: dict[str, Any] = await resp.json()
        return answer


def rendering(node: RunningNode) -> bool:
    return node.node.state.job_count > 0 and node.node.state.sampling_step >= 1


class TestOneNodeCluster:
    """With one node, sdproxy's /progress is that node's own, field by field."""

    async def test_progress_while_running_and_idle_matches_the_node(self) -> None:
        """Busy (job, job_count, job_no, steps, progress, preview) and stale idle agree."""
        async with (
            fake_nodes(FakeNodeSettings(name="a", per_image_s=SLOW / 8)) as nodes,
            proxy(nodes) as url,
            aiohttp.ClientSession() as session,
        ):
            node = nodes[0]
            body = dict(SMALL, batch_size=2, n_iter=3, seed=11)
            task = asyncio.create_task(post_json(session, f"{url}/sdapi/v1/txt2img", body))
            seen: set[str] = set()
            while len(seen) < 2:  # samples in two different batches
                await wait_until(lambda: rendering(node), "the node rendering")
                before = await get_progress(session, node.url)
                through = await get_progress(session, url)
                after = await get_progress(session, node.url)
                for answer in (before, through, after):
                    answer.pop("eta_relative")  # elapsed time: differs between two reads
                if before != after or before["state"]["job_count"] <= 0:
                    continue  # the node moved on between the reads: sample again
                assert through == before
                seen.add(through["state"]["job"])
            assert seen <= {"Batch 1 out of 3", "Batch 2 out of 3", "Batch 3 out of 3"}
            status, result, _ = await task
            assert status == 200, result
            idle_direct = await get_progress(session, node.url)
            idle = await get_progress(session, url)
        assert idle == idle_direct
        assert idle["state"]["job_timestamp"] == info_of(result)["job_timestamp"]
        assert (idle["state"]["job_no"], idle["state"]["sampling_steps"]) == (3, 20)

    async def test_idle_after_hires_and_after_interrupt_matches_the_node(self) -> None:
        """Stale job_no (two per batch with hires) and interrupted=true agree with the node."""
        async with (
            fake_nodes(FakeNodeSettings(name="a")) as nodes,
            proxy(nodes) as url,
            aiohttp.ClientSession() as session,
        ):
            node = nodes[0]
            body = dict(SMALL, n_iter=2, enable_hr=True, hr_second_pass_steps=7, hr_scale=1.5)
            status, result, _ = await post_json(session, f"{url}/sdapi/v1/txt2img", body)
            assert status == 200, result
            idle = await get_progress(session, url)
            assert idle == await get_progress(session, node.url)
            assert (idle["state"]["job_no"], idle["state"]["sampling_steps"]) == (4, 7)
            assert idle["state"]["interrupted"] is False

            node.node.settings.per_image_s = SLOW
            body = dict(SMALL, n_iter=3, seed=5)
            task = asyncio.create_task(post_json(session, f"{url}/sdapi/v1/txt2img", body))
            await wait_until(lambda: rendering(node), "the node rendering")
            status, _, _ = await post_json(session, f"{url}/sdapi/v1/interrupt", None)
            assert status == 200
            status, result, _ = await task
            assert status == 200, result
            idle = await get_progress(session, url)
            direct = await get_progress(session, node.url)
        assert idle == direct
        assert idle["state"]["interrupted"] is True
        assert idle["state"]["job_no"] == len(result["images"]) == 1


class TestSplitRequest:
    """A request split over nodes shows as one job of the client's batches."""

    async def test_webuiapi_sees_the_clients_batches(self) -> None:
        """n_iter 4 on two nodes: job_count 4 and "Batch k out of 4"; idle keeps the figures."""
        async with (
            fake_nodes(
                FakeNodeSettings(name="a", per_image_s=SLOW),
                FakeNodeSettings(name="b", per_image_s=SLOW),
            ) as nodes,
            proxy(nodes) as url,
        ):
            api = await asyncio.to_thread(client_for, url)
            pending = api.txt2img(
                prompt="x", batch_size=1, n_iter=4, seed=7, width=64, height=64, use_async=True
            )
            await wait_until(lambda: all(rendering(n) for n in nodes), "both nodes rendering")
            busy = await asyncio.to_thread(api.get_progress)
            # Each node runs 1 image x 2 iterations, but the client asked for 4 batches.
            assert [n.node.state.job_count for n in nodes] == [2, 2]
            assert busy["state"]["job_count"] == 4
            assert busy["state"]["job"] == f"Batch {busy['state']['job_no'] + 1} out of 4"
            assert 0 < busy["progress"] < 1
            assert await asyncio.to_thread(api.interrupt) == {}
            result = await pending
            await asyncio.to_thread(api.util_wait_for_ready, 0.05)
            idle = await asyncio.to_thread(api.get_progress)
        assert (idle["progress"], idle["state"]["job_count"], idle["state"]["job"]) == (0, 0, "")
        assert idle["state"]["interrupted"] is True
        assert idle["state"]["job_timestamp"] == result.info["job_timestamp"]
        assert idle["state"]["job_no"] == len(result.images) == 2
        assert idle["state"]["sampling_steps"] == 20
        # The images, each from one node's first iteration, pair with the seeds listed first.
        assert result.info["all_seeds"] == [7, 9, 8, 10]
        assert [text.split("Seed: ")[1].split(",")[0] for text in result.info["infotexts"]] == [
            "7",
            "9",
        ]


class TestScriptRequest:
    """An unsplit script request is one node's job, shown as that node shows it."""

    async def test_script_request_progress_is_its_nodes(self) -> None:
        """A script_name request runs whole on one node: /progress is that node's own."""
        async with (
            fake_nodes(
                FakeNodeSettings(name="a", per_image_s=SLOW / 8),
                FakeNodeSettings(name="b", per_image_s=SLOW / 8),
            ) as nodes,
            proxy(nodes) as url,
            aiohttp.ClientSession() as session,
        ):
            script = nodes[0].node.settings.scripts_txt2img[0]
            body = dict(SMALL, batch_size=1, n_iter=3, script_name=script)
            task = asyncio.create_task(post_json(session, f"{url}/sdapi/v1/txt2img", body))
            await wait_until(lambda: any(rendering(n) for n in nodes), "a node rendering")
            [node] = [n for n in nodes if rendering(n)]
            while True:
                before = await get_progress(session, node.url)
                through = await get_progress(session, url)
                after = await get_progress(session, node.url)
                for answer in (before, through, after):
                    answer.pop("eta_relative")
                if before == after:
                    break
            assert through == before
            assert through["state"]["job_count"] == 3
            status, _, headers = await task
        assert status == 200
        assert headers["X-Sdproxy-Shares"].startswith(f"{node.name}:0-")
