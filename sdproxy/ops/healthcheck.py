"""``python -m sdproxy.ops.healthcheck``: the container HEALTHCHECK, stdlib only, no curl needed.

Exits 0 when sdproxy answers ``GET /cluster/status`` on this machine, 1 otherwise. The port is
the one sdproxy listens on: ``SDPROXY_SERVER__PORT``, else ``[server] port`` of the config file
(``SDPROXY_CONFIG``, default ``/etc/sdproxy/config.toml``), else 7860.
"""

from __future__ import annotations

import os
import sys
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_CONFIG = "/etc/sdproxy/config.toml"
DEFAULT_PORT = 7860
# /cluster/status may sit behind auth: an answer that asks for credentials still proves the
# server is up and serving.
ALIVE_STATUSES = frozenset({200, 401, 403})


def configured_port(environ: dict[str, str] | None = None) -> int:
    """The port sdproxy listens on, as the server itself would resolve it."""
    env = os.environ if environ is None else environ
    if env.get("SDPROXY_SERVER__PORT", "").strip().isdigit():
        return int(env["SDPROXY_SERVER__PORT"])
    try:
        # Only the port is needed: the server validated the whole file when it started.
        with Path(env.get("SDPROXY_CONFIG", DEFAULT_CONFIG)).open("rb") as fh:
            port = tomllib.load(fh).get("server", {}).get("port", DEFAULT_PORT)
    except (OSError, tomllib.TOMLDecodeError, AttributeError):
        return DEFAULT_PORT
    return port if isinstance(port, int) and port > 0 else DEFAULT_PORT


def check(url: str, timeout_s: float = 4.0) -> tuple[bool, str]:
    """(alive, what happened) for one GET of ``url``."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            status = int(resp.status)
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (OSError, ValueError) as exc:
        return False, f"{url}: {exc}"
    return status in ALIVE_STATUSES, f"{url}: HTTP {status}"


def main() -> int:
    url = f"http://127.0.0.1:{configured_port()}/cluster/status"
    alive, what = check(url)
    print(what, file=sys.stdout if alive else sys.stderr)
    return 0 if alive else 1


if __name__ == "__main__":
    sys.exit(main())
