"""State of one simulated webui node: settings, faults, progress, loaded checkpoint."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import random
import time
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from sdproxy.fakewebui.catalog import (
    DEFAULT_SAMPLERS,
    DEFAULT_SCRIPTS_IMG2IMG,
    DEFAULT_SCRIPTS_TXT2IMG,
    Checkpoint,
    default_options,
    parse_checkpoint,
)

FaultMode = Literal[
    "none",
    # it fails: a webui 500, no answer, a reset, half a body, the process dies, slowness
    "error500",
    "hang",
    "reset",
    "truncated",
    "exit",
    "slow",
    # it renders, then lies (faults.py)
    "wrong_seeds",
    "duplicate_seeds",
    "extra_image",
    "bad_base64",
    "not_image",
    "deep_info",
    # something in the way answers instead of the webui
    "redirect",
    "huge_body",
    "huge_stream",
    "html404",
    "error429",
    "error413",
]


@dataclass
class Fault:
    """A failure the node should simulate on its next generation requests."""

    mode: FaultMode = "none"
    after_s: float = 0.0  # seconds into the generation before the fault strikes
    times: int | None = None  # how many generation requests it applies to (None = all)
    slow_factor: float = 10.0  # for "slow": generation takes this many times longer
    redirect_url: str = "http://127.0.0.1:9"  # for "redirect": 307 to this base URL + the path
    huge_mb: float = 2048.0  # for "huge_body" (announced) and "huge_stream" (chunked)


@dataclass
class FakeNodeSettings:
    """What a fake node is: its speed, models, scripts, credentials and simulated fault."""

    name: str = "fake"
    per_image_s: float = 0.0  # seconds per image at 20 steps, 512x512
    overhead_s: float = 0.0  # fixed seconds per generation request
    models: tuple[str, ...] = ("v1-5-pruned-emaonly.safetensors [6ce0161689]",)
    api_auth: str | None = None  # "user:pass,user2:pass2" like --api-auth
    version: str = "v1.10.1"
    scripts_txt2img: tuple[str, ...] = DEFAULT_SCRIPTS_TXT2IMG
    scripts_img2img: tuple[str, ...] = DEFAULT_SCRIPTS_IMG2IMG
    samplers: tuple[str, ...] = DEFAULT_SAMPLERS
    fault: Fault = field(default_factory=Fault)
    model_load_s: float = 0.0  # seconds a checkpoint change takes
    loras: tuple[str, ...] = ()
    embeddings: tuple[str, ...] = ()
    vaes: tuple[str, ...] = ()
    gradio_auth: str | None = None  # shows up in cmd-flags only, like --gradio-auth
    realistic_images: bool = False  # PNGs as large as a webui's: seeded grain PNG can't shrink


@dataclass
class ProgressState:
    """shared.state: what GET /progress reports, stale fields included."""

    skipped: bool = False
    interrupted: bool = False
    stopping_generation: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    time_start: float = 0.0
    preview: str | None = None

    def begin(self, job: str) -> None:
        self.sampling_step = 0
        self.time_start = time.time()
        self.job_count = -1
        self.job_no = 0
        self.job_timestamp = datetime.now().strftime("%Y%m%d%H%M%S")
        self.preview = None
        self.skipped = self.interrupted = self.stopping_generation = False
        self.job = job

    def nextjob(self) -> None:
        self.job_no += 1
        self.sampling_step = 0

    def end(self) -> None:
        # Like the webui, only these two are reset; the rest stays stale while idle.
        self.job = ""
        self.job_count = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "skipped": self.skipped,
            "interrupted": self.interrupted,
            "stopping_generation": self.stopping_generation,
            "job": self.job,
            "job_count": self.job_count,
            "job_timestamp": self.job_timestamp,
            "job_no": self.job_no,
            "sampling_step": self.sampling_step,
            "sampling_steps": self.sampling_steps,
        }

    def progress(self, *, skip_current_image: bool) -> dict[str, Any]:
        """Api.progressapi."""
        if self.job_count == 0:
            return {
                "progress": 0.0,
                "eta_relative": 0.0,
                "state": self.as_dict(),
                "current_image": None,
                "textinfo": None,
            }
        progress = 0.01
        if self.job_count > 0:
            progress += self.job_no / self.job_count
        if self.sampling_steps > 0:
            progress += 1 / self.job_count * self.sampling_step / self.sampling_steps
        elapsed = time.time() - self.time_start
        return {
            "progress": min(progress, 1.0),
            "eta_relative": elapsed / progress - elapsed if progress else 0.0,
            "state": self.as_dict(),
            "current_image": None if skip_current_image else self.preview,
            "textinfo": None,
        }


@functools.lru_cache(maxsize=64)
def _checkpoints(models: tuple[str, ...]) -> tuple[Checkpoint, ...]:
    return tuple(parse_checkpoint(title) for title in models)


class FakeNode:
    """Mutable state of one simulated node (tests may change settings/fault between requests)."""

    def __init__(self, settings: FakeNodeSettings) -> None:
        self.settings = settings
        self.generations = 0  # generation requests completed
        self.images_rendered = 0
        self.state = ProgressState()
        self.queue_lock = asyncio.Lock()  # the webui's queue_lock: one job at a time
        self.rng = random.Random()
        self.requests: Counter[str] = Counter()  # "POST /sdapi/v1/skip": calls received
        self.last_headers: dict[str, dict[str, str]] = {}  # the same key: the last call's headers
        first = self.checkpoints()[0]
        self.options: dict[str, Any] = default_options(first, settings.version)
        self.loaded_title = first.title
        self._jobs: set[asyncio.Task[bytes | None]] = set()
        # Test-only: generation jobs the node held at once (running or waiting on its queue
        # lock). sdproxy sends a node one job at a time, across replicas too: never above 1.
        self.active_jobs = 0
        self.max_concurrent_jobs = 0

    @property
    def fault(self) -> Fault:
        return self.settings.fault

    @fault.setter
    def fault(self, value: Fault) -> None:
        self.settings.fault = value

    def checkpoints(self) -> tuple[Checkpoint, ...]:
        return _checkpoints(tuple(self.settings.models))

    def take_fault(self) -> Fault:
        """The fault for one generation request, counting it against ``times``."""
        fault = self.settings.fault
        if fault.mode == "none" or (fault.times is not None and fault.times <= 0):
            return Fault()
        if fault.times is not None:
            fault.times -= 1
        return dataclasses.replace(fault, times=None)

    async def load_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Simulated weight loading; the caller holds the queue lock."""
        if checkpoint.title != self.loaded_title:
            await asyncio.sleep(self.settings.model_load_s)
            self.loaded_title = checkpoint.title

    def spawn(self, job: Awaitable[bytes | None]) -> asyncio.Task[bytes | None]:
        """Run a job that outlives its client, as the webui's worker thread does."""
        task = asyncio.ensure_future(job)
        self.active_jobs += 1
        self.max_concurrent_jobs = max(self.max_concurrent_jobs, self.active_jobs)
        self._jobs.add(task)
        task.add_done_callback(self._job_done)
        return task

    def _job_done(self, task: asyncio.Task[bytes | None]) -> None:
        self._jobs.discard(task)
        self.active_jobs -= 1
        if not task.cancelled():
            task.exception()  # an abandoned job's error was meant for a client that left

    def stats(self) -> dict[str, int]:
        """GET /fake/stats (test-only): what a subprocess node can be asked from outside."""
        return {
            "active_jobs": self.active_jobs,
            "max_concurrent_jobs": self.max_concurrent_jobs,
            "generations": self.generations,
            "images_rendered": self.images_rendered,
        }

    async def aclose(self) -> None:
        """Cancel running jobs (app shutdown)."""
        jobs = list(self._jobs)
        for task in jobs:
            task.cancel()
        # Partial results are deliberate: each job only needs to have stopped.
        await asyncio.gather(*jobs, return_exceptions=True)
