"""Pure: what the cluster can do, from what each node lists.

Lists that say what a request may use are the intersection over the nodes (a script, sampler or
upscaler only some nodes have would fail on the others); lists of things routing takes care of
(checkpoints, VAEs, LoRAs, embeddings) are the union. Also: checkpoint name matching as the webui
does it, and redaction of credentials in ``cmd-flags``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

REDACTED = "<redacted>"

# cmd-flags whose values are credentials: api_auth, gradio_auth, *_password, hf_token, ...
_SECRET_NAME = re.compile(r"auth|password|passwd|secret|token|key", re.IGNORECASE)
# The " [0123abcd]" hash suffix of a checkpoint title (sd_models.re_strip_checksum).
_CHECKSUM = re.compile(r"\s*\[[0-9a-fA-F]{8,64}\]\s*$")
_MODELS_DIR = "/models/Stable-diffusion/"


def intersect_named(lists: Sequence[Sequence[Any]], key: str = "name") -> list[Any]:
    """Entries of the first list whose ``key`` every other list has too, in the first's order."""
    if not lists:
        return []
    others = [{_key(entry, key) for entry in entries} for entries in lists[1:]]
    return [entry for entry in lists[0] if all(_key(entry, key) in names for names in others)]


def union_named(lists: Sequence[Sequence[Any]], key: str = "name") -> list[Any]:
    """Every entry of every list once by ``key``, in first-seen order: the first node's wins."""
    seen: set[Any] = set()
    merged: list[Any] = []
    for entries in lists:
        for entry in entries:
            name = _key(entry, key)
            if name not in seen:
                seen.add(name)
                merged.append(entry)
    return merged


def _key(entry: Any, key: str) -> Any:
    """An entry's identity: its ``key`` field, or the entry itself (a script title)."""
    if isinstance(entry, dict):
        value = entry.get(key)
        return (
            value if isinstance(value, str | int | float | bool) or value is None else repr(value)
        )
    return entry if isinstance(entry, str | int | float | bool) else repr(entry)


def merge_scripts(answers: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """GET /scripts: per mode, the scripts every node has (clients inject what is listed)."""
    modes: list[str] = []
    for answer in answers:
        modes.extend(mode for mode in answer if mode not in modes)
    merged: dict[str, list[Any]] = {}
    for mode in modes:
        lists = [_as_list(answer.get(mode)) for answer in answers]
        merged[mode] = intersect_named(lists)
    return merged


def merge_embeddings(answers: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """GET /embeddings: loaded anywhere is loaded (first node's entry); skipped only if nowhere."""
    loaded: dict[str, Any] = {}
    skipped: dict[str, Any] = {}
    for answer in answers:
        for name, entry in _as_dict(answer.get("loaded")).items():
            loaded.setdefault(name, entry)
        for name, entry in _as_dict(answer.get("skipped")).items():
            skipped.setdefault(name, entry)
    return {"loaded": loaded, "skipped": {k: v for k, v in skipped.items() if k not in loaded}}


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def redact_flags(flags: Mapping[str, Any]) -> dict[str, Any]:
    """cmd-flags with every credential's value replaced; unset ones (null, "") stay as they are.

    Booleans and numbers are settings, not credentials (``--api-server-stop``, a port).
    """
    return {
        name: REDACTED if _SECRET_NAME.search(name) and _holds_secret(value) else value
        for name, value in flags.items()
    }


def _holds_secret(value: Any) -> bool:
    if isinstance(value, bool | int | float) or value is None:
        return False
    return bool(value)


def checkpoint_aliases(entry: Mapping[str, Any]) -> set[str]:
    """The names the webui knows a GET /sd-models entry by (sd_models.checkpoint_aliases)."""
    aliases: set[str] = set()
    for field in ("title", "model_name", "hash", "sha256"):
        value = entry.get(field)
        if isinstance(value, str) and value:
            aliases.add(value)
    filename = entry.get("filename")
    if isinstance(filename, str) and filename:
        normalized = filename.replace("\\", "/")
        relative = normalized.split(_MODELS_DIR, 1)[1] if _MODELS_DIR in normalized else ""
        for name in {relative, normalized.rsplit("/", 1)[-1]} - {""}:
            aliases.add(name)
            if isinstance(entry.get("hash"), str):
                aliases.add(f"{name} [{entry['hash']}]")
    model_name, short = entry.get("model_name"), entry.get("hash")
    if isinstance(model_name, str) and isinstance(short, str):
        aliases.add(f"{model_name} [{short}]")
    return aliases


def find_checkpoint(
    name: str, entries: Sequence[Mapping[str, Any]], *, closest: bool
) -> Mapping[str, Any] | None:
    """The sd-models entry ``name`` means, or None.

    Exact aliases only for POST /options (the webui refuses anything else there); with
    ``closest``, the webui's get_closet_checkpoint_match for override_settings: a title that
    contains the name, the shortest such title first, then the same without the hash suffix.
    """
    if not name:
        return None
    for entry in entries:
        if name in checkpoint_aliases(entry):
            return entry
    if not closest:
        return None
    for needle in (name, _CHECKSUM.sub("", name)):
        found = [e for e in entries if isinstance(e.get("title"), str) and needle in e["title"]]
        if needle and found:
            return min(found, key=lambda e: len(e["title"]))
    return None
