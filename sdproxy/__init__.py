"""sdproxy: one Stable Diffusion webui API in front of many webui nodes."""

from __future__ import annotations

__version__ = "0.1.0"
