"""The AppKeys under which the application keeps its shared resources."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from sdproxy.autosave import Autosaver
from sdproxy.benchmark import Benchmarker
from sdproxy.config import Settings
from sdproxy.metrics import Metrics
from sdproxy.scheduler import Cluster

settings_key = web.AppKey("settings", Settings)
session_key = web.AppKey("session", aiohttp.ClientSession)
cluster_key = web.AppKey("cluster", Cluster)
benchmarker_key = web.AppKey("benchmarker", Benchmarker)
metrics_key = web.AppKey("metrics", Metrics)
autosave_key = web.AppKey("autosave", Autosaver)
