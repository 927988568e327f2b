"""Which checkpoints each node has and has loaded, the cluster's checkpoint, who may render what.

The union of the nodes' checkpoints is offered to clients, so a generation goes only to nodes
that have the checkpoint it runs on: the one its ``override_settings`` names, or the cluster's,
set through POST /options and remembered. A node that was down gets the cluster's checkpoint
when it comes back, and no work on it until then: a node is *in sync* once its lists were read
(and the checkpoint pushed) after its last failure.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sdproxy.config import ApiSettings
from sdproxy.core.inventory import find_checkpoint
from sdproxy.core.request import GenerationRequest
from sdproxy.errors import NodeError, NoNodeAvailable, NotFound, SdproxyError
from sdproxy.nodes.client import NodeClient
from sdproxy.nodes.fanout import call_each, note_failure

log = logging.getLogger(__name__)


@dataclass
class NodeModels:
    """What sdproxy last read of one node's checkpoints."""

    entries: list[dict[str, Any]] | None = None  # GET sd-models; None until read
    loaded: str | None = None  # title of its sd_model_checkpoint option: what it renders with
    synced_at: float | None = None  # Unix time the last complete sync started


class ModelCatalog:
    """The nodes' checkpoints and the cluster's own; the routing filter for generations."""

    def __init__(self, clients: Sequence[NodeClient], settings: ApiSettings) -> None:
        self.clients = list(clients)
        self.nodes = {client.name: NodeModels() for client in clients}
        self.checkpoint: str | None = None  # set through POST /options, pushed to returning nodes
        self._settings = settings
        self._syncs: dict[str, asyncio.Task[None]] = {}

    # --- what the nodes have ---------------------------------------------------------------

    def entry(self, client: NodeClient, name: str, *, closest: bool) -> Mapping[str, Any] | None:
        """The node's sd-models entry for ``name``, from the last read of its list."""
        entries = self.nodes[client.name].entries
        return find_checkpoint(name, entries, closest=closest) if entries else None

    def record_entries(self, client: NodeClient, entries: Any) -> None:
        """Keep a node's GET sd-models answer (also called when a client asks for the list)."""
        if isinstance(entries, list):
            self.nodes[client.name].entries = [e for e in entries if isinstance(e, dict)]

    def record_loaded(self, client: NodeClient, name: str | None) -> None:
        """The node now renders with ``name`` (any alias)."""
        found = self.entry(client, name, closest=False) if name else None
        self.nodes[client.name].loaded = found["title"] if found else name

    def in_sync(self, client: NodeClient) -> bool:
        """Lists read, and the cluster's checkpoint pushed, since the node was last down."""
        state = self.nodes[client.name]
        last_down_at = client.health.last_down_at or 0.0
        return state.synced_at is not None and state.synced_at >= last_down_at

    def on_cluster_checkpoint(self, client: NodeClient) -> bool:
        """In sync and running the cluster's checkpoint (if one was set): its options are right."""
        wanted = self.checkpoint
        loaded = wanted is None or self._has_loaded(client, wanted, closest=False)
        return loaded and self.in_sync(client)

    async def refresh(self, client: NodeClient) -> None:
        """Read the node's checkpoints and which one it has loaded."""
        timeout_s = self._settings.read_timeout_s
        models = await client.request("GET", "sdapi/v1/sd-models", timeout_s=timeout_s)
        options = await client.request("GET", "sdapi/v1/options", timeout_s=timeout_s)
        self.record_entries(client, models)
        loaded = options.get("sd_model_checkpoint") if isinstance(options, dict) else None
        self.record_loaded(client, loaded if isinstance(loaded, str) else None)

    async def refresh_all(self, clients: Sequence[NodeClient]) -> None:
        """Refresh several nodes at once; a node that fails is marked as failing, no more."""
        await call_each(clients, self.refresh)

    # --- keeping nodes on the cluster's checkpoint -----------------------------------------

    async def sync(self, client: NodeClient) -> None:
        """Refresh a node, then load the cluster's checkpoint on it if it has it."""
        started = time.time()
        try:
            await self.refresh(client)
            wanted = self.checkpoint
            found = self.entry(client, wanted, closest=False) if wanted else None
            if found is not None and self.nodes[client.name].loaded != found["title"]:
                log.info("loading checkpoint %s on returning node %s", found["title"], client.name)
                await client.request(
                    "POST",
                    "sdapi/v1/options",
                    {"sd_model_checkpoint": wanted},
                    timeout_s=self._settings.write_timeout_s,
                )
                self.nodes[client.name].loaded = found["title"]
        except NodeError as exc:
            note_failure(client, exc)
            log.warning("node %s: could not sync checkpoints: %s", client.name, exc.reason)
            return
        if self.checkpoint != wanted:
            return  # changed meanwhile: the next poll syncs the node again
        self.nodes[client.name].synced_at = started

    def node_became_healthy(self, client: NodeClient) -> None:
        """Hook for the health code: sync a node that is up again (no-op if one is running)."""
        if client.name in self._syncs:
            return
        task = asyncio.create_task(self.sync(client), name=f"sync-{client.name}")
        self._syncs[client.name] = task
        task.add_done_callback(lambda _: self._syncs.pop(client.name, None))

    def sync_stale(self, healthy: Sequence[NodeClient]) -> None:
        """Start a sync for every healthy node that is not in sync (after a poll)."""
        for client in healthy:
            if not self.in_sync(client):
                self.node_became_healthy(client)

    async def aclose(self) -> None:
        tasks = list(self._syncs.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # all cancelled on purpose

    # --- routing ---------------------------------------------------------------------------

    def wanted(self, request: GenerationRequest) -> tuple[str | None, bool]:
        """(checkpoint the request runs on, whether the request names it itself)."""
        overrides = request.body.get("override_settings")
        named = overrides.get("sd_model_checkpoint") if isinstance(overrides, dict) else None
        if isinstance(named, str) and named:
            return named, True
        return self.checkpoint, False

    async def prepare(self, request: GenerationRequest, healthy: Sequence[NodeClient]) -> None:
        """Read the lists that routing ``request`` needs and sdproxy lacks or may have stale."""
        name, explicit = self.wanted(request)
        if name is None:
            return
        unknown = [c for c in healthy if self.nodes[c.name].entries is None]
        if not any(self.entry(c, name, closest=explicit) for c in healthy):
            unknown = list(healthy)  # a checkpoint added since: webui lists change on refresh
        if unknown:
            await self.refresh_all(unknown)

    def select(self, request: GenerationRequest, healthy: Sequence[NodeClient]) -> list[NodeClient]:
        """The healthy nodes that may render ``request``; prefers those with it loaded."""
        name, explicit = self.wanted(request)
        if name is None:
            return list(healthy)
        having = [c for c in healthy if self.entry(c, name, closest=explicit)]
        loaded = [c for c in having if self._has_loaded(c, name, explicit)]
        # A named checkpoint loads per request; the cluster's must be in place before work.
        chosen = (loaded or having) if explicit else [c for c in loaded if self.in_sync(c)]
        if chosen:
            return chosen
        raise self._missing(name, having)

    def _has_loaded(self, client: NodeClient, name: str, closest: bool) -> bool:
        found = self.entry(client, name, closest=closest)
        return found is not None and found["title"] == self.nodes[client.name].loaded

    def _missing(self, name: str, having: Sequence[NodeClient]) -> SdproxyError:
        if having:
            names = ", ".join(c.name for c in having)
            return NoNodeAvailable(f"checkpoint {name!r} is still loading on {names}")
        down = [
            c.name
            for c in self.clients
            if not c.stats.healthy and self.entry(c, name, closest=True) is not None
        ]
        if down:
            names = ", ".join(down)
            return NoNodeAvailable(f"checkpoint {name!r} is only on nodes that are down: {names}")
        return NotFound(f"Model not found: no healthy node has checkpoint {name!r}")
