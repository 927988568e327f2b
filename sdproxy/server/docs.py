"""GET /docs: an interactive page for the proxy's own /openapi.json, its assets shipped here.

Webui users expect FastAPI's API page at /docs. This one is a small page of sdproxy's own
(docs.html, docs.js, docs.css as package data): it lists every operation of /openapi.json and
runs them with "Execute", loading nothing from another origin (its CSP allows only 'self').
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from aiohttp import web

# Types of the assets /docs/{asset} serves; anything else is 404.
_ASSETS = {"docs.js": "text/javascript", "docs.css": "text/css"}

# Only this origin: no inline script or style, no data: images, no frames, no form posts.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": CSP,
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@cache
def asset_bytes(name: str) -> bytes:
    """One of the page's files, shipped as package data."""
    return resources.files("sdproxy.server").joinpath(name).read_bytes()


async def docs_page(_: web.Request) -> web.Response:
    """GET /docs: the interactive API page."""
    return web.Response(
        body=asset_bytes("docs.html"), content_type="text/html", charset="utf-8", headers=_HEADERS
    )


async def docs_asset(request: web.Request) -> web.Response:
    """GET /docs/{asset}: the page's script and style sheet; /docs/ itself goes to /docs."""
    name = request.match_info["asset"]
    if name == "":  # its relative links start at /docs, not /docs/
        raise web.HTTPMovedPermanently("../docs")
    content_type = _ASSETS.get(name)
    if content_type is None:
        raise web.HTTPNotFound()
    return web.Response(
        body=asset_bytes(name), content_type=content_type, charset="utf-8", headers=_HEADERS
    )


def add_docs_routes(app: web.Application) -> None:
    app.router.add_get("/docs", docs_page)
    app.router.add_get("/docs/{asset:[^/]*}", docs_asset)
