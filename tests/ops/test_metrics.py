"""GET /metrics: Prometheus text that counts what really happened on the cluster."""

from __future__ import annotations

import asyncio

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from sdproxy.fakewebui import FakeNodeSettings, Fault
from tests.support import SMALL, fake_nodes, free_port, post_json, proxy, wait_until

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(session: aiohttp.ClientSession, url: str) -> Samples:
    """Every sample of /metrics, keyed by (name, labels)."""
    async with session.get(f"{url}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def shares_by_node(header: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for share in header.split(","):
        node, _, span = share.partition(":")
        first, _, last = span.partition("-")
        counts[node] = counts.get(node, 0) + int(last) - int(first) + 1
    return counts


class TestMetrics:
    """Counters, histograms and node gauges follow the requests sdproxy served."""

    async def test_metrics_count_requests_and_images_per_node(self) -> None:
        """Images per node match the shares header; requests are counted by route and status."""
        async with (
            fake_nodes(*(FakeNodeSettings(name=f"n{i}") for i in range(2))) as nodes,
            proxy(nodes) as url,
            aiohttp.ClientSession() as session,
        ):
            _, _, headers = await post_json(
                session, f"{url}/sdapi/v1/txt2img", {"batch_size": 5, **SMALL}
            )
            status, _, _ = await post_json(session, f"{url}/sdapi/v1/txt2img", {"steps": "x"})
            assert status == 422
            samples = await scrape(session, url)
        per_node = shares_by_node(headers["X-Sdproxy-Shares"])
        for node in ("n0", "n1"):
            rendered = value(samples, "sdproxy_node_images_rendered_total", node=node)
            assert rendered == per_node.get(node, 0)
            assert value(samples, "sdproxy_node_healthy", node=node) == 1
        route = "/sdapi/v1/txt2img"
        for code in ("200", "422"):
            labels = {"method": "POST", "route": route, "status": code}
            assert value(samples, "sdproxy_http_requests_total", **labels) == 1
        assert value(samples, "sdproxy_http_request_duration_seconds_count", route=route) == 2
        jobs = sum(
            value(samples, "sdproxy_node_job_duration_seconds_count", node=n, outcome="ok")
            for n in ("n0", "n1")
        )
        assert jobs == len(per_node)

    async def test_metrics_count_failover_and_node_down(self) -> None:
        """A node that fails its share shows a failover, an error job and healthy 0."""
        async with (
            fake_nodes(
                FakeNodeSettings(name="good"),
                FakeNodeSettings(name="bad", fault=Fault(mode="error500")),
            ) as nodes,
            proxy(nodes) as url,
            aiohttp.ClientSession() as session,
        ):
            status, _, _ = await post_json(
                session, f"{url}/sdapi/v1/txt2img", {"batch_size": 4, **SMALL}
            )
            assert status == 200
            samples = await scrape(session, url)
        assert value(samples, "sdproxy_failovers_total", node="bad") == 1
        assert value(samples, "sdproxy_failovers_total", node="good") == 0
        errors = "sdproxy_node_job_duration_seconds_count"
        assert value(samples, errors, node="bad", outcome="error") == 1
        assert value(samples, "sdproxy_node_images_rendered_total", node="good") == 4
        assert value(samples, "sdproxy_node_healthy", node="bad") == 0

    async def test_metrics_show_queue_depth_and_speed(self) -> None:
        """While a request renders, its images are the node's queue; speed is the weight."""
        async with (
            fake_nodes(FakeNodeSettings(name="slow", per_image_s=0.5)) as nodes,
            proxy([{"name": "slow", "url": nodes[0].url, "weight": 2.5}]) as url,
            aiohttp.ClientSession() as session,
        ):
            body = {"batch_size": 3, "width": 512, "height": 512, "steps": 20}
            request = asyncio.create_task(post_json(session, f"{url}/sdapi/v1/txt2img", body))
            await wait_until(nodes[0].node.queue_lock.locked, "the node to start rendering")
            samples = await scrape(session, url)
            assert not request.done()
            status, _, _ = await request
            after = await scrape(session, url)
        assert status == 200
        assert value(samples, "sdproxy_node_queued_images", node="slow") == 3
        assert value(after, "sdproxy_node_queued_images", node="slow") == 0
        assert value(samples, "sdproxy_node_speed_estimate", node="slow") == 2.5

    async def test_metrics_registry_per_app(self) -> None:
        """Two apps in one process count separately (no global registry)."""
        dead = {"name": "dead", "url": f"http://127.0.0.1:{free_port()}"}
        async with (
            proxy([dead], scheduler={"wait_for_node_s": 0}) as first,
            proxy([dead], scheduler={"wait_for_node_s": 0}) as second,
            aiohttp.ClientSession() as session,
        ):
            for _ in range(3):
                await post_json(session, f"{first}/sdapi/v1/txt2img", SMALL)
            one, two = await scrape(session, first), await scrape(session, second)
        labels = {"method": "POST", "route": "/sdapi/v1/txt2img", "status": "503"}
        assert value(one, "sdproxy_http_requests_total", **labels) == 3
        assert value(two, "sdproxy_http_requests_total", **labels) == 0
        assert value(one, "sdproxy_node_healthy", node="dead") == 0
