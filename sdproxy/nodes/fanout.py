"""Calls to several nodes at once (every outcome kept), and to the first node that answers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from sdproxy.errors import (
    NodeBadResponse,
    NodeError,
    NodeRaised,
    NodeRejected,
    NodesFailed,
    NodeTimeout,
    NodeUnreachable,
    NoNodeAvailable,
    SdproxyError,
)
from sdproxy.nodes.client import NodeClient

NodeCall = Callable[[NodeClient], Awaitable[Any]]
# Told of every failed call; whoever keeps node health decides what it means (is_node_failure).
FailureSink = Callable[[NodeError], None]


def is_node_failure(error: NodeError) -> bool:
    """Whether a failed call is the node's fault (not a refusal or a webui error body).

    A status or body that is not the webui's own (a 3xx, 429, 413, an HTML page), an answer too
    large, or one that is not JSON is the node's: errors.py says whose fault each is.
    """
    return isinstance(error, NodeUnreachable | NodeTimeout) or (
        isinstance(error, NodeBadResponse) and error.answered is None
    )


async def call_each(
    clients: Sequence[NodeClient], call: NodeCall, on_failure: FailureSink
) -> tuple[dict[str, Any], dict[str, NodeError]]:
    """``call`` on every client concurrently: (answers, errors) by node name, both kept."""
    answers: dict[str, Any] = {}
    errors: dict[str, NodeError] = {}

    async def one(client: NodeClient) -> None:
        try:
            answers[client.name] = await call(client)
        except NodeError as exc:
            on_failure(exc)
            errors[client.name] = exc

    async with asyncio.TaskGroup() as group:
        for client in clients:
            group.create_task(one(client))
    return answers, errors


def combined_error(what: str, errors: dict[str, NodeError], answered: int) -> SdproxyError:
    """The error for a fan-out that failed on ``errors``' nodes while ``answered`` succeeded.

    When every node refused or failed the same way, the node's own answer is the webui's answer
    (a 422, or a 500 KeyError for an unknown option): it is passed on. Otherwise a 502 names
    the nodes and why each failed.
    """
    first = next(iter(errors.values()))
    same = all(_same_answer(first, error) for error in errors.values())
    if answered == 0 and same and _own_answer(first) is not None:
        return first
    names = ", ".join(sorted(errors))
    return NodesFailed(
        f"{what} failed on {names}", failures={name: e.reason for name, e in errors.items()}
    )


def _own_answer(error: NodeError) -> Any:
    if isinstance(error, NodeRejected):
        return error.node_body
    if isinstance(error, NodeBadResponse):
        return error.answer
    return None


def _same_answer(a: NodeError, b: NodeError) -> bool:
    return type(a) is type(b) and _own_answer(a) == _own_answer(b) and a.status == b.status


async def first_answer(
    clients: Sequence[NodeClient], call: NodeCall, on_failure: FailureSink
) -> Any:
    """``call`` on each client in turn until one answers.

    The webui's own error answer (a webui-shaped 4xx, or a 500 with its exception body) is the
    answer too: every node would say the same. Any other failure (node trouble: unreachable,
    a 3xx, 429, an HTML 404, a body too large) goes to ``on_failure`` and the next node is
    tried; when none is left, a 502 names each node and why.
    """
    if not clients:
        raise NoNodeAvailable("no healthy node: every node is down or unreachable")
    errors: dict[str, NodeError] = {}
    for client in clients:
        try:
            return await call(client)
        except (NodeRejected, NodeRaised):
            raise
        except NodeError as exc:
            on_failure(exc)
            errors[client.name] = exc
    raise combined_error("the call", errors, answered=0)
