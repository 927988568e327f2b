"""Node leases: at most one job at a time on a node, across every replica.

A replica sends a job to a node only while it holds the node's lease. A lease has a TTL
(``lease_ttl_s``) and is renewed every third of it while the job runs, by one task per held
lease; it carries a fencing token (``INCR`` per node: it only grows) and an owner string unique
to the one acquire, so a lease that expired can never be renewed or released by its old holder:
the holder learns it lost the lease (``Lease.lost``).

Fairness: a replica that finds the node busy takes a ticket in the node's line, a sorted set
ordered by the ticket's priority: the start of the request it is for, so the oldest work goes
first across replicas as on one webui (without one, by arrival). When the holder releases, the
release script itself hands the lease to the first ticket and publishes that: the waiter is
served without asking, with no herd of retries. A waiter also asks again now and then (every
third of the TTL, or when the current lease would expire): that renews its ticket, which
otherwise expires with it, and takes over a lease whose holder died. An uncontended acquire is
one round trip.

A replica that dies mid-job stops renewing: its lease expires within ``lease_ttl_s`` and its
tickets within the same time, and the node is free for the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from dataclasses import dataclass, field

from sdproxy.shared import scripts
from sdproxy.shared.broadcast import Broadcast, Message
from sdproxy.shared.link import Link, SharedUnavailable
from sdproxy.shared.tasks import Supervisor

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Lease:
    """One replica's turn on one node."""

    node: str
    owner: str
    token: int  # the fencing token: larger than that of every earlier lease on the node
    expires_at: float  # loop time by which Redis has surely let it expire, unless renewed
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    lost_reason: str | None = None
    released: bool = False
    renewals: int = 0
    _renewal: asyncio.Task[None] | None = None

    @property
    def value(self) -> str:
        return f"{self.token}|{self.owner}"

    @property
    def held(self) -> bool:
        """Still ours, as far as this replica can tell: not lost, not released, not expired."""
        loop_now = asyncio.get_running_loop().time()
        return not self.lost.is_set() and not self.released and loop_now < self.expires_at

    def lose(self, reason: str) -> None:
        if self.lost.is_set() or self.released:
            return
        self.lost_reason = reason
        self.lost.set()
        log.warning("lease on node %s (token %d) lost: %s", self.node, self.token, reason)


