"""open_store(): the shared layer's entry point, which imports redis-py only when called."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sdproxy.config import ClusterSettings, SchedulerSettings

if TYPE_CHECKING:  # the module itself imports redis-py: only at run time, only when asked
    from sdproxy.shared.store import SharedStore


def open_store(cluster: ClusterSettings, scheduler: SchedulerSettings) -> SharedStore:
    """The shared store for ``cluster`` (which must have a redis_url); not yet started."""
    from sdproxy.shared.store import SharedStore  # redis-py only when shared

    return SharedStore.from_settings(cluster, scheduler)
