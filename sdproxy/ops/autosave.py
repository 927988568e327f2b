"""Autosave: every image returned to a client written as PNG with its infotext, off the loop.

The original extension's "save remote generations". Files are named with the date, the seed
and the node that rendered the image, e.g. ``20261128-143005-seed1234-gpu-a.png``. A full disk
or an unwritable folder is logged once per kind of error and never fails a request.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdproxy.core import images
from sdproxy.logs import log_crash
from sdproxy.ops.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageToSave:
    """One returned image and what its file is named after."""

    image_b64: str
    infotext: str | None
    stem: str  # the file name without date and extension, e.g. ``seed1234-gpu-a``


def images_to_save(body: Any, shares: list[tuple[str, int, int]]) -> list[ImageToSave]:
    """Every image of a webui response, with its infotext, seed and node.

    Pure. ``shares`` maps rendered image indices (grid excluded) to nodes; an image no share
    covers (an unsplit script request) is named without a node.
    """
    if not isinstance(body, dict) or not isinstance(body.get("images"), list):
        return []
    try:
        info = json.loads(body.get("info") or "{}")
    except (TypeError, ValueError):
        info = {}
    if not isinstance(info, dict):
        info = {}
    infotexts = _list(info, "infotexts")
    seeds = _list(info, "all_seeds")
    first = info.get("index_of_first_image", 0)
    first = first if isinstance(first, int) and first >= 0 else 0
    result = []
    for index, image in enumerate(body["images"]):
        if not isinstance(image, str) or not image:
            continue
        infotext = infotexts[index] if index < len(infotexts) else None
        if not isinstance(infotext, str):
            infotext = None
        rendered = index - first  # position among rendered images; negative for the grid
        if rendered < 0:
            stem = f"grid-seed{info.get('seed', 'unknown')}"
        elif index >= len(infotexts):
            stem = f"extra{index - len(infotexts) + 1}"
        else:
            seed = seeds[rendered] if rendered < len(seeds) else info.get("seed", "unknown")
            node = next((n for n, lo, hi in shares if lo <= rendered <= hi), None)
            stem = f"seed{seed}" + (f"-{node}" if node else "")
        result.append(ImageToSave(image, infotext, stem))
    return result


def _list(info: dict[str, Any], key: str) -> list[Any]:
    value = info.get(key)
    return value if isinstance(value, list) else []


class Autosaver:
    """Writes returned images into one folder from worker threads; owned by the app."""

    def __init__(self, directory: Path, metrics: Metrics | None = None) -> None:
        self.directory = directory
        self._metrics = metrics
        self._tasks: set[asyncio.Task[None]] = set()
        self._reported: set[str] = set()  # error kinds already logged
        self._lock = threading.Lock()  # file names are chosen and created one at a time

    def submit(self, body: Any, shares: list[tuple[str, int, int]]) -> None:
        """Save the images of a response in the background; returns at once."""
        todo = images_to_save(body, shares)
        if not todo:
            return
        stamp = time.strftime("%Y%m%d-%H%M%S")
        task = asyncio.create_task(asyncio.to_thread(self._save_all, todo, stamp))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(log_crash)  # anything but a write error is a bug: logged

    async def aclose(self) -> None:
        """Wait for the saves still running."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)  # errors logged already

    def _save_all(self, todo: list[ImageToSave], stamp: str) -> None:
        for item in todo:
            try:
                self._save_one(item, stamp)
            except (OSError, images.BadImage) as exc:
                self._report(exc)
            else:
                if self._reported:
                    log.info("autosave to %s works again", self.directory)
                    self._reported.clear()

    def _save_one(self, item: ImageToSave, stamp: str) -> None:
        png = images.png_bytes(images.decode_b64_image(item.image_b64), item.infotext)
        with self._lock:
            self.directory.mkdir(parents=True, exist_ok=True)
            for attempt in range(1, 1000):
                suffix = "" if attempt == 1 else f"-{attempt}"
                path = self.directory / f"{stamp}-{item.stem}{suffix}.png"
                try:
                    fh = path.open("xb")  # never overwrite an earlier image
                except FileExistsError:
                    continue
                break
            else:
                raise FileExistsError(errno.EEXIST, "no free file name", str(path))
        try:
            with fh:
                fh.write(png)
        except OSError:
            path.unlink(missing_ok=True)  # no truncated PNG left behind on a full disk
            raise

    def _report(self, exc: Exception) -> None:
        if isinstance(exc, OSError):
            kind = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
            what = exc.strerror or str(exc)
        else:
            kind, what = "bad_image", str(exc)
        if self._metrics is not None:
            self._metrics.autosave_errors.labels(kind).inc()
        if kind in self._reported:
            return
        self._reported.add(kind)
        log.warning(
            "autosave: cannot write images to %s: %s (%s); requests are unaffected, "
            "further %s errors are not logged until a save succeeds",
            self.directory,
            what,
            kind,
            kind,
        )
