"""Node health watching: one probe loop per node, and what clients hear when no node is usable.

Each node's watcher probes it every ``health_interval_s`` while it is up and once its cooldown
has passed while it is down; the cluster wakes it early when a job fails on the node or the node
is enabled by hand. A node that goes down has its waiting jobs moved elsewhere; one that comes
back gets its lists and the cluster's checkpoint before work, then the parked work resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from sdproxy.nodes.client import NodeClient, check_node

if TYPE_CHECKING:
    from sdproxy.cluster.scheduler import Cluster

# The scheduler's logger: every "node is down/back" line keeps one logger name, as before.
log = logging.getLogger("sdproxy.cluster.scheduler")


async def watch_node(cluster: Cluster, client: NodeClient, wake: asyncio.Event) -> None:
    """Probe one node: every interval while up, after its cooldown while down."""
    scheduler = cluster.settings.scheduler
    polls = 0
    while True:
        wake.clear()
        delay = scheduler.health_interval_s
        health = client.health
        if not health.up and health.next_probe_at is not None:
            delay = max(0.0, health.next_probe_at - time.time())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await wake.wait()
        if not health.up and not health.probe_due(time.time()):
            continue  # woken early: wait for the (new) cooldown
        polls += 1
        was_up = health.up
        came_back = await check_node(client, scheduler.health_timeout_s)
        if not health.up:
            if was_up:
                log.warning("node %s is down: %s", client.name, health.last_error)
                cluster.drain(cluster.lanes[client.name])
            continue
        if came_back:
            log.info("node %s is back", client.name)
        # A returning node gets its lists read and the cluster's checkpoint before work;
        # every few polls the lists are read again (a webui's lists change on refresh).
        if came_back or not cluster.models.in_sync(client):
            await cluster.models.sync(client)
        elif polls % scheduler.inventory_every_polls == 0:
            await cluster.models.refresh_all([client])
        if client.usable and cluster.parking:
            cluster.resume_parked()


def retry_after_s(clients: Sequence[NodeClient], health_interval_s: float) -> int:
    """When a client should try again: the next probe of a down node, at least 1 s."""
    now = time.time()
    due = [
        c.health.next_probe_at
        for c in clients
        if not c.health.disabled and c.health.next_probe_at is not None
    ]
    wait = min(due) - now if due else health_interval_s
    return max(1, math.ceil(wait))


def why_none(clients: Sequence[NodeClient]) -> str:
    """Why no node is usable, node by node (errors hold no secrets: see nodes.py)."""
    why = "; ".join(
        f"{c.name}: {c.health.state_reason}"
        + (f" ({c.health.last_error})" if c.health.last_error and not c.health.disabled else "")
        for c in clients
    )
    return f"no healthy node ({why})"
