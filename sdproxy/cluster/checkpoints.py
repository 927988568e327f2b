"""Checkpoint routing: which checkpoints each node has and has loaded, and who may render what.

The union of the nodes' checkpoints is offered to clients, so a generation goes only to nodes
that have the checkpoint it runs on: the one its ``override_settings`` names, or the cluster's,
set through POST /options and kept in the cluster state. A node that was down gets the
cluster's checkpoint when it comes back, and no work on it until then: a node is *in sync* once
its lists were read (and the checkpoint pushed) after its last failure.

A checkpoint no node has: a webui renders such a request with the checkpoint it has loaded, and
so does sdproxy, on the nodes the cluster's checkpoint routes to, saying so in the routing's
``fallback`` (the handler puts it in a response header); ``[api] strict_checkpoints`` answers
404 instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sdproxy.cluster.state import ClusterState
from sdproxy.config import ApiSettings
from sdproxy.core.inventory import find_checkpoint
from sdproxy.core.request import GenerationRequest
from sdproxy.errors import NodeError, NoNodeAvailable, NotFound, SdproxyError, UnknownCheckpoint
from sdproxy.nodes.client import NodeClient
from sdproxy.nodes.fanout import FailureSink, call_each, combined_error

log = logging.getLogger(__name__)


@dataclass
class NodeModels:
    """What sdproxy last read of one node's checkpoints."""

    entries: list[dict[str, Any]] | None = None  # GET sd-models; None until read
    loaded: str | None = None  # title of its sd_model_checkpoint option: what it renders with
    synced_at: float | None = None  # Unix time the last complete sync started


@dataclass(frozen=True)
class Routing:
    """The usable nodes that may render a request, or why none may."""

    nodes: list[str] = field(default_factory=list)
    problem: SdproxyError | None = None  # set when ``nodes`` is empty because of routing
    fallback: str | None = None  # a named checkpoint no node has: rendered on the loaded one


