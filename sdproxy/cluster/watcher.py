"""Node health watching: one probe loop per node, and what clients hear when no node is usable.

Each node's watcher probes it every ``health_interval_s`` while it is up and once its cooldown
has passed while it is down; the cluster wakes it early when a job fails on the node or the node
is enabled by hand. A node that goes down has its waiting jobs moved elsewhere; one that comes
back gets its lists and the cluster's checkpoint before work, then the parked work resumes.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Sequence
from typing import Protocol

from sdproxy.cluster.clock import Clock
from sdproxy.cluster.state import ClusterState
from sdproxy.config import SchedulerSettings
from sdproxy.errors import NodeError, NodeRejected

log = logging.getLogger(__name__)


class WatchHost(Protocol):
    """What a watcher needs from the cluster."""

    @property
    def clock(self) -> Clock: ...

    @property
    def state(self) -> ClusterState: ...

    async def probe(self, node: str, timeout_s: float) -> None:
        """One cheap call to the node; raises NodeError if it fails."""
        ...

    def node_went_down(self, node: str) -> None: ...

    async def catch_up(self, node: str, *, came_back: bool, poll: int) -> None:
        """Bring sdproxy's view of a usable node up to date (lists, the cluster checkpoint)."""
        ...

    def node_usable(self, node: str) -> None:
        """The node may take work now: resume what waits for one."""
        ...


async def probe_once(host: WatchHost, node: str, timeout_s: float) -> bool:
    """Probe ``node`` and record the outcome. True if it came back."""
    try:
        await host.probe(node, timeout_s)
    except NodeRejected:
        # It answered: reachable. A 401 here is the auth configuration's problem.
        return host.state.record_ok(node)
    except NodeError as exc:
        host.state.record_failure(node, exc.reason, probe=True)
        return False
    return host.state.record_ok(node)


async def watch_node(
    host: WatchHost, node: str, settings: SchedulerSettings, wake: asyncio.Event
) -> None:
    """Probe one node forever: every interval while up, after its cooldown while down."""
    clock, state = host.clock, host.state
    polls = 0
    probed_elsewhere = False
    while True:
        wake.clear()
        health = state.health(node)
        delay = settings.health_interval_s
        if not health.up and health.next_probe_at is not None:
            delay = max(0.0, health.next_probe_at - clock.wall())
        if probed_elsewhere:  # its claim lasts an interval: asking sooner would only lose again
            delay = max(delay, settings.health_interval_s)
        await clock.wait(wake, delay)
        health = state.health(node)
        if not health.up and not health.probe_due(clock.wall()):
            continue  # woken early: wait for the (new) cooldown
        polls += 1
        was_up = health.up
        probed_elsewhere = not await state.claim_probe(node)
        if probed_elsewhere:
            # Another replica probes it this interval and shares what it finds.
            if state.usable(node):
                await host.catch_up(node, came_back=False, poll=polls)
                host.node_usable(node)
            continue
        came_back = await probe_once(host, node, settings.health_timeout_s)
        if not state.health(node).up:
            if was_up:
                log.warning("node %s is down: %s", node, state.health(node).last_error)
                host.node_went_down(node)
            continue
        if came_back:
            log.info("node %s is back", node)
        await host.catch_up(node, came_back=came_back, poll=polls)
        if state.usable(node):
            host.node_usable(node)


def retry_after_s(state: ClusterState, now: float, health_interval_s: float) -> int:
    """When a client should try again: the next probe of a down node, at least 1 s."""
    due = [
        health.next_probe_at
        for health in (state.health(node) for node in state.nodes)
        if not health.disabled and health.next_probe_at is not None
    ]
    wait = min(due) - now if due else health_interval_s
    return max(1, math.ceil(wait))


def why_none(state: ClusterState, nodes: Sequence[str]) -> str:
    """Why no node is usable, node by node (errors hold no secrets: see nodes/client.py)."""
    parts = []
    for node in nodes:
        health = state.health(node)
        error = health.last_error if health.last_error and not health.disabled else None
        parts.append(f"{node}: {health.state_reason}" + (f" ({error})" if error else ""))
    return f"no healthy node ({'; '.join(parts)})"
