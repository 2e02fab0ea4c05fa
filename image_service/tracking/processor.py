"""The structlog processor that hands telemetry events to a forwarder without blocking.

It runs first in the chain, before the request context is merged in: it copies the event's own
fields, adds a reference to the request's context, and puts both onto the bounded queue of the forwarder serving the current request (or the
process default, for text events and work outside requests) and returns the event unchanged. It
never raises, never awaits and does no I/O: row building, serialisation and sending happen later,
in the forwarder.
"""

from __future__ import annotations

import time
from collections import deque
from contextvars import ContextVar
from typing import Any

from structlog.typing import EventDict, WrappedLogger

from .context import current as current_context
from .rows import TEXT_EVENT


class EventQueue:
    """A bounded FIFO of raw events; the forwarder drains it, the processor only appends."""

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"queue capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.items: deque[dict[str, Any]] = deque()
        self.enqueued = 0
        self.dropped_full = 0
        self.closed = False
        self.dropped_closed = 0

    def __len__(self) -> int:
        return len(self.items)

    def put(self, event: dict[str, Any]) -> None:
        if self.closed:
            self.dropped_closed += 1
        elif len(self.items) >= self.capacity:
            self.dropped_full += 1
        else:
            self.items.append(event)
            self.enqueued += 1

    def oldest_ts(self) -> float | None:
        return self.items[0]["_ts"] if self.items else None

    def take(self, limit: int) -> list[dict[str, Any]]:
        items = self.items
        return [items.popleft() for _ in range(min(limit, len(items)))]


_TARGET: ContextVar[EventQueue | None] = ContextVar("image_service_telemetry_target", default=None)


class TelemetryProcessor:
    """Routes stage, terminal and text events to the current forwarder's queue."""

    def __init__(self) -> None:
        self.default: EventQueue | None = None
        self.errors = 0

    def route_current_context(self, queue: EventQueue | None) -> None:
        """Send this task's events (one request) to `queue`."""
        _TARGET.set(queue)

    def __call__(self, logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
        try:
            if "stage" in event_dict:
                queue = _TARGET.get()
                if queue is None:
                    queue = self.default
                if queue is not None:
                    event = dict(event_dict)
                    event["_ts"] = time.time()
                    if event_dict.get("event") != TEXT_EVENT:
                        # A reference, not a copy: rows read the request's facts when they are built.
                        event["_ctx"] = current_context()
                    queue.put(event)
        except Exception:
            self.errors += 1
        return event_dict


TELEMETRY = TelemetryProcessor()
