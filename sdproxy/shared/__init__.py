"""The shared layer: the ONLY code that talks to Redis, for several sdproxy replicas.

As ``nodes/`` is the only code that talks HTTP to webuis, this package is the only one that
imports redis-py, and only when ``[cluster] redis_url`` is set: ``connect.open_store`` imports
it on demand, so single-process mode needs nothing else installed. Imports point
``cluster -> shared -> core, config, errors``.

::

    connect    open_store(): the entry point, importing redis-py only when called
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
