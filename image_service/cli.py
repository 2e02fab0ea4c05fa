"""Command line: `image-service serve --host --port [--config PATH] [--log-format json|console]`,
`events replay`, `stats`, `alerts check`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from .analytics.commands import add_commands as add_analytics_commands
from .analytics.commands import run as run_analytics
from .config import ConfigError, load_settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="image-service", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP service")
    serve.add_argument("--host", help="address to listen on (default: server.host)")
    serve.add_argument("--port", type=int, help="port to listen on (default: server.port)")
    serve.add_argument("--config", type=Path, help="TOML file overriding config/defaults.toml")
    serve.add_argument("--log-format", choices=("console", "json"), help="default: server.log_format")
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
    from .app import create_app
    from .tracking import configure_logging

    server: dict[str, Any] = {
        key: value
        for key, value in (("host", args.host), ("port", args.port), ("log_format", args.log_format))
        if value is not None
    }
    settings = load_settings(args.config, {"server": server} if server else None)
    configure_logging(settings.server.log_format, settings.server.log_level)
    web.run_app(
        create_app(settings),
        host=settings.server.host,
        port=settings.server.port,
        shutdown_timeout=settings.server.shutdown_timeout,
        access_log=None,
        print=lambda message: print(message, file=sys.stderr),
    )
    return 0


def events_replay(args: argparse.Namespace) -> int:
    import asyncio

    from .tracking.replay import replay

    settings = load_settings(args.config)
    if not args.path.exists():
        print(f"image-service: {args.path} does not exist", file=sys.stderr)
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


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"image-service: {exc}", file=sys.stderr)
        return 2
