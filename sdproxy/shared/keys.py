"""Pure: the name of every Redis key and channel sdproxy uses, all under one prefix.

Two clusters can share one Redis by giving each its own ``[cluster] redis_prefix``. Node names
and replica ids are checked by the configuration (letters, digits, ``. _ - :``), so no name can
reach into another key's space. Nothing here holds a secret: node URLs and credentials never
become part of a key or a value.

::

    <prefix>:node:<node>:lease       the node's turn: "<token>|<owner>", with a TTL
    <prefix>:node:<node>:fence       INCR counter: the fencing token of each lease granted
    <prefix>:node:<node>:tickets     sorted set: owners waiting for the lease, first come first
    <prefix>:node:<node>:seen        sorted set: when each waiting owner last said it waits
    <prefix>:node:<node>:seq         INCR counter: the ticket order
    <prefix>:node:<node>:probe       held by the replica that probes the node this interval
    <prefix>:node:<node>:health      versioned record (hash v, d): the node's health
    <prefix>:node:<node>:speed       bounded list of speed observations (JSON)
    <prefix>:node:<node>:benchmarks  bounded list of benchmark results (JSON)
    <prefix>:node:<node>:counters    hash of counters (jobs, images, failures, ...)
    <prefix>:node:<node>:catchup     the lock of the one replica catching a returning node up
    <prefix>:node:<node>:caughtup    the epoch the node was last caught up for
    <prefix>:node:<node>:claim:<what>  one-off claims (benchmark, ...)
    <prefix>:replica:<id>            a replica's heartbeat and what it publishes, with a TTL
    <prefix>:replicas                sorted set: replica id -> last heartbeat (ms, Redis time)
    <prefix>:cluster:checkpoint      versioned record: the cluster's checkpoint
    <prefix>:cluster:options         versioned record: the options broadcast to every node
    <prefix>:events                  the pub/sub channel every replica listens on
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    """Key and channel names under ``prefix``."""

    prefix: str

    def node(self, node: str, what: str) -> str:
        return f"{self.prefix}:node:{node}:{what}"

    def lease_keys(self, node: str) -> list[str]:
        """The keys the lease scripts take, in their order: lease, fence, tickets, seen, seq."""
        return [self.node(node, what) for what in ("lease", "fence", "tickets", "seen", "seq")]

    def replica(self, replica_id: str) -> str:
        return f"{self.prefix}:replica:{replica_id}"

    @property
    def replicas(self) -> str:
        return f"{self.prefix}:replicas"

    def cluster(self, what: str) -> str:
        return f"{self.prefix}:cluster:{what}"

    @property
    def events(self) -> str:
        return f"{self.prefix}:events"

    @property
    def pattern(self) -> str:
        """Every key of this cluster (for SCAN in tests and tools)."""
        return f"{self.prefix}:*"
