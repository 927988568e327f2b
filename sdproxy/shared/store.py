"""SharedStore: the shared layer assembled from the settings, started and stopped as one.

It owns the redis-py client, the link (mode and timeouts), the broadcast channel, the lease
manager, the replica registry and the records, and the supervised tasks that keep them going:
the Redis monitor, the pub/sub reader and the heartbeat. ``start`` never fails because Redis
is down: the store then starts in local mode and joins when Redis answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from sdproxy.config import ClusterSettings, SchedulerSettings
from sdproxy.shared import scripts
from sdproxy.shared.broadcast import Broadcast
from sdproxy.shared.keys import Keys
from sdproxy.shared.leases import NodeLeases
from sdproxy.shared.link import Link, SharedUnavailable, default_replica_id, redacted_url
from sdproxy.shared.nodestate import ClusterRecords, NodeRecords
from sdproxy.shared.records import Records
from sdproxy.shared.replicas import ReplicaRegistry
from sdproxy.shared.tasks import Supervisor

log = logging.getLogger(__name__)


def redis_client(url: str, timeout_s: float, replica_id: str) -> Redis:
    """A redis-py asyncio client whose every socket operation is bounded by ``timeout_s``.

    No retries inside redis-py: a failed call is reported at once and the link decides.
    TLS (rediss://) verifies the server's certificate, redis-py's default.
    """
    return Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        client_name=f"sdproxy:{replica_id}",
    )


class SharedStore:
    """Everything one replica shares with the others through Redis."""

    def __init__(
        self,
        client: Redis,
        cluster: ClusterSettings,
        scheduler: SchedulerSettings,
        *,
        where: str = "redis",
    ) -> None:
        self.settings = cluster
        replica_id = cluster.replica_id or default_replica_id()
        self.supervisor = Supervisor()
        self.link = Link(
            client,
            keys=Keys(cluster.redis_prefix),
            replica_id=replica_id,
            timeout_s=cluster.redis_timeout_s,
            retry_s=min(1.0, cluster.lease_ttl_s / 3),
            where=where,
        )
        self.broadcast = Broadcast(self.link, ping_s=cluster.lease_ttl_s / 3)
        # First on every (re)join: a Redis that restarted has forgotten the scripts.
        self.broadcast.on_subscribed(self._load_scripts)
        self.records = Records(self.link, self.broadcast)
        self.nodes = NodeRecords(
            self.records,
            self.link,
            cooldown_base_s=scheduler.cooldown_base_s,
            cooldown_max_s=scheduler.cooldown_max_s,
        )
        self.cluster = ClusterRecords(self.records)
        self.replicas = ReplicaRegistry(self.link, self.broadcast, ttl_s=cluster.lease_ttl_s)
        self.leases = NodeLeases(
            self.link, self.broadcast, self.supervisor, ttl_s=cluster.lease_ttl_s
        )
        self._started = False

    @classmethod
    def from_settings(cls, cluster: ClusterSettings, scheduler: SchedulerSettings) -> SharedStore:
        if cluster.redis_url is None:
            raise ValueError("SharedStore needs [cluster] redis_url")
        url = cluster.redis_url.get_secret_value()
        replica_id = cluster.replica_id or default_replica_id()
        client = redis_client(url, cluster.redis_timeout_s, replica_id)
        return cls(client, cluster, scheduler, where=redacted_url(url))

    async def _load_scripts(self) -> None:
        """SCRIPT LOAD every script (one round trip), so each first EVALSHA succeeds."""

        async def load(client: Redis) -> None:
            async with client.pipeline(transaction=False) as pipe:
                for source in scripts.ALL:
                    pipe.script_load(source)
                await pipe.execute()

        await self.link.call("script load", load)

    @property
    def replica_id(self) -> str:
        return self.link.replica_id

    @property
    def shared(self) -> bool:
        """State is shared right now (Redis answers)."""
        return self.link.up

    def require(self) -> None:
        """Raise SharedUnavailable (503) if Redis is gone and ``on_redis_down = "refuse"``."""
        if not self.link.up and self.settings.on_redis_down == "refuse":
            raise SharedUnavailable(
                f"sdproxy refuses work while its shared state is unavailable: "
                f"{self.link.describe()}",
                retry_after_s=max(1, round(self.link.retry_s)),
            )

    async def start(self, wait_s: float | None = None) -> None:
        """Start the tasks and try to join; local mode if Redis does not answer within
        ``wait_s`` (default: three call timeouts)."""
        if self._started:
            return
        self._started = True
        self.supervisor.loop("redis-monitor", self.link.run_monitor)
        self.supervisor.loop("redis-pubsub", self.broadcast.run)
        self.supervisor.loop("replica-heartbeat", self.replicas.run)
        try:
            async with asyncio.timeout(wait_s if wait_s is not None else self.link.timeout_s * 3):
                await self.link.tried.wait()
                if self.link.up:
                    await self.broadcast.ready.wait()
        except TimeoutError:
            pass
        if not self.broadcast.ready.is_set():
            log.warning(
                "redis %s does not answer: starting in local mode; joining the replicas "
                "when it does",
                self.link.where,
            )

    async def aclose(self) -> None:
        """Give back the leases, say goodbye, stop the tasks, close the connections."""
        if self.link.up:
            await self.leases.aclose()
            with contextlib.suppress(SharedUnavailable):  # else our heartbeat expires alone
                await self.replicas.depart()
        await self.supervisor.aclose()
        await self.link.aclose()

    def status(self) -> dict[str, Any]:
        """For /cluster/status: the mode, this replica and the others as last heard."""
        me = self.replicas.state
        others = self.replicas.others()
        return {
            **self.link.status(),
            "replica": me.replica,
            "replicas": [
                {"id": state.replica, "in_flight": state.in_flight, "version": state.version}
                for state in [me, *others]
            ],
            "leases_held": len(self.leases.held()),
        }
