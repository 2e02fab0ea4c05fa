"""Structured logging: one processor chain for the process, telemetry first, rendering last.

Chain: telemetry processor (sees every event, with a reference to its request's context) → stage
filter → request context merged in → level, timestamp → renderer: events that are not rendered
never pay for the merge. Stage events are rendered only at debug level; the terminal `request.completed` event is
rendered at info, so production logs carry one line per request while every stage reaches telemetry.

The log level decides what is rendered, never what telemetry sees: structlog's own level filter
(which drops a call before any processor runs) stops at info, the level of stage events, and a
higher configured level is applied after telemetry (`BelowLevelFilter`).
"""

from __future__ import annotations

import atexit
import io
import logging
import sys
import threading
import time
from typing import Any

import orjson
import structlog
from structlog.stdlib import NAME_TO_LEVEL
from structlog.typing import EventDict, Processor, WrappedLogger

from .context import merge_request_context
from .processor import TELEMETRY, lenient
from .rows import TERMINAL_EVENT, SecondFormatter, sanitise

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_INTERNAL_KEYS = ("request_start",)
# The fields that carry an exception's text into a log line.
_EXCEPTION_KEYS = ("exception", "traceback")
LOG_BUFFER_BYTES = 1 << 20
FLUSH_SECONDS = 0.2


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


class BelowLevelFilter:
    """Drops, from the rendered output only, events below a level above info."""

    def __init__(self, level: str) -> None:
        threshold = LEVELS[level]
        self._hidden = frozenset(name for name, value in NAME_TO_LEVEL.items() if value < threshold)

    def __call__(self, logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
        if method_name in self._hidden:
            raise structlog.DropEvent
        return event_dict


class AiohttpErrors(logging.Handler):
    """aiohttp's own error log (a request it could not parse, a failure outside any handler) as one
    structured line, without the record's arguments or traceback: they quote the request line (a
    private prompt, a token) and name the client's address."""

    def __init__(self) -> None:
        super().__init__()
        self._log = structlog.get_logger("aiohttp.server")

    def emit(self, record: logging.LogRecord) -> None:
        error = record.exc_info[1] if record.exc_info else None
        # A message with arguments is a template ("Error handling request from %s"); one without
        # may have been formatted with what it reports.
        self._log.log(
            record.levelno, "http.server_error", message=str(record.msg) if record.args else None,
            error=type(error).__name__ if error is not None else None,
        )


def _route_aiohttp_errors(level: str) -> None:
    server = logging.getLogger("aiohttp.server")
    server.handlers = [AiohttpErrors()]
    server.setLevel(LEVELS[level])
    server.propagate = False


def drop_internal_keys(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """Bookkeeping fields of the request context are for rows, not for log lines."""
    for key in _INTERNAL_KEYS:
        event_dict.pop(key, None)
    return event_dict


def _orjson_dumps(data: Any, **_: Any) -> bytes:
    """A log call never raises into its request: a value orjson refuses is logged as its text."""
    try:
        return orjson.dumps(data, default=str)
    except orjson.JSONEncodeError:
        return orjson.dumps(lenient(data), default=str)


_iso_time = SecondFormatter("%Y-%m-%dT%H:%M:%S", "Z")


def add_timestamp(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """ISO-8601 UTC with milliseconds, formatted once per second (structlog's TimeStamper formats every line)."""
    event_dict["timestamp"] = _iso_time(time.time())
    return event_dict


class BufferedLineLogger:
    """Writes rendered lines into a large buffer instead of one write and flush per line.

    A request's log line must not cost a system call (or block on a full pipe) on the event loop: a
    daemon thread flushes the buffer every FLUSH_SECONDS, and `flush()` runs at shutdown and exit.
    """

    def __init__(self, fileno: int, buffer_size: int = LOG_BUFFER_BYTES) -> None:
        self._out = io.BufferedWriter(io.FileIO(fileno, "wb", closefd=False), buffer_size=buffer_size)
        self._thread = threading.Thread(target=self._flush_forever, name="log-flusher", daemon=True)
        self._thread.start()
        atexit.register(self.flush)

    def msg(self, message: bytes | str) -> None:
        text = message.encode(errors="backslashreplace") if isinstance(message, str) else message
        self._out.write(text + b"\n")

    debug = info = warning = warn = error = critical = exception = log = failure = fatal = msg

    def flush(self) -> None:
        try:
            self._out.flush()
        except (OSError, ValueError):
            pass  # stdout went away: logs are best effort, the service goes on

    def _flush_forever(self) -> None:
        while True:
            time.sleep(FLUSH_SECONDS)
            self.flush()


_buffered: dict[int, BufferedLineLogger] = {}


def _buffered_logger(fileno: int) -> BufferedLineLogger:
    if fileno not in _buffered:
        _buffered[fileno] = BufferedLineLogger(fileno)
    return _buffered[fileno]


def flush_logs() -> None:
    for logger in _buffered.values():
        logger.flush()


def scrub_exception(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """structlog's `format_exc_info`, scrubbed: a logged exception's text (or a crash's `exception`
    and `traceback` fields) can quote a credential, an address, a path or the prompt. It is
    sanitised as a row's is, and a private request's is reduced to the exception's type. Every log
    line passes here: one that carries none of them costs three lookups."""
    if "exc_info" in event_dict:
        exc_info = event_dict["exc_info"]
        if exc_info and event_dict.get("private") is True:
            del event_dict["exc_info"]
            error = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1] if exc_info is True else exc_info[1]
            event_dict["exception"] = f"{type(error).__name__} (details withheld: private request)"
            return event_dict
        event_dict = structlog.processors.format_exc_info(logger, method_name, event_dict)
    if "exception" in event_dict or "traceback" in event_dict:
        for key in _EXCEPTION_KEYS:
            text = event_dict.get(key)
            if isinstance(text, str):
                event_dict[key] = sanitise(text)
    return event_dict


def processors(level: str = "info") -> list[Processor]:
    """The chain up to (not including) rendering; tests capture after it."""
    chain: list[Processor] = [TELEMETRY, StageEventFilter(level)]
    if LEVELS[level] > logging.INFO:
        chain.append(BelowLevelFilter(level))
    return [*chain, merge_request_context]


def configure_logging(log_format: str = "console", level: str = "info", *, cache_loggers: bool = False) -> None:
    """Configure structlog for the process. `cache_loggers` speeds up production; tests leave it off."""
    if log_format not in ("console", "json"):
        raise ValueError(f"log format must be 'console' or 'json', got {log_format!r}")
    chain = processors(level) + [
        drop_internal_keys,
        structlog.processors.add_log_level,
        add_timestamp,
        scrub_exception,
    ]
    if log_format == "json":
        chain.append(structlog.processors.JSONRenderer(serializer=_orjson_dumps))
    else:
        chain.append(structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty()))
    _route_aiohttp_errors(level)
    output = _buffered_logger(sys.stdout.fileno())
    factory: Any = lambda *args: output  # noqa: E731
    structlog.configure(
        processors=chain,
        wrapper_class=structlog.make_filtering_bound_logger(min(LEVELS[level], logging.INFO)),
        logger_factory=factory,
        cache_logger_on_first_use=cache_loggers,
    )


def is_configured() -> bool:
    return structlog.is_configured() and TELEMETRY in structlog.get_config()["processors"]
