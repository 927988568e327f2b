"""The access log: one line per request with its id, route, status, images, shares, duration.

It replaces aiohttp's access log. It logs no headers, no query strings and no bodies, so no
credential or prompt ever reaches the log.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from sdproxy.logs import RateLimitedLog, request_id_var
from sdproxy.ops.metrics import Metrics

log = logging.getLogger("sdproxy.access")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

REQUEST_ID_HEADER = "X-Request-ID"
PROCESS_TIME_HEADER = "X-Process-Time"
# A client's id is kept when it is a short token that cannot break a log line or a header.
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/+=\-]{0,127}")
# Polled every few seconds by dashboards and Prometheus: logged at DEBUG unless they fail.
QUIET_ROUTES = frozenset({"/cluster/status", "/cluster", "/metrics"})
CLIENT_CLOSED = 499  # nginx's status for a client that went away before the answer


@dataclass
class Outcome:
    """What a handler reports about a generation, for the access line."""

    images: int
    shares: list[tuple[str, int, int]]  # (node, first image, last image)


outcome_key = web.RequestKey("outcome", Outcome)


def request_id_for(incoming: str | None) -> str:
    """The client's ``X-Request-ID`` when it is sane, else a new random id."""
    if incoming is not None and _SANE_REQUEST_ID.fullmatch(incoming):
        return incoming
    return uuid.uuid4().hex


def route_of(request: web.Request) -> str:
    """The matched route's template (bounded label set); ``unmatched`` for unknown paths."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def shares_text(shares: list[tuple[str, int, int]]) -> str:
    """``gpu-a=4,gpu-b=2``: how many images each node rendered."""
    counts: dict[str, int] = {}
    for node, first, last in shares:
        counts[node] = counts.get(node, 0) + last - first + 1
    return ",".join(f"{node}={count}" for node, count in counts.items())


def make_access_middleware(metrics: Metrics) -> Callable[..., Awaitable[web.StreamResponse]]:
    """The outermost middleware: request id in and out, one log line and metrics per request."""

    @web.middleware
    async def access_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        request_id = request_id_for(request.headers.get(REQUEST_ID_HEADER))
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # raised below 400 (redirects) by the error middleware
            status = exc.status
            exc.headers[REQUEST_ID_HEADER] = request_id
            raise
        except asyncio.CancelledError:
            status = CLIENT_CLOSED
            raise
        else:
            status = response.status
            if not response.prepared:
                response.headers[REQUEST_ID_HEADER] = request_id
                # The webui's api_middleware sends the seconds spent on every answer.
                response.headers[PROCESS_TIME_HEADER] = str(time.perf_counter() - started)
            return response
        finally:
            duration_s = time.perf_counter() - started
            route = route_of(request)
            metrics.observe_request(request.method, route, status, duration_s)
            _log_line(request, request_id, route, status, duration_s)
            request_id_var.reset(token)

    return access_middleware


def _log_line(
    request: web.Request, request_id: str, route: str, status: int, duration_s: float
) -> None:
    quiet = route in QUIET_ROUTES and status < 400
    level = logging.DEBUG if quiet else logging.INFO
    if not log.isEnabledFor(level):
        return
    outcome = request.get(outcome_key)
    fields: dict[str, object] = {
        "request_id": request_id,
        "method": request.method,
        "route": route,
        "status": status,
        "images": outcome.images if outcome else 0,
        "shares": shares_text(outcome.shares) if outcome else "",
        "duration_ms": round(duration_s * 1000, 1),
    }
    text = " ".join(f"{key}={value}" for key, value in fields.items() if value != "")
    log.log(level, "%s", text, extra={"fields": fields})


BAD_REQUEST_ROUTE = "bad-request"  # the route label of requests aiohttp could not parse


class BadRequestLog:
    """Requests whose head could not be parsed: an access line without headers, rate-limited.

    aiohttp would log each with a traceback and the offending header line, credentials and
    all; here a line names only the kind of error and the status, at most once per kind and
    interval, with a count of the others.
    """

    def __init__(
        self,
        metrics: Metrics | None,
        interval_s: float = 10.0,
        schedule: Callable[[float, Callable[[], None]], object] | None = None,
    ) -> None:
        self._metrics = metrics
        self._lines = RateLimitedLog(log, interval_s, schedule=schedule)

    def note(self, error: str, status: int) -> None:
        """One request refused with ``status`` because of ``error`` (an exception class name)."""
        if self._metrics is not None:
            self._metrics.observe_request("-", BAD_REQUEST_ROUTE, status, 0.0)
        fields: dict[str, object] = {
            "method": "-",
            "route": BAD_REQUEST_ROUTE,
            "status": status,
            "error": error,
        }
        text = " ".join(f"{key}={value}" for key, value in fields.items())
        self._lines.log(error, logging.INFO, text, fields)