class NodeLeases:
    """Acquires, renews and releases node leases for this replica."""

    def __init__(
        self, link: Link, broadcast: Broadcast, supervisor: Supervisor, *, ttl_s: float
    ) -> None:
        self.link = link
        self.ttl_s = ttl_s
        self.renew_every_s = ttl_s / 3
        self._broadcast = broadcast
        self._supervisor = supervisor
        client = link.client
        self._acquire = client.register_script(scripts.ACQUIRE)
        self._leave = client.register_script(scripts.LEAVE)
        self._renew = client.register_script(scripts.RENEW)
        self._waiting: dict[str, asyncio.Future[int]] = {}  # owner -> its token when handed
        self._held: dict[str, Lease] = {}  # owner -> lease
        self.acquired = 0
        self.handed_over = 0  # leases handed to this replica by a release, not asked for
        self.waited = 0  # acquires that found the node busy
        broadcast.on("lease", self._on_handed_over)

    @property
    def ttl_ms(self) -> int:
        return max(1, round(self.ttl_s * 1000))

    def held(self) -> list[Lease]:
        return [lease for lease in self._held.values() if lease.held]

    async def acquire(
        self, node: str, *, wait: bool = True, priority: float | None = None
    ) -> Lease | None:
        """The node's lease; waits in line if another holds it (None then if not ``wait``).

        ``priority``: a Unix time; the line is served oldest first (None: by arrival). Raises
        SharedUnavailable if Redis fails meanwhile. Cancelling the wait leaves the line (and
        gives back a lease handed over in the same instant).
        """
        owner = f"{self.link.replica_id}#{secrets.token_hex(6)}"
        loop = asyncio.get_running_loop()
        handed: asyncio.Future[int] = loop.create_future()
        self._waiting[owner] = handed
        done = False
        try:
            counted = False
            while True:
                started = loop.time()
                granted, token, remaining_ms = await self._attempt(node, owner, wait, priority)
                if granted:
                    done = True
                    return self._hold(node, owner, token, started + self.ttl_s)
                if not wait:
                    done = True
                    return None
                if not counted:
                    self.waited, counted = self.waited + 1, True
                # The safety net: ask again when the current lease would run out, and at least
                # every third of the TTL (which keeps our ticket alive).
                pause_s = min(self.renew_every_s, max(remaining_ms, 0) / 1000 + 0.005)
                try:
                    async with asyncio.timeout(pause_s):
                        token = await asyncio.shield(handed)
                except TimeoutError:
                    continue
                self.handed_over += 1
                done = True
                # Handed over when the message left; it reached us within one call's time.
                expires_at = loop.time() + self.ttl_s - self.link.timeout_s
                return self._hold(node, owner, token, expires_at)
        finally:
            self._waiting.pop(owner, None)
            if not done:  # cancelled, or Redis failed: leave the line, give back what came
                self._supervisor.once(f"lease-leave-{node}", self._leave_quietly(node, owner))

    async def _attempt(
        self, node: str, owner: str, queue: bool, priority: float | None
    ) -> tuple[bool, int, int]:
        keys = self.link.keys.lease_keys(node)
        args: list[str | int] = [
            owner,
            self.ttl_ms,
            self.ttl_ms,  # a ticket lives as long as a lease unless its waiter asks again
            self.link.keys.events,
            node,
            self.link.replica_id,
            "1" if queue else "0",
            "" if priority is None else str(round(priority * 1000)),
        ]
        reply = await self.link.call(
            "lease acquire", lambda _: self._acquire(keys=keys, args=args), node
        )
        granted, token, remaining_ms = (int(part) for part in reply)
        return granted == 1, token, remaining_ms

    def _hold(self, node: str, owner: str, token: int, expires_at: float) -> Lease:
        lease = Lease(node, owner, token, expires_at)
        self._held[owner] = lease
        self.acquired += 1
        lease._renewal = self._supervisor.once(f"lease-renew-{node}", self._keep(lease))
        return lease

    def _on_handed_over(self, message: Message) -> None:
        owner, token = message.fields.get("owner"), message.fields.get("token")
        if not isinstance(owner, str) or not isinstance(token, int | float):
            return
        handed = self._waiting.get(owner)
        if handed is not None and not handed.done():
            handed.set_result(int(token))

    async def _keep(self, lease: Lease) -> None:
        """Renew ``lease`` every third of its TTL until it is released or lost."""
        loop = asyncio.get_running_loop()
        next_at = lease.expires_at - self.ttl_s + self.renew_every_s
        keys = [self.link.keys.node(lease.node, "lease")]
        args: list[str | int] = [lease.value, self.ttl_ms]
        while not lease.released and not lease.lost.is_set():
            await asyncio.sleep(max(next_at - loop.time(), 0.0))
            if lease.released:
                return
            started = loop.time()
            try:
                renewed = await self.link.call(
                    "lease renew", lambda _: self._renew(keys=keys, args=args), lease.node
                )
            except SharedUnavailable:
                if loop.time() >= lease.expires_at:
                    lease.lose("redis unreachable until the lease expired")
                    return
                next_at = loop.time() + min(self.link.retry_s, self.renew_every_s / 2)
                continue
            if int(renewed) != 1:
                lease.lose("it had expired and is no longer this replica's")
                return
            lease.renewals += 1
            lease.expires_at = started + self.ttl_s
            next_at = started + self.renew_every_s

    async def release(self, lease: Lease) -> bool:
        """Give the node back (to the next in line); False if it was no longer ours.

        Never raises for Redis trouble: a lease not given back expires by itself.
        """
        if lease.released:
            return False
        lease.released = True
        self._held.pop(lease.owner, None)
        if lease._renewal is not None:
            lease._renewal.cancel()
        try:
            held = await self._leave_call(lease.node, lease.owner, str(lease.token))
        except SharedUnavailable:
            return False
        if not held and not lease.lost.is_set():
            lease.lost_reason = "it had expired before it was released"
            lease.lost.set()
            log.warning(
                "lease on node %s (token %d) had expired before release", lease.node, lease.token
            )
        return held

    async def _leave_call(self, node: str, owner: str, token: str) -> bool:
        keys = self.link.keys.lease_keys(node)
        args: list[str | int] = [
            owner,
            token,
            self.ttl_ms,
            self.ttl_ms,
            self.link.keys.events,
            node,
            self.link.replica_id,
        ]
        held = await self.link.call(
            "lease release", lambda _: self._leave(keys=keys, args=args), node
        )
        return int(held) == 1

    async def _leave_quietly(self, node: str, owner: str) -> None:
        # If Redis is gone, the ticket (and a lease handed over meanwhile) expire by themselves.
        with contextlib.suppress(SharedUnavailable):
            await self._leave_call(node, owner, "")

    async def aclose(self) -> None:
        """Give back every lease still held (shutdown)."""
        for lease in list(self._held.values()):
            await self.release(lease)
