"""Structured logging: every pipeline stage emits one structlog event bound to its request.

`configure_logging` sets the processor chain once, at start-up. Stage events (`stage=...`) are
rendered only at debug level; the terminal `request.completed` event is rendered at info, so
production logs carry one line per request while every stage stays observable.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
TERMINAL_EVENT = "request.completed"


class StageEventFilter:
    """Drops per-stage events from the rendered output unless the log level is debug."""

    def __init__(self, level: str) -> None:
        if level not in LEVELS:
            raise ValueError(f"unknown log level {level!r}")
        self._show_stages = LEVELS[level] <= logging.DEBUG

    def __call__(self, logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
        if not self._show_stages and "stage" in event_dict and event_dict.get("event") != TERMINAL_EVENT:
            raise structlog.DropEvent
        return event_dict


def _orjson_dumps(data: Any, **_: Any) -> bytes:
    return orjson.dumps(data, default=str)


def configure_logging(log_format: str = "console", level: str = "info", telemetry: Processor | None = None) -> None:
    """Configure structlog for the process; `telemetry` sees every event before it is filtered."""
    if log_format not in ("console", "json"):
        raise ValueError(f"log format must be 'console' or 'json', got {log_format!r}")
    processors: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if telemetry is not None:
        processors.append(telemetry)
    processors.append(StageEventFilter(level))
    if log_format == "json":
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer(serializer=_orjson_dumps)]
        factory: Any = structlog.BytesLoggerFactory(sys.stdout.buffer)
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty()))
        factory = structlog.PrintLoggerFactory(sys.stdout)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
