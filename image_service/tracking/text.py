"""The shared tracker for text completions: the same processor, forwarder and schema as images.

A text service imports `record_text_completion` and runs a `Tracking` (service.py) for its process.
"""

from __future__ import annotations

import time

import structlog

from .context import request_ids
from .processor import TELEMETRY
from .rows import TEXT_EVENT, sanitise

log = structlog.get_logger("image_service.tracking.text")


def record_text_completion(
    *,
    model: str,
    provider: str | None = None,
    cost: float = 0.0,
    prompt_tokens: int | None = None,
    completion_tokens: int | None = None,
    cached_tokens: int | None = None,
    duration_ms: float = 0.0,
    start_time: float | None = None,
    request_id: str | None = None,
    user: str | None = None,
    username: str | None = None,
    tier: str | None = None,
    status: str | None = None,
    http_status: int | None = None,
    exception: str | None = None,
    log_event_type: str = "completion",
) -> None:
    """Record one text completion; returns at once (the row is built and sent in the background).
    Without `status`, the row's status follows `http_status` as an image row's does (`success`,
    `rejected` for 4xx, `error` for 5xx).

    It hands the event to the telemetry processor itself, whatever the process's structlog
    configuration (a text service has its own, perhaps without the processor or at a level that
    drops info); the debug log line carries the same fields."""
    now = time.time()
    fields = {
        "request_id": request_id or request_ids.next(),
        "request_start": start_time if start_time is not None else now - duration_ms / 1000,
        "model": model, "provider": provider, "cost": cost, "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens, "cached_tokens": cached_tokens, "duration_ms": duration_ms,
        "user": user, "username": username, "tier": tier, "status": status, "http_status": http_status,
        # Sanitised here, not only in the row: the debug line below goes to the text service's own log.
        "exception": sanitise(exception), "log_event_type": log_event_type,
    }
    unrouted = TELEMETRY.unrouted_text
    TELEMETRY(None, "info", {"event": TEXT_EVENT, "stage": "text", **fields})
    log.debug(TEXT_EVENT, **fields)
    if TELEMETRY.unrouted_text != unrouted:
        lost = TELEMETRY.unrouted_text
        if lost & (lost - 1) == 0:  # the 1st, 2nd, 4th, 8th...: loud at first, never a flood
            log.warning("text.completion_not_recorded", lost=lost,
                        reason="no Tracking runs in this process: start it before recording completions")
