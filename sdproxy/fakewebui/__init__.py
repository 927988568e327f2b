"""A simulated AUTOMATIC1111 webui v1.10.1 node (no GPU) for tests, the demo and benchmarks.

Layout (imports point down the list; everything above ``node`` is pure):

- ``model``     request models: pydantic-1-style coercion and validation, error bodies
- ``catalog``   samplers, schedulers, checkpoints, scripts, options and other listings
- ``infotext``  seeds, infotexts and the info JSON of finished jobs
- ``planning``  a validated request -> the job's plan (sizes, hires fix, masks)
- ``pixels``    deterministic images, PNG encoding and decoding
- ``node``      one node's mutable state: settings, faults, progress, loaded checkpoint
- ``faults``    the misbehaviours: lies in an answer, and answers of servers in the way
- ``jobs``      running one txt2img/img2img job
- ``server``    the aiohttp app: endpoints, auth, error middleware, serving
"""

from __future__ import annotations

from sdproxy.fakewebui.node import FakeNode, FakeNodeSettings, Fault, FaultMode
from sdproxy.fakewebui.pixels import render_png
from sdproxy.fakewebui.server import create_fake_app, serve_fake_node

__all__ = [
    "FakeNode",
    "FakeNodeSettings",
    "Fault",
    "FaultMode",
    "create_fake_app",
    "render_png",
    "serve_fake_node",
]
