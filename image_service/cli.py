"""Command line: `image-service serve --host --port [--config PATH] [--log-format json|console] [--workers N]`,
`events replay`, `stats`, `alerts check`.

With `--workers N` (N > 1) the command is a supervisor: it starts N worker processes that each
listen on the same port with SO_REUSEPORT (the kernel spreads connections between them) and each
run the whole service with their own executor, backends, cache connection and telemetry. SIGTERM or
SIGINT to the supervisor stops every worker gracefully; a worker that dies on its own makes the
supervisor stop the others and exit 1, so whatever supervises it (systemd, Kubernetes) restarts all.

Each worker spools telemetry in its own directory inside `tracking.spool_dir` (`worker-<index>`):
before the workers start, the supervisor hands them what a run with another worker count left.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from aiohttp import web

from .analytics.commands import add_commands as add_analytics_commands
from .analytics.commands import run as run_analytics
from .config import ConfigError, Settings, load_settings
from .tracking.spool import share_out, worker_directory

# Seconds the supervisor allows a stopping worker beyond its request and telemetry deadlines before killing it.
WORKER_EXIT_GRACE = 10.0
MAX_WORKERS = 256
# The exit status of a configuration mistake (bad settings, a port in use): fix it, do not restart.
CANNOT_START = 2
# Set in a worker once it listens: a failure after that is a crash (status 1), not a start-up mistake.
SERVING = threading.Event()


def _workers(value: str) -> int:
    try:
        count = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {value!r}") from None
    if not 1 <= count <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_WORKERS}, got {count}")
    return count


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="image-service", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP service")
    serve.add_argument("--host", help="address to listen on (default: server.host)")
    serve.add_argument("--port", type=int, help="port to listen on (default: server.port)")
    serve.add_argument("--config", type=Path, help="TOML file overriding config/defaults.toml")
    serve.add_argument("--log-format", choices=("console", "json"), help="default: server.log_format")
    serve.add_argument(
        "--workers", type=_workers, default=1,
        help="processes sharing the port with SO_REUSEPORT (default: 1, no supervisor)",
    )
    events = commands.add_parser("events", help="telemetry tools")
    events_commands = events.add_subparsers(dest="events_command", required=True)
    replay = events_commands.add_parser(
        "replay", help="send an NDJSON file (the local sink) or a spool directory to Tinybird"
    )
    replay.add_argument("path", type=Path)
    replay.add_argument("--config", type=Path, help="TOML file overriding config/defaults.toml")
    add_analytics_commands(commands)
    return parser


def serve(args: argparse.Namespace) -> int:
    server: dict[str, Any] = {
        key: value
        for key, value in (("host", args.host), ("port", args.port), ("log_format", args.log_format))
        if value is not None
    }
    settings = load_settings(args.config, command_line={"server": server} if server else None)
    if args.workers > 1:
        _check_workers_backends(settings, args.workers)
        return _supervise(settings, args.workers)
    _run_service(settings, reuse_port=False)
    return 0


def _check_workers_backends(settings: Settings, processes: int) -> None:
    """GPU workers register with whichever process the kernel hands their call to: the others would
    never hear of them, and answer that model's requests 503 at random."""
    gpu = sorted(name for name in settings.backends_in_use() if settings.backends[name].type == "workers")
    if gpu:
        raise ConfigError(
            f"--workers {processes} cannot serve the workers backend {gpu[0]!r}: a GPU worker's registration "
            "reaches one process only. Run one process per address (each instance with its own registrations)"
        )


def events_replay(args: argparse.Namespace) -> int:
    from .tracking.replay import replay
    from .tracking.spool import PREFIX, SUFFIX, holds_rows, in_use

    settings = load_settings(args.config)
    if not args.path.exists():
        print(f"image-service: {args.path} does not exist", file=sys.stderr)
        return 2
    busy = in_use(args.path) if args.path.is_dir() else []
    if busy:
        print(f"image-service: {busy[0]} is the spool of a running image-service, which drains it itself "
              "(replaying it would race the server for its rows); stop the server first", file=sys.stderr)
        return 2
    if args.path.is_dir() and not holds_rows(args.path):
        print(f"image-service: {args.path} holds no spool segments ({PREFIX}*{SUFFIX}): nothing to replay",
              file=sys.stderr)
        return 2
    if not settings.tracking.api_key.get_secret_value():
        print("image-service: set TINYBIRD_API_KEY (and TINYBIRD_API_URL) to replay into Tinybird", file=sys.stderr)
        return 2
    report = asyncio.run(replay(settings.tracking, args.path))
    print(report.summary())
    return 0 if report.complete else 1


COMMANDS = {
    "serve": serve,
    "events": events_replay,
    "stats": lambda args: run_analytics("stats", args),
    "alerts": lambda args: run_analytics("alerts", args),
}


def _run_service(settings: Settings, *, reuse_port: bool) -> None:
    """The whole service in this process until SIGTERM; a worker shares its port with its siblings."""
    from .app import create_app
    from .tracking import configure_logging

    configure_logging(settings.server.log_format, settings.server.log_level, cache_loggers=True)
    app = create_app(settings)
    app.on_startup.append(_freeze_startup_heap)
    app.on_shutdown.insert(0, _absorb_further_signals)
    try:
        _run_app(app, settings, reuse_port)
    except socket.gaierror as exc:  # aiohttp's message names neither the host nor the setting
        raise ConfigError(f"server.host {settings.server.host!r} is no address to listen on ({exc.strerror})") from None


