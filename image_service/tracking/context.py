"""The request context: one dict per request, in one ContextVar, merged into every event.

structlog's own contextvars keep one ContextVar per key and scan the whole context on every event;
on the cache-hit path that scan cost more than the cache lookup. A single dict is one lookup.
Stages call `bind(...)` for request-level facts; the terminal event (and its row) then carries them.
"""

from __future__ import annotations

import itertools
import os
import re
import secrets
from contextvars import ContextVar
from typing import Any

from structlog.typing import EventDict, WrappedLogger

_REQUEST: ContextVar[dict[str, Any] | None] = ContextVar("image_service_request", default=None)
_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


class _RequestIds:
    """32-hex request ids: a random per-process prefix and a counter (no syscall per request)."""

    def __init__(self) -> None:
        self.reseed()
        os.register_at_fork(after_in_child=self.reseed)

    def reseed(self) -> None:
        self._prefix = secrets.token_hex(10)
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter):012x}"


request_ids = _RequestIds()


def parse_traceparent(header: str | None) -> tuple[str, str, str] | None:
    """Return (trace_id, parent_span_id, trace_flags) of a valid W3C traceparent, else None."""
    if not header:
        return None
    match = _TRACEPARENT.match(header.strip().lower())
    if match is None or match.group(1) == "0" * 32 or match.group(2) == "0" * 16:
        return None
    return match.group(1), match.group(2), match.group(3)


def new_request(**fields: Any) -> dict[str, Any]:
    """Start a fresh context for the current task (one per HTTP request)."""
    context = dict(fields)
    _REQUEST.set(context)
    return context


def bind(**fields: Any) -> None:
    """Add request-level facts; a no-op outside a request."""
    context = _REQUEST.get()
    if context is not None:
        context.update(fields)


# The bound method itself: the telemetry processor asks for it with every request's first event.
current = _REQUEST.get


def clear() -> None:
    _REQUEST.set(None)


def merge_request_context(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """structlog processor: the request's fields under the event's own (the event wins)."""
    context = _REQUEST.get()
    if not context:
        return event_dict
    merged = context.copy()
    merged.update(event_dict)
    return merged
