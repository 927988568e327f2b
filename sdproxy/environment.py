"""Where settings come from: the SDPROXY_* variables as settings data, and which variable (or
else the file) set a key, to name the real source of a bad value in one line.

``SDPROXY_<SECTION>__<KEY>`` sets one key (a list key also takes ``a,b,c``), ``SDPROXY_<SECTION>``
a whole section as a JSON object, ``SDPROXY_NODES`` the node list as JSON. Other ``SDPROXY_*``
names without ``__`` (``SDPROXY_CONFIG``, read by the healthcheck) are not settings. A value that
cannot be read is a ConfigError naming the variable, never its value (it may be a secret).
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from sdproxy.errors import ConfigError

PREFIX = "SDPROXY_"
NODES_VARIABLE = "SDPROXY_NODES"
DUPLICATE_NAME = "duplicate_node_name"  # the error type of Settings' unique-name check
_NODES_EXAMPLE = '[{"name": "gpu-a", "url": "http://10.0.0.5:7861"}]'


@dataclass(frozen=True)
class Environment:
    """Settings data from the environment, and the variable behind each key it sets."""

    data: dict[str, Any] = field(default_factory=dict)
    origins: dict[tuple[str, ...], str] = field(default_factory=dict)

    def origin_of(self, loc: tuple[str | int, ...]) -> str | None:
        """The variable that set the value at ``loc`` (a pydantic error location), if any."""
        path = tuple(str(part) for part in loc)
        for length in range(len(path), 0, -1):
            origin = self.origins.get(path[:length])
            if origin is not None:
                return origin
        return None


def read_environment(
    environ: Mapping[str, str], sections: Mapping[str, type[BaseModel]]
) -> Environment:
    """Read every ``SDPROXY_*`` setting of ``environ``; ConfigError for one that is wrong.

    Names are matched without regard to case, as pydantic-settings does. A section given
    whole (``SDPROXY_SERVER='{...}'``) is applied first, its single keys over it.
    """
    data: dict[str, Any] = {}
    origins: dict[tuple[str, ...], str] = {}
    keys: list[tuple[str, str, str, str]] = []  # (variable, section, key, value)
    for variable in sorted(environ):
        if not variable.upper().startswith(PREFIX):
            continue
        name, value = variable[len(PREFIX) :].lower(), environ[variable]
        section, nested, key = name.partition("__")
        if not nested:
            if name == "nodes":
                data["nodes"] = _json(
                    variable, value, f"a JSON list of nodes, e.g. {_NODES_EXAMPLE}"
                )
                origins[("nodes",)] = variable
            elif name in sections:
                whole = _json(variable, value, 'a JSON object, e.g. {"port": 8080}')
                if not isinstance(whole, dict):
                    raise ConfigError(f"{variable}: give a JSON object of [{name}] keys")
                data[name] = whole
                origins[(name,)] = variable
            continue  # not a setting (SDPROXY_CONFIG, ...)
        if section not in sections:
            known = ", ".join(sections)
            raise ConfigError(f"{variable}: unknown section {section!r} (sections: {known})")
        if key not in sections[section].model_fields:
            raise ConfigError(f"{variable}: {section}.{key}: unknown key")
        keys.append((variable, section, key, value))
    for variable, section, key, value in keys:
        model = sections[section]
        parsed = _list(variable, value) if _is_list(model, key) else value
        data.setdefault(section, {})[key] = parsed
        origins[(section, key)] = variable
    return Environment(data, origins)


def _json(variable: str, value: str, what: str) -> Any:
    try:
        return json.loads(value)
    except ValueError as exc:
        reason = (
            f"{exc.msg} at character {exc.pos}" if isinstance(exc, json.JSONDecodeError) else exc
        )
        raise ConfigError(f"{variable}: not valid JSON ({reason}); give {what}") from None


def _list(variable: str, value: str) -> Any:
    """A list value: JSON (``["a", "b"]``) or comma-separated (``a,b``; ``""`` is empty)."""
    if value.lstrip().startswith("["):
        return _json(variable, value, 'a JSON list, e.g. ["a", "b"], or a comma list: a,b')
    return [item.strip() for item in value.split(",") if item.strip()]


def _is_list(model: type[BaseModel], key: str) -> bool:
    """Whether the key holds a list or tuple (possibly optional)."""
    annotation = model.model_fields[key].annotation
    candidates = [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        candidates = list(typing.get_args(annotation))
    return any(typing.get_origin(c) in (list, tuple) or c in (list, tuple) for c in candidates)


def describe_validation_error(
    exc: ValidationError,
    data: dict[str, Any],
    environment: Environment | None = None,
    path: Path | None = None,
) -> str:
    """The first problem of ``exc`` in one line: where it came from (the variable that set
    it, else the file, else "environment"), its key, and what is wrong."""
    first = exc.errors(include_url=False)[0]
    loc = tuple(first["loc"])
    ctx = first.get("ctx") or {}
    if first["type"] == DUPLICATE_NAME:
        loc = ("nodes", int(ctx["index"]), "name")
    variable = environment.origin_of(loc) if environment is not None else None
    where = variable or (str(path) if path is not None else "environment")
    # Name a node by the list the value came from: SDPROXY_NODES replaces the file's.
    source = environment.data if environment and variable == NODES_VARIABLE else data
    nodes = source.get("nodes")
    parts: list[str] = []
    for part in loc:
        if isinstance(part, int) and parts == ["nodes"] and isinstance(nodes, list):
            entry = nodes[part] if part < len(nodes) else None
            name = entry.get("name") if isinstance(entry, dict) else None
            parts[-1] = f"nodes[{part}]" + (f" ({name})" if isinstance(name, str) else "")
        else:
            parts.append(str(part))
    key = ".".join(parts) or "(top level)"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    elif first["type"] == "model_type":
        message = "expected a table of keys" if variable is None else "expected a JSON object"
    elif first["type"] == "missing":
        message = "required key missing"
        if loc == ("nodes",) and path is None:
            message += f" (give --config, or {NODES_VARIABLE} as a JSON list of nodes)"
    return f"{where}: {key}: {message}"
