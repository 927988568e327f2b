"""Which ClusterState a cluster keeps: in memory, or shared with other replicas in Redis."""

from __future__ import annotations

from sdproxy.cluster.clock import Clock
from sdproxy.cluster.state import ClusterState, MemoryState
from sdproxy.config import Settings


def open_state(settings: Settings, clock: Clock) -> ClusterState:
    """MemoryState; with ``[cluster] redis_url``, the state shared with the other replicas
    (which imports redis-py, only then)."""
    if not settings.cluster.shared:
        return MemoryState(settings.nodes, settings.scheduler, clock)
    from sdproxy.cluster.sharedstate import SharedState
    from sdproxy.shared.connect import open_store

    store = open_store(settings.cluster, settings.scheduler)
    return SharedState(settings.nodes, settings.scheduler, clock, store)
