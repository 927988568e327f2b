"""The fake node's test-only counter of jobs held at once, and its GET /fake/stats."""

from __future__ import annotations

import asyncio

import aiohttp

from sdproxy.fakewebui import FakeNodeSettings
from tests.support import SMALL, fake_nodes, fake_stats, node_processes, post_json, wait_until


class TestConcurrentJobs:
    """max_concurrent_jobs tells whether a node was ever sent two jobs at once."""

    async def test_concurrent_jobs_one_at_a_time(self) -> None:
        """Requests sent one after the other: never more than one job."""
        async with (
            fake_nodes(FakeNodeSettings(per_image_s=0.01)) as (node,),
            aiohttp.ClientSession() as session,
        ):
            for _ in range(3):
                status, _, _ = await post_json(session, f"{node.url}/sdapi/v1/txt2img", SMALL)
                assert status == 200
            stats = await fake_stats(session, node.url)
        assert stats["max_concurrent_jobs"] == 1
        assert stats["generations"] == 3
        assert stats["active_jobs"] == 0
        assert node.node.max_concurrent_jobs == 1

    async def test_concurrent_jobs_overlap_counted(self) -> None:
        """Three requests at once: the node held three jobs (its queue lock ran them in turn)."""
        async with (
            fake_nodes(FakeNodeSettings(per_image_s=0.2)) as (node,),
            aiohttp.ClientSession() as session,
        ):
            url = f"{node.url}/sdapi/v1/txt2img"
            answers = await asyncio.gather(*(post_json(session, url, SMALL) for _ in range(3)))
            assert [status for status, _, _ in answers] == [200, 200, 200]
            stats = await fake_stats(session, node.url)
        assert stats["max_concurrent_jobs"] == 3

    async def test_concurrent_jobs_subprocess_node(self) -> None:
        """A subprocess node answers /fake/stats too, counting while a job runs."""
        async with (
            node_processes(["--per-image-s", "2"]) as (node,),
            aiohttp.ClientSession() as session,
        ):
            request = asyncio.create_task(post_json(session, f"{node.url}/sdapi/v1/txt2img", SMALL))

            async def running() -> bool:
                return (await fake_stats(session, node.url))["active_jobs"] == 1

            await wait_until(running, what="the job to start")
            status, _, _ = await request
            stats = await fake_stats(session, node.url)
        assert status == 200
        assert stats["max_concurrent_jobs"] == 1
        assert stats["active_jobs"] == 0
