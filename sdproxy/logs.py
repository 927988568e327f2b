"""Logging set-up: text or JSON lines, each stamped with the id of the request it belongs to."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, Literal

LogFormat = Literal["text", "json"]

# Set by the access middleware for the duration of one client request; read by log records
# and by the scheduler (which names the request on the dashboard).
request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s%(request_suffix)s"

# Attributes every LogRecord has; anything else came in through ``extra=``.
_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()
    | {"message", "asctime", "request_id", "request_suffix"}
)


class RequestIdFilter(logging.Filter):
    """Stamp every record with the current request id (``None`` outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = getattr(record, "request_id", None) or request_id_var.get()
        record.request_id = rid
        # Access lines carry the id in their own text; other lines get it appended.
        fields = getattr(record, "fields", None)
        has_own_id = isinstance(fields, dict) and "request_id" in fields
        record.request_suffix = f" [request_id={rid}]" if rid and not has_own_id else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id, structured fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", None)
        if rid:
            entry["request_id"] = rid
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and key != "fields" and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure_logging(level: str, log_format: LogFormat) -> None:
    """Send every log record to stderr, one line each, in ``log_format``."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # aiohttp's own access log is replaced by sdproxy.access; keep it quiet if enabled anyway.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def log_crash(task: asyncio.Task[Any]) -> None:
    """Done-callback for a one-off task: log an exception it ended with (once, with traceback)."""
    if task.cancelled():
        return
    error = task.exception()
    if error is not None:
        logging.getLogger("sdproxy").error("task %s crashed", task.get_name(), exc_info=error)


class RateLimitedLog:
    """At most one line per kind and interval; the lines held back are counted, not lost.

    The first line of a kind is logged at once. Until ``interval_s`` has passed, more of the
    same kind are only counted; the count is logged when the interval ends (``schedule`` runs
    ``flush`` then; without it, with the next line of that kind). Kinds are a small, fixed set
    (exception class names), never client input.
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = 10.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        schedule: Callable[[float, Callable[[], None]], object] | None = None,
    ) -> None:
        self.logger, self.interval_s = logger, interval_s
        self._clock, self._schedule = clock, schedule
        self._until: dict[str, float] = {}
        self._held: dict[str, tuple[int, int, str, dict[str, object]]] = {}

    def log(self, kind: str, level: int, text: str, fields: dict[str, object]) -> None:
        """Log ``text`` (with ``fields`` as structured extras) unless ``kind`` was just logged."""
        now = self._clock()
        if now < self._until.get(kind, -math.inf):
            count = self._held.get(kind, (0, level, text, fields))[0]
            if count == 0 and self._schedule is not None:
                self._schedule(self._until[kind] - now, self.flush)
            self._held[kind] = (count + 1, level, text, fields)
            return
        self._emit_held(kind)
        self._until[kind] = now + self.interval_s
        self.logger.log(level, "%s", text, extra={"fields": fields})

    def flush(self) -> None:
        """Log the counts of every kind whose interval has ended."""
        now = self._clock()
        for kind in [kind for kind, until in self._until.items() if now >= until]:
            self._emit_held(kind)

    def _emit_held(self, kind: str) -> None:
        count, level, text, fields = self._held.pop(kind, (0, logging.INFO, "", {}))
        if count:
            repeated = {**fields, "repeated": count, "interval_s": self.interval_s}
            line = f"{text} repeated={count} interval_s={self.interval_s:g}"
            self.logger.log(level, "%s", line, extra={"fields": repeated})