def _run_app(app: web.Application, settings: Settings, reuse_port: bool) -> None:
    from .params import longest_request_line

    web.run_app(
        app,
        host=settings.server.host,
        port=settings.server.port,
        # aiohttp waits this long for the handlers in flight, then as long again for them to notice
        # a cancellation that does not stop them: half is the whole server.shutdown_timeout.
        shutdown_timeout=settings.server.shutdown_timeout / 2,
        access_log=None,
        max_line_size=longest_request_line(settings.server.max_prompt_length),
        reuse_port=reuse_port or None,
        # aiohttp prints its banner once every socket listens: a worker only notes that it serves.
        print=(lambda message: SERVING.set()) if reuse_port else lambda message: print(message, file=sys.stderr),
    )


async def _absorb_further_signals(app: web.Application) -> None:
    """Shutdown has begun: a second SIGTERM or SIGINT would abort it, cutting off the requests it
    waits for and the telemetry it flushes. A stop sent to a process group (Ctrl-C, systemd) reaches
    each worker, and then the supervisor forwards its own; SIGKILL still ends a stuck process."""
    loop = asyncio.get_running_loop()
    # A worker's second signal is the supervisor's, forwarding its own stop: expected, not worth a line.
    handler = _stopping_already if multiprocessing.parent_process() is None else _quietly
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, handler)


def _quietly() -> None:
    """Absorb the signal."""


def _stopping_already() -> None:
    print("image-service: already stopping; waiting for requests in flight (SIGKILL aborts)", file=sys.stderr)


async def _freeze_startup_heap(app: web.Application) -> None:
    """What exists once the service has started (modules, settings, models) lives as long as the
    process: out of the collector's reach, a full collection walks only what requests created, and
    stops the event loop for about a millisecond instead of tens."""
    gc.collect()
    gc.freeze()


def worker_settings(settings: Settings, index: int) -> Settings:
    """Worker `index`'s settings: its own telemetry spool, inside the configured one."""
    tracking = settings.tracking.model_copy(update={"spool_dir": worker_directory(settings.tracking.spool_dir, index)})
    return settings.model_copy(update={"tracking": tracking})


def _run_worker(settings: Settings) -> None:
    """One worker process: the whole service on the shared port. What stops a single process with
    a one-line message and status 2 (a port in use, a missing model file) stops a worker the same
    way: the supervisor then tells a mistake to fix from a crash to restart after."""
    try:
        _run_service(settings, reuse_port=True)
    except (ConfigError, OSError) as exc:
        if SERVING.is_set():
            raise  # it had started: a crash, not a mistake in how it was started
        print(f"image-service: {multiprocessing.current_process().name}: {exc}", file=sys.stderr)
        sys.exit(CANNOT_START)


def _supervise(settings: Settings, workers: int) -> int:
    """Start the workers, wait for a signal or a dead worker, then stop them all."""
    if settings.server.port == 0:
        raise ConfigError("--workers needs a fixed port: with port 0 every worker would listen elsewhere")
    share_out(settings.tracking.spool_dir, workers)
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    # A worker's stop is its requests, then its telemetry's flush, then the spool: killed before the
    # last, it lost the rows it still held.
    patience = settings.server.shutdown_timeout + settings.tracking.shutdown_timeout + WORKER_EXIT_GRACE
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    # spawn, not fork: each worker starts from a clean interpreter, no inherited threads or loops.
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=_run_worker, args=(worker_settings(settings, index),), name=f"image-service-worker-{index}")
        for index in range(workers)
    ]
    try:
        for process in processes:
            process.start()
        print(
            f"image-service: starting {workers} workers on http://{settings.server.host}:{settings.server.port}",
            file=sys.stderr,
        )
        while not stopping and all(process.is_alive() for process in processes):
            multiprocessing.connection.wait([process.sentinel for process in processes], timeout=0.5)
        crashed = [process for process in processes if not process.is_alive()] if not stopping else []
        for process in processes:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + patience
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
    finally:
        killed = [process for process in processes if process.is_alive()]
        for process in killed:
            process.kill()
            process.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if killed:
        print(f"image-service: {killed[0].name} had not stopped after {patience:g} s; killed", file=sys.stderr)
        return 1
    if crashed and crashed[0].exitcode == CANNOT_START:
        print("image-service: a worker could not start (above); stopped the others", file=sys.stderr)
        return CANNOT_START
    if crashed:
        print(
            f"image-service: worker {crashed[0].name} exited with status {crashed[0].exitcode}; stopped the others",
            file=sys.stderr,
        )
        return 1
    # A worker stopped before it installed its signal handlers dies of the SIGTERM itself: still clean.
    failed = [process for process in processes if process.exitcode not in (0, -signal.SIGTERM)]
    if failed:
        print(f"image-service: {failed[0].name} exited with status {failed[0].exitcode} while stopping", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"image-service: {exc}", file=sys.stderr)
        return CANNOT_START
    except OSError as exc:  # a port in use, a host that does not resolve, a spool path that is a file
        print(f"image-service: {exc}", file=sys.stderr)
        return CANNOT_START
