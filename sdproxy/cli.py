"""The ``sdproxy`` command: serve, benchmark, fake-node, demo; named exit codes, no tracebacks."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

import aiohttp
from aiohttp import web

from sdproxy import __version__
from sdproxy.cluster.benchmark import BenchmarkResult, benchmark_node, load_state, save_state
from sdproxy.config import NodeSettings, Settings, load_settings
from sdproxy.errors import ConfigError, NodeError
from sdproxy.fakewebui import FakeNode, FakeNodeSettings, Fault, FaultMode, create_fake_app
from sdproxy.logs import configure_logging
from sdproxy.nodes.client import NodeClient
from sdproxy.server.site import start_proxy, start_site, stop_proxy

EXIT_OK = 0
EXIT_CONFIG = 2  # bad configuration or arguments, like argparse's own usage errors
EXIT_RUNTIME = 1  # could not start, e.g. the port is taken

log = logging.getLogger("sdproxy")

DEMO_NODES = (("fast", 0.15), ("medium", 0.3), ("slow", 0.6))  # (name, seconds per image)


DESCRIPTION = """\
One Stable Diffusion webui API in front of many webui nodes: sdproxy splits each txt2img and
img2img batch across the healthy nodes, fails over, and answers as one webui would."""

EPILOG = """\
examples:
  sdproxy demo                                  three simulated nodes, http://127.0.0.1:7860
  sdproxy serve --config config.toml            the proxy, configured by a TOML file
  SDPROXY_NODES='[{"name": "a", "url": "http://10.0.0.5:7861"}]' sdproxy serve
  sdproxy benchmark --config config.toml        time every node, store the results

