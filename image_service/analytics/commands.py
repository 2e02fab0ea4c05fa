"""`image-service stats` and `image-service alerts check`: the pipes from a terminal or a cron job."""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from ..config import Settings, load_settings
from ..tracking.sinks import rotated_files
from .engine import AnalyticsError
from .report import alert_payload, post_webhook, table
from .source import DASHBOARD_PIPES, LocalSource, PipeSource, check_params, make_source, run_pipes

STATS_PIPES = tuple(pipe for pipe in DASHBOARD_PIPES if pipe != "anomalies")


def _common(parser: argparse.ArgumentParser, default_bucket: str) -> None:
    parser.add_argument("--source", choices=("local", "tinybird"),
                        help="default: tinybird when TINYBIRD_READ_TOKEN is set, else the local NDJSON sink")
    parser.add_argument("--events", type=Path, help="local NDJSON file (default: tracking.local_path)")
    parser.add_argument("--config", type=Path, help="TOML file overriding config/defaults.toml")
    parser.add_argument("--start", help="'YYYY-MM-DD HH:MM:SS' UTC (default: a day ago; for alerts check with --bucket day, 14 days)")
    parser.add_argument("--end", help="'YYYY-MM-DD HH:MM:SS' UTC (default: now)")
    parser.add_argument("--bucket", choices=("minute", "hour", "day"), default=default_bucket)
    parser.add_argument("--service-type", dest="service_type")
    parser.add_argument("--model")


def add_commands(commands: Any) -> None:
    stats = commands.add_parser("stats", help="print the Tinybird pipes' results as tables")
    stats.add_argument("--pipe", action="append", choices=DASHBOARD_PIPES, help="repeatable (default: all)")
    _common(stats, "hour")
    alerts = commands.add_parser("alerts", help="anomaly alerts")
    alerts_commands = alerts.add_subparsers(dest="alerts_command", required=True)
    check = alerts_commands.add_parser("check", help="evaluate `anomalies`; exit 1 when something fired")
    _common(check, "minute")
    check.add_argument("--max-error-rate", dest="max_error_rate")
    check.add_argument("--max-p95-ms", dest="max_p95_ms")
    check.add_argument("--factor")
    check.add_argument("--min-error-rate", dest="min_error_rate")
    check.add_argument("--min-p95-rise-ms", dest="min_p95_rise_ms")
    check.add_argument("--min-requests", dest="min_requests")
    check.add_argument("--since", help="report windows from this time on, 'YYYY-MM-DD HH:MM:SS' UTC (default: the "
                       "previous window: a job run once a window reports each anomaly once or twice, not all day)")
    check.add_argument("--webhook", help="POST a JSON payload here when something fired")


def previous_window(bucket: str, now: datetime) -> str:
    """The start of the window before the one `now` is in, as the pipes take times."""
    step = {"minute": timedelta(minutes=1), "hour": timedelta(hours=1), "day": timedelta(days=1)}[bucket]
    current = now.replace(second=0, microsecond=0)
    if bucket != "minute":
        current = current.replace(minute=0)
    if bucket == "day":
        current = current.replace(hour=0)
    return (current - step).strftime("%Y-%m-%d %H:%M:%S")


def _params(args: argparse.Namespace, *extra: str) -> dict[str, str]:
    keys = ("start", "end", "bucket", "service_type", "model", *extra)
    return check_params({key: getattr(args, key) for key in keys})


def _events_flag(args: argparse.Namespace) -> dict[str, Any] | None:
    return {"tracking": {"local_path": str(args.events)}} if args.events else None


def _source(settings: Settings, args: argparse.Namespace) -> PipeSource:
    """The source to query; a local one must have its file: a mistyped path would otherwise read
    as a quiet service, and a cron alert job would stay silent for ever."""
    source = make_source(settings, choice=args.source)
    if isinstance(source, LocalSource) and not (source.events.is_file() or rotated_files(source.events)):
        raise AnalyticsError(
            f"no events file at {source.events} (--events or tracking.local_path; it appears with the server's first row)"
        )
    return source


async def _stats(args: argparse.Namespace) -> int:
    settings = load_settings(args.config, command_line=_events_flag(args))
    params = _params(args)
    source = _source(settings, args)
    try:
        pipes = tuple(args.pipe) if args.pipe else STATS_PIPES
        answers = await run_pipes(source, pipes, params)
    finally:
        await source.close()
    for pipe, answer in answers.items():
        print(f"== {pipe} ({source.name}) ==")
        print(table(answer))
        print()
    return 0


async def _alerts(args: argparse.Namespace) -> int:
    settings = load_settings(args.config, command_line=_events_flag(args))
    if args.since is None:
        args.since = previous_window(args.bucket, datetime.now(UTC))
    params = _params(args, "since", "max_error_rate", "max_p95_ms", "factor", "min_error_rate", "min_p95_rise_ms",
                     "min_requests")
    source = _source(settings, args)
    try:
        fired = (await source.run("anomalies", params))["data"]
    finally:
        await source.close()
    payload = alert_payload(fired, params, source.name)
    if not fired:
        print("no anomalies")
        return 0
    print(f"{len(fired)} anomal{'y' if len(fired) == 1 else 'ies'} fired")
    print(table({"data": fired}))
    if args.webhook:
        await post_webhook(args.webhook, payload)
        print(f"sent to the webhook ({len(fired)} anomalies)")
    return 1


def run(command: str, args: argparse.Namespace) -> int:
    """Exit status: 0 quiet, 1 alerts fired, 2 bad input or an unreachable source."""
    try:
        return asyncio.run(_stats(args) if command == "stats" else _alerts(args))
    except (AnalyticsError, ValueError) as exc:
        print(f"image-service: {exc}", file=sys.stderr)
        return 2
