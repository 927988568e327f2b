"""Pure: the path an extension route forwards to a node, checked segment by segment.

aiohttp decodes ``request.path`` (``%2e%2e`` becomes ``..``, ``%2f`` a slash) and yarl resolves
dot segments when a path is joined onto a URL, so ``/controlnet/%2e%2e/sdapi/v1/cmd-flags`` would
reach the node's ``/sdapi/v1/cmd-flags``. The forwarded path is therefore read from the raw path,
and refused (None) when any segment is a dot segment or holds a slash, a backslash or a control
character once decoded, raw or percent-encoded; the result is joined the way NodeClient joins it
and must come out unchanged, so nothing can leave the prefix.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

from yarl import URL

_ESCAPES = re.compile(r"(?:[^%]|%[0-9A-Fa-f]{2})*")
_PROBE = URL("http://node.invalid/base")  # any base: what yarl does to a joined path


def extension_path(raw_path: str, prefix: str) -> str | None:
    """``prefix/...`` decoded, to join onto a node's URL; None if it must not be forwarded."""
    path = raw_path.partition("?")[0].partition("#")[0]
    if not path.startswith("/"):
        return None
    segments = path[1:].split("/")
    decoded: list[str] = []
    for index, raw in enumerate(segments):
        if not _ESCAPES.fullmatch(raw):
            return None  # a lone "%": not a percent-encoding
        try:
            text = unquote(raw, errors="strict")
        except UnicodeDecodeError:
            return None
        if text in (".", "..") or "/" in text or "\\" in text:
            return None
        if any(ord(char) < 0x20 or ord(char) == 0x7F for char in text):
            return None
        if not text and index != len(segments) - 1:
            return None  # "//": an empty segment, which some servers collapse
        decoded.append(text)
    if len(decoded) < 2 or decoded[0] != prefix:
        return None
    forwarded = "/".join(decoded)
    if (_PROBE / forwarded).path != f"{_PROBE.path}/{forwarded}":
        return None  # yarl would read it as something else: never forward that
    return forwarded