Global options (--log-level, --log-format) go before or after the command. Exit status: 0 ok,
1 could not start or run (port taken, benchmark failed), 2 bad configuration or arguments."""


def _global_options(defaults: bool) -> argparse.ArgumentParser:
    """--log-level and --log-format, accepted before the command and after it.

    After it, only what is given counts (SUPPRESS), so it never undoes what came before.
    """
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group("global options")
    group.add_argument(
        "--log-level",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        default="INFO" if defaults else argparse.SUPPRESS,
        help="log lines at this level and above (default: INFO)",
    )
    group.add_argument(
        "--log-format",
        choices=["text", "json"],
        default=None if defaults else argparse.SUPPRESS,
        help="log lines as text or JSON objects (default: [server] log_format, else text)",
    )
    return options


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="sdproxy",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=formatter,
        parents=[_global_options(defaults=True)],
    )
    parser.add_argument("--version", action="version", version=f"sdproxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = [_global_options(defaults=False)]

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name, help=text, description=text, parents=common, formatter_class=formatter
        )

    serve = command("serve", "run the proxy in front of the configured nodes")
    serve.add_argument(
        "--config",
        type=Path,
        default=None,
        help="TOML configuration file (without it: SDPROXY_* environment variables only)",
    )

    bench = command("benchmark", "time every node and store the results")
    bench.add_argument("--config", type=Path, required=True, help="TOML configuration file")
    bench.add_argument("--node", default=None, help="only this node (by name)")

    fake = command("fake-node", "run one simulated webui node (for tests and trials)")
    fake.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    fake.add_argument("--port", type=int, required=True, help="port to listen on")
    fake.add_argument("--name", default="fake", help="the node's name in its answers (fake)")
    fake.add_argument(
        "--per-image-s",
        type=_non_negative,
        default=0.5,
        help="seconds per image at 20 steps, 512x512 (0.5)",
    )
    fake.add_argument(
        "--overhead-s", type=_non_negative, default=0.1, help="fixed seconds per request (0.1)"
    )
    fake.add_argument(
        "--models", type=_model_list, default=None, help="comma-separated checkpoint titles"
    )
    fake.add_argument("--api-auth", default=None, help="user:pass[,user2:pass2], like the webui")
    fake.add_argument("--realistic-images", action="store_true", help="webui-sized PNGs")
    fake.add_argument(
        "--fail-mode",
        choices=get_args(FaultMode),
        default="none",
        help="simulate a failure on generation requests (exit: the process dies; the lies and "
        "answers of servers in the way are listed in sdproxy/fakewebui/faults.py)",
    )
    fake.add_argument(
        "--redirect-url",
        default=Fault.redirect_url,
        help="--fail-mode redirect: answer 307 to this base URL plus the request's path",
    )
    fake.add_argument(
        "--huge-mb",
        type=_non_negative,
        default=Fault.huge_mb,
        help="--fail-mode huge_body/huge_stream: megabytes to send",
    )
    fake.add_argument(
        "--fail-after-s",
        type=_non_negative,
        default=0.0,
        help="seconds into a generation the failure strikes (0)",
    )
    fake.add_argument(
        "--fail-times",
        type=_count,
        default=None,
        help="fail only the first N generation requests (default: all)",
    )

    demo = command("demo", "run sdproxy in front of three simulated nodes")
    demo.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    demo.add_argument("--port", type=int, default=7860, help="port to listen on (7860)")
    return parser


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _model_list(text: str) -> tuple[str, ...]:
    models = tuple(name.strip() for name in text.split(",") if name.strip())
    if not models:
        raise argparse.ArgumentTypeError("give at least one model title")
    return models


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        configured = args.command in ("serve", "benchmark")
        settings = load_settings(args.config) if configured else None
        from_config = settings.server.log_format if settings is not None else "text"
        configure_logging(args.log_level, args.log_format or from_config)
        if args.command == "serve" and settings is not None:
            asyncio.run(_serve(settings))
        elif args.command == "benchmark" and settings is not None:
            return asyncio.run(run_benchmarks(settings, args.node))
        elif args.command == "fake-node":
            fake = FakeNodeSettings(
                name=args.name,
                per_image_s=args.per_image_s,
                overhead_s=args.overhead_s,
                api_auth=args.api_auth,
                realistic_images=args.realistic_images,
            )
            if args.models:
                fake.models = args.models
            fake.fault = Fault(
                args.fail_mode,
                args.fail_after_s,
                args.fail_times,
                redirect_url=args.redirect_url,
                huge_mb=args.huge_mb,
            )
            asyncio.run(_fake_node(fake, args.host, args.port))
        else:
            asyncio.run(_demo(args.host, args.port))
    except ConfigError as exc:
        print(f"sdproxy: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(f"sdproxy: cannot start: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_RUNTIME
    return EXIT_OK


async def wait_for_signal() -> None:
    """Return on the first SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _serve(settings: Settings) -> None:
    runner = await start_proxy(settings, settings.server.host, settings.server.port)
    log.info(
        "sdproxy %s listening on http://%s:%d with %d nodes",
        __version__,
        settings.server.host,
        settings.server.port,
        len(settings.nodes),
    )
    try:
        await wait_for_signal()
    finally:
        log.info(
            "stopping: no new connections; waiting up to %g s for requests in flight",
            settings.server.shutdown_grace_s,
        )
        await stop_proxy(runner, settings)


async def run_benchmarks(settings: Settings, only: str | None) -> int:
    """Benchmark every node (or ``only``), print a table, store the results; 1 if any failed."""
    nodes = [node for node in settings.nodes if only is None or node.name == only]
    if not nodes:
        raise ConfigError(f"--node {only}: no node of that name in the configuration")
    bench = settings.benchmark
    print(
        f"benchmarking {len(nodes)} node(s): {bench.steps} steps, {bench.width}x{bench.height}, "
        f"batch sizes {bench.batch_sizes[0]} and {bench.batch_sizes[1]}, "
        f"{bench.warmup_runs} warm-up and {bench.timed_runs} timed run(s) each",
        file=sys.stderr,
        flush=True,
    )
    results: dict[str, BenchmarkResult] = {}
    errors: dict[str, str] = {}
    timeout_s = settings.scheduler.share_timeout_floor_s
    async with aiohttp.ClientSession() as session:

        async def one(node: NodeSettings) -> None:
            client = NodeClient(session, node, settings.scheduler)
            try:
                results[node.name] = await benchmark_node(
                    client, bench, timeout_s, progress=_print_progress
                )
            except NodeError as exc:
                errors[node.name] = exc.reason
                _print_progress(node.name, f"failed: {exc.reason}")

        async with asyncio.TaskGroup() as group:
            for node in nodes:
                group.create_task(one(node))
    print(format_results(nodes, results, errors), flush=True)
    path = bench.state_file
    if path is not None and results:
        stored = await asyncio.to_thread(load_state, path)
        stored.update(results)
        try:
            await asyncio.to_thread(save_state, path, stored)
        except OSError as exc:
            print(f"sdproxy: cannot store the results in {path}: {exc}", file=sys.stderr)
            return EXIT_RUNTIME
        print(f"results stored in {path}", file=sys.stderr)
    return EXIT_RUNTIME if errors else EXIT_OK


