"""Structured logging: one processor chain for the process, telemetry first, rendering last.

Chain: request context → telemetry processor (sees every event) → stage filter → level, timestamp
→ renderer. Stage events are rendered only at debug level; the terminal `request.completed` event is
rendered at info, so production logs carry one line per request while every stage reaches telemetry.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from .context import merge_request_context
from .processor import TELEMETRY
from .rows import TERMINAL_EVENT

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_INTERNAL_KEYS = ("request_start",)


class StageEventFilter:
    """Drops per-stage events from the rendered output unless the log level is debug."""

    def __init__(self, level: str) -> None:
        if level not in LEVELS:
            raise ValueError(f"unknown log level {level!r}")
        self._show_stages = LEVELS[level] <= logging.DEBUG

    def __call__(self, logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
        if not self._show_stages and "stage" in event_dict and event_dict.get("event") != TERMINAL_EVENT:
            raise structlog.DropEvent
        for key in _INTERNAL_KEYS:
            event_dict.pop(key, None)
        return event_dict


def _orjson_dumps(data: Any, **_: Any) -> bytes:
    return orjson.dumps(data, default=str)


def processors(level: str = "info") -> list[Processor]:
    """The chain up to (not including) rendering; tests capture after it."""
    return [merge_request_context, TELEMETRY, StageEventFilter(level)]


def configure_logging(log_format: str = "console", level: str = "info", *, cache_loggers: bool = False) -> None:
    """Configure structlog for the process. `cache_loggers` speeds up production; tests leave it off."""
    if log_format not in ("console", "json"):
        raise ValueError(f"log format must be 'console' or 'json', got {log_format!r}")
    chain = processors(level) + [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if log_format == "json":
        chain += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer(serializer=_orjson_dumps)]
        factory: Any = structlog.BytesLoggerFactory(sys.stdout.buffer)
    else:
        chain.append(structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty()))
        factory = structlog.PrintLoggerFactory(sys.stdout)
    structlog.configure(
        processors=chain,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=factory,
        cache_logger_on_first_use=cache_loggers,
    )


def is_configured() -> bool:
    return structlog.is_configured() and TELEMETRY in structlog.get_config()["processors"]
