"""create_app(): the aiohttp application, its shared resources, middlewares and routes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import orjson
from aiohttp import web

from sdproxy import __version__
from sdproxy.cluster.benchmark import Benchmarker
from sdproxy.cluster.scheduler import Cluster
from sdproxy.config import Settings
from sdproxy.errors import SdproxyError, webui_error_body
from sdproxy.ops.autosave import Autosaver
from sdproxy.ops.metrics import Metrics
from sdproxy.server import admin, docs, generation, openapi, running, webui
from sdproxy.server.accesslog import make_access_middleware
from sdproxy.server.auth import auth_middleware
from sdproxy.server.bodies import (
    body_limit_middleware,
    body_too_large,
    defer_expect_continue,
    json_response,
)
from sdproxy.server.dashboard import cluster_page
from sdproxy.server.drain import Drain, drain_key
from sdproxy.server.keys import (
    autosave_key,
    benchmarker_key,
    cluster_key,
    image_gate_key,
    metrics_key,
    session_key,
    settings_key,
)

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every error into the JSON body the webui would have answered with."""
    try:
        return await handler(request)
    except SdproxyError as exc:
        return json_response(exc.body(), status=exc.status, headers=exc.headers())
    except web.RequestPayloadError:
        # The body could not be read: bad chunking, or a Content-Encoding it does not have.
        body = webui_error_body("HTTPException", detail="There was an error parsing the body")
        return json_response(body, status=400)
    except web.HTTPRequestEntityTooLarge:
        error = body_too_large(request.app[settings_key].server)
        return json_response(error.body(), status=error.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        # FastAPI answers unknown routes and wrong methods with {"detail": reason}.
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return json_response({"detail": exc.reason}, status=exc.status, headers=headers)
    except Exception as exc:
        log.exception("unexpected error on %s %s", request.method, request.path)
        body = webui_error_body(type(exc).__name__, errors="internal error in sdproxy")
        return json_response(body, status=500)


async def _client_session(app: web.Application) -> AsyncIterator[None]:
    connector = aiohttp.TCPConnector(limit=0, enable_cleanup_closed=True)
    async with aiohttp.ClientSession(
        connector=connector, json_serialize=lambda o: orjson.dumps(o).decode()
    ) as session:
        app[session_key] = session
        yield


async def _cluster(app: web.Application) -> AsyncIterator[None]:
    # Registered after the session, so it stops first: lanes end before the session closes.
    cluster = Cluster(app[settings_key], app[session_key], metrics=app[metrics_key])
    await cluster.start()
    app[cluster_key] = cluster
    try:
        yield
    finally:
        await cluster.aclose()


async def _benchmarks(app: web.Application) -> AsyncIterator[None]:
    # Registered after the cluster, so it stops first: no benchmark outlives the lanes.
    settings = app[settings_key].benchmark
    timeout_s = app[settings_key].scheduler.share_timeout_floor_s
    benchmarker = Benchmarker(app[cluster_key], settings, timeout_s)
    missing = await benchmarker.load()
    if settings.on_start and missing:
        log.info("benchmarking nodes with no stored result: %s", ", ".join(missing))
        benchmarker.start(missing)
    app[benchmarker_key] = benchmarker
    try:
        yield
    finally:
        await benchmarker.aclose()


async def _autosave(app: web.Application) -> AsyncIterator[None]:
    # Registered last, so it stops first: handlers are done, saves already submitted finish.
    directory = app[settings_key].autosave.path
    if directory is None:
        yield
        return
    saver = Autosaver(directory, app[metrics_key])
    app[autosave_key] = saver
    cluster = app[cluster_key]
    # Requests whose client left are finished for autosave ([scheduler] on_disconnect).
    cluster.unseen_results = lambda result: saver.submit(result.body, result.shares)
    log.info("autosave: every image returned to a client is also written to %s", directory)
    try:
        yield
    finally:
        cluster.unseen_results = None
        await saver.aclose()


def create_app(settings: Settings) -> web.Application:
    """The sdproxy application for ``settings``; resources open when it starts."""
    metrics = Metrics()  # one registry per app: tests run many apps in one process
    drain = Drain(settings.server.shutdown_grace_s)
    app = web.Application(
        # The access log is outermost: it sees the status the error middleware answered, and
        # the error middleware answers what the ones inside it raise.
        middlewares=[
            make_access_middleware(metrics),
            drain.middleware,  # a request still running after the shutdown grace: 503
            error_middleware,
            auth_middleware(settings.server),
            body_limit_middleware(settings.server),
        ],
        client_max_size=settings.server.max_body_bytes,
    )
    app[settings_key] = settings
    app[metrics_key] = metrics
    app[drain_key] = drain
    app.on_shutdown.append(drain.stop)
    app[image_gate_key] = asyncio.Semaphore(settings.server.image_decode_threads)
    app.cleanup_ctx.append(_client_session)
    app.cleanup_ctx.append(_cluster)
    app.cleanup_ctx.append(_benchmarks)
    app.cleanup_ctx.append(_autosave)
    add_routes(app)
    defer_expect_continue(app)  # 100 Continue only once the body is wanted
    log.debug("sdproxy %s app created for %d nodes", __version__, len(settings.nodes))
    return app


def add_routes(app: web.Application) -> None:
    """Every route sdproxy serves, in one table."""
    app.router.add_post("/sdapi/v1/txt2img", generation.txt2img)
    app.router.add_post("/sdapi/v1/img2img", generation.img2img)
    app.router.add_get("/cluster/status", admin.cluster_status)
    app.router.add_post("/cluster/nodes/{name}/disable", admin.disable_node)
    app.router.add_post("/cluster/nodes/{name}/enable", admin.enable_node)
    app.router.add_get("/cluster", cluster_page)
    app.router.add_get("/metrics", admin.prometheus_metrics)
    webui.add_webui_routes(app)
    running.add_running_routes(app)
    app.router.add_get("/openapi.json", openapi.openapi_json, allow_head=False)
    docs.add_docs_routes(app)
    app.router.add_post("/cluster/benchmark", admin.cluster_benchmark)