class CheckpointRouter:
    """The nodes' checkpoints and the routing filter for generations."""

    def __init__(
        self,
        clients: Mapping[str, NodeClient],
        state: ClusterState,
        settings: ApiSettings,
        on_failure: FailureSink,
        wall: Callable[[], float],
    ) -> None:
        self._clients = clients
        self._state = state
        self._settings = settings
        self._on_failure = on_failure
        self._wall = wall
        self.nodes = {name: NodeModels() for name in clients}

    # --- what the nodes have ---------------------------------------------------------------

    def entry(self, node: str, name: str, *, closest: bool) -> Mapping[str, Any] | None:
        """The node's sd-models entry for ``name``, from the last read of its list."""
        entries = self.nodes[node].entries
        return find_checkpoint(name, entries, closest=closest) if entries else None

    def record_entries(self, node: str, entries: Any) -> None:
        """Keep a node's GET sd-models answer (also called when a client asks for the list)."""
        if isinstance(entries, list):
            self.nodes[node].entries = [e for e in entries if isinstance(e, dict)]

    def record_loaded(self, node: str, name: str | None) -> None:
        """The node now renders with ``name`` (any alias)."""
        found = self.entry(node, name, closest=False) if name else None
        self.nodes[node].loaded = found["title"] if found else name

    def in_sync(self, node: str) -> bool:
        """Lists read, and the cluster's checkpoint pushed, since the node was last down."""
        synced_at = self.nodes[node].synced_at
        last_down_at = self._state.health(node).last_down_at or 0.0
        return synced_at is not None and synced_at >= last_down_at

    def on_cluster_checkpoint(self, node: str) -> bool:
        """In sync and running the cluster's checkpoint (if one was set): its options are right."""
        wanted = self._state.checkpoint
        loaded = wanted is None or self._has_loaded(node, wanted, closest=False)
        return loaded and self.in_sync(node)

    async def refresh(self, client: NodeClient) -> None:
        """Read the node's checkpoints and which one it has loaded."""
        timeout_s = self._settings.read_timeout_s
        models = await client.request("GET", "sdapi/v1/sd-models", timeout_s=timeout_s)
        options = await client.request("GET", "sdapi/v1/options", timeout_s=timeout_s)
        self.record_entries(client.name, models)
        loaded = options.get("sd_model_checkpoint") if isinstance(options, dict) else None
        self.record_loaded(client.name, loaded if isinstance(loaded, str) else None)

    async def refresh_all(self, nodes: Sequence[str]) -> None:
        """Refresh several nodes at once; a node that fails is reported, no more."""
        await call_each([self._clients[n] for n in nodes], self.refresh, self._on_failure)

    # --- keeping nodes on the cluster's checkpoint -----------------------------------------

    async def sync(self, node: str) -> None:
        """Refresh a node, then load the cluster's checkpoint on it if it has it."""
        client, started = self._clients[node], self._wall()
        try:
            await self.refresh(client)
            wanted = self._state.checkpoint
            found = self.entry(node, wanted, closest=False) if wanted else None
            if found is not None and self.nodes[node].loaded != found["title"]:
                log.info("loading checkpoint %s on returning node %s", found["title"], node)
                await client.request(
                    "POST",
                    "sdapi/v1/options",
                    {"sd_model_checkpoint": wanted},
                    timeout_s=self._settings.write_timeout_s,
                )
                self.nodes[node].loaded = found["title"]
        except NodeError as exc:
            self._on_failure(exc)
            log.warning("node %s: could not sync checkpoints: %s", node, exc.reason)
            return
        if self._state.checkpoint != wanted:
            return  # changed meanwhile: the next poll syncs the node again
        self.nodes[node].synced_at = started

    async def apply_options(self, body: dict[str, Any], usable: Sequence[str]) -> None:
        """POST /options to every usable node; a checkpoint in it becomes the cluster's.

        Nodes without the checkpoint get the other options (routing keeps its work off them).
        Raises UnknownCheckpoint when no usable node has it, NodesFailed/the node's own error
        when some node fails.
        """
        name = body.get("sd_model_checkpoint")
        having: list[str] = []
        bodies = dict.fromkeys(usable, body)
        if name is not None:
            if isinstance(name, str):
                await self.refresh_all([n for n in usable if self.nodes[n].entries is None])
                having = [n for n in usable if self.entry(n, name, closest=False)]
                if not having:  # a checkpoint added since the lists were read
                    await self.refresh_all(usable)
                    having = [n for n in usable if self.entry(n, name, closest=False)]
            if not having:
                raise UnknownCheckpoint(f"model {name!r} not found")
            rest = {key: value for key, value in body.items() if key != "sd_model_checkpoint"}
            bodies = {n: body if n in having else rest for n in usable}
        targets = [self._clients[n] for n in usable if bodies[n]]
        timeout_s = self._settings.write_timeout_s
        answers, errors = await call_each(
            targets,
            lambda c: c.request("POST", "sdapi/v1/options", bodies[c.name], timeout_s=timeout_s),
            self._on_failure,
        )
        if isinstance(name, str) and any(n in answers for n in having):
            for node in having:
                if node in answers:
                    self.record_loaded(node, name)
            self._state.set_checkpoint(name)
        if errors:
            raise combined_error("POST options", errors, answered=len(answers))

    # --- routing ---------------------------------------------------------------------------

    def wanted(self, request: GenerationRequest) -> tuple[str | None, bool]:
        """(checkpoint the request runs on, whether the request names it itself)."""
        overrides = request.body.get("override_settings")
        named = overrides.get("sd_model_checkpoint") if isinstance(overrides, dict) else None
        if isinstance(named, str) and named:
            return named, True
        return self._state.checkpoint, False

    async def prepare(self, request: GenerationRequest, usable: Sequence[str]) -> None:
        """Read the lists that routing ``request`` needs and sdproxy lacks or may have stale."""
        name, explicit = self.wanted(request)
        if name is None:
            return
        unknown = [n for n in usable if self.nodes[n].entries is None]
        if not any(self.entry(n, name, closest=explicit) for n in usable):
            unknown = list(usable)  # a checkpoint added since: webui lists change on refresh
        if unknown:
            await self.refresh_all(unknown)

    def select(self, request: GenerationRequest, usable: Sequence[str]) -> Routing:
        """The usable nodes that may render ``request``; those with it loaded first."""
        name, explicit = self.wanted(request)
        routing = self._select(name, explicit, usable)
        if routing.nodes or not explicit or self._settings.strict_checkpoints:
            return routing
        if isinstance(routing.problem, NotFound):  # on no node at all, down ones included
            fallback = self._select(self._state.checkpoint, False, usable)
            return Routing(fallback.nodes, fallback.problem, fallback=name)
        return routing

    def _select(self, name: str | None, explicit: bool, usable: Sequence[str]) -> Routing:
        if name is None:
            return Routing(list(usable))
        having = [n for n in usable if self.entry(n, name, closest=explicit)]
        loaded = [n for n in having if self._has_loaded(n, name, explicit)]
        # A named checkpoint loads per request; the cluster's must be in place before work.
        chosen = (loaded or having) if explicit else [n for n in loaded if self.in_sync(n)]
        if chosen:
            return Routing(chosen)
        return Routing(problem=self._missing(name, having))

    def _has_loaded(self, node: str, name: str, closest: bool) -> bool:
        found = self.entry(node, name, closest=closest)
        return found is not None and found["title"] == self.nodes[node].loaded

    def _missing(self, name: str, having: Sequence[str]) -> SdproxyError:
        if having:
            return NoNodeAvailable(f"checkpoint {name!r} is still loading on {', '.join(having)}")
        down = [
            n
            for n in self.nodes
            if not self._state.usable(n) and self.entry(n, name, closest=True) is not None
        ]
        if down:
            names = ", ".join(down)
            return NoNodeAvailable(f"checkpoint {name!r} is only on nodes that are down: {names}")
        return NotFound(f"Model not found: no healthy node has checkpoint {name!r}")
