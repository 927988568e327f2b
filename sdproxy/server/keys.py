"""The AppKeys under which the application keeps its shared resources."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from sdproxy.cluster.benchmark import Benchmarker
from sdproxy.cluster.scheduler import Cluster
from sdproxy.config import Settings
from sdproxy.ops.autosave import Autosaver
from sdproxy.ops.metrics import Metrics

settings_key = web.AppKey("settings", Settings)
session_key = web.AppKey("session", aiohttp.ClientSession)
cluster_key = web.AppKey("cluster", Cluster)
benchmarker_key = web.AppKey("benchmarker", Benchmarker)
metrics_key = web.AppKey("metrics", Metrics)
autosave_key = web.AppKey("autosave", Autosaver)
image_gate_key = web.AppKey("image_gate", asyncio.Semaphore)  # init images decoded at once