def _print_progress(node: str, what: str) -> None:
    print(f"  {node}: {what}", file=sys.stderr, flush=True)


def format_results(
    nodes: Sequence[NodeSettings], results: dict[str, BenchmarkResult], errors: dict[str, str]
) -> str:
    """The benchmark table: one row per node, failures included."""
    header = ("node", "checkpoint", "batch s", "overhead s", "s/image", "images/min")
    rows = [header]
    for node in nodes:
        result = results.get(node.name)
        if result is None:
            rows.append((node.name, f"FAILED: {errors.get(node.name, '?')}", "", "", "", ""))
            continue
        medians: dict[int, list[float]] = {}
        for size, seconds in result.runs:
            medians.setdefault(size, []).append(seconds)
        timings = " / ".join(
            f"{size}: {statistics.median(times):.2f}" for size, times in sorted(medians.items())
        )
        per_image = result.per_image_s * result.work_per_image
        rows.append(
            (
                node.name,
                result.checkpoint or "?",
                timings,
                f"{result.overhead_s:.2f}",
                f"{per_image:.3f}",
                f"{60 / per_image:.1f}" if per_image > 0 else "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


async def _fake_node(fake: FakeNodeSettings, host: str, port: int) -> None:
    runner = await start_site(create_fake_app(FakeNode(fake)), host, port)
    log.info("fake webui node %r listening on http://%s:%d", fake.name, host, port)
    try:
        await wait_for_signal()
    finally:
        await runner.cleanup()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now, for a process that must listen on a port chosen
    for it (a fake node the tests restart on the same port). Racy by nature: servers in this
    process bind port 0 and read the port they got instead."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


async def _demo(host: str, port: int) -> None:
    runners: list[web.AppRunner] = []
    nodes: list[dict[str, Any]] = []
    try:
        for name, per_image_s in DEMO_NODES:
            fake = FakeNodeSettings(name=name, per_image_s=per_image_s, overhead_s=0.1)
            runner = await start_site(create_fake_app(FakeNode(fake)), "127.0.0.1", 0)
            runners.append(runner)
            node_port = runner.addresses[0][1]
            nodes.append(
                {"name": name, "url": f"http://127.0.0.1:{node_port}", "weight": 1 / per_image_s}
            )
        # The demo's weights are its nodes' true speeds: no benchmark needed.
        settings = Settings.model_validate(
            {
                "server": {"host": host, "port": port},
                "benchmark": {"on_start": False},
                "nodes": nodes,
            }
        )
        runners.append(await start_proxy(settings, host, port))
        url = f"http://{host}:{port}"
        print(DEMO_BANNER.format(url=url, nodes=", ".join(n["name"] for n in nodes)), flush=True)
        await wait_for_signal()
    finally:
        for runner in reversed(runners):
            await runner.cleanup()


DEMO_BANNER = """\
sdproxy demo: {url} in front of three simulated webui nodes ({nodes}).
Try:
  curl -s {url}/sdapi/v1/txt2img -H 'Content-Type: application/json' \\
    -d '{{"prompt": "a lighthouse at dusk", "batch_size": 6, "steps": 20}}' \\
    -D - -o /dev/null
  curl -s {url}/cluster/status
Ctrl-C stops everything."""
