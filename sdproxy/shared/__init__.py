"""The shared layer: the ONLY code that talks to Redis, for several sdproxy replicas.

As ``nodes/`` is the only code that talks HTTP to webuis, this package is the only one that
imports redis-py, and only when ``[cluster] redis_url`` is set: :func:`open_store` imports it
on demand, so single-process mode needs nothing else installed. Imports point
``cluster -> shared -> core, config, errors``.

::

    keys       pure: every key and channel name under [cluster] redis_prefix
    scripts    the Lua scripts (atomic, one round trip each)
    link       the client, a timeout on every call, shared/local mode, rejoining; SharedUnavailable
    tasks      the supervisor of the layer's background tasks
    broadcast  one pub/sub channel for what every replica must hear at once; resubscribes
    records    versioned records (compare-and-set, cached), bounded logs, counters, claims
    nodestate  node health, speed, benchmarks, probe claims, catch-up; checkpoint and options
    replicas   the replica registry: heartbeats and published backlogs
    leases     node leases: one job at a time per node across replicas, fenced, fair
    store      SharedStore: all of the above, started and stopped as one

How the scheduler uses it (and the ClusterState operations it needs): docs/replicas.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sdproxy.config import ClusterSettings, SchedulerSettings

if TYPE_CHECKING:  # the module itself imports redis-py: only at run time, only when asked
    from sdproxy.shared.store import SharedStore


def open_store(cluster: ClusterSettings, scheduler: SchedulerSettings) -> SharedStore:
    """The shared store for ``cluster`` (which must have a redis_url); not yet started."""
    from sdproxy.shared.store import SharedStore  # redis-py only when shared

    return SharedStore.from_settings(cluster, scheduler)
