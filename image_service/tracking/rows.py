"""Events become rows of the seed's unified schema (`pollinations_events`), privacy applied.

Every row has every column (null where it does not apply), so Tinybird never quarantines a row for
a missing field. Builders run in the forwarder, off the request path. Privacy is enforced here a
second time, whatever the event carried: private prompts, credentials, client addresses and
absolute paths never leave the process.
"""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import orjson

TERMINAL_EVENT = "request.completed"
TEXT_EVENT = "text.completion"
PRIVATE_PROMPT = "[PRIVATE]"
MAX_TEXT = 4000

# Column → ClickHouse type, in datasource order. tinybird/datasources/pollinations_events.datasource
# declares the same columns; a test keeps the two in step.
COLUMNS: dict[str, str] = {
    "event_id": "String",
    "service_type": "LowCardinality(String)",
    "stage": "LowCardinality(String)",
    "event": "LowCardinality(String)",
    "start_time": "DateTime64(3)",
    "end_time": "DateTime64(3)",
    "message_id": "String",
    "id": "String",
    "trace_id": "String",
    "duration": "UInt32",
    "duration_ms": "Float64",
    "user": "String",
    "username": "Nullable(String)",
    "tier": "LowCardinality(String)",
    "status": "LowCardinality(String)",
    "http_status": "Nullable(UInt16)",
    "error": "Nullable(String)",
    "log_event_type": "LowCardinality(String)",
    "call_type": "LowCardinality(String)",
    "model": "LowCardinality(String)",
    "provider": "Nullable(String)",
    "backend": "Nullable(String)",
    "cost": "Float64",
    "prompt_tokens": "Nullable(UInt32)",
    "completion_tokens": "Nullable(UInt32)",
    "cached_tokens": "Nullable(UInt32)",
    "prompt": "Nullable(String)",
    "width": "Nullable(UInt16)",
    "height": "Nullable(UInt16)",
    "seed": "Nullable(String)",
    "steps": "Nullable(UInt16)",
    "guidance": "Nullable(Float32)",
    "nologo": "Nullable(Bool)",
    "enhance": "Nullable(Bool)",
    "private": "Nullable(Bool)",
    "nofeed": "Nullable(Bool)",
    "is_child": "Nullable(Bool)",
    "is_mature": "Nullable(Bool)",
    "was_transformed": "Nullable(Bool)",
    "cache_status": "Nullable(String)",
    "referrer": "Nullable(String)",
    "proxy_metadata": "String",
    "exception": "Nullable(String)",
    "traceback": "Nullable(String)",
}

# Stage events → log_event_type of their rows; terminal rows get theirs from the outcome.
STAGE_EVENT_TYPES = {
    "request.received": "request_received",
    "cache.lookup": "cache_lookup",
    "generation.completed": "generation_completed",
    "generation.failed": "generation_failed",
    "moderation.verdict": "moderation_verdict",
    "content.flagged": "content_flagged",
}

_CREDENTIAL_URL = re.compile(r"([a-z][a-z0-9+.-]*://)[^/\s:@]+(:[^/\s@]*)?@", re.I)
_SECRET_ASSIGNMENT = re.compile(
    r"\b(token|api[_-]?key|apikey|key|secret|password|passwd|authorization|auth)(\s*[=:]\s*|\s+)"
    r"(bearer\s+)?[^\s&,;\"']+",
    re.I,
)
_BEARER = re.compile(r"\bbearer\s+[A-Za-z0-9._~+/=-]+", re.I)
_KEY_LIKE = re.compile(r"\b(sk|pk|tb|p)[-_][A-Za-z0-9._-]{12,}\b")
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])(/[\w.@+-]+){2,}/?")
_IPV4 = re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b")


def sanitise(text: str | None) -> str | None:
    """Remove credentials, client addresses and absolute paths from free text (exceptions, tracebacks)."""
    if not text:
        return text
    text = _CREDENTIAL_URL.sub(r"\1***@", text)
    text = _BEARER.sub("Bearer ***", text)
    text = _SECRET_ASSIGNMENT.sub(lambda m: f"{m.group(1)}{m.group(2)}***", text)
    text = _KEY_LIKE.sub("***", text)
    text = _JWT.sub("***", text)
    text = _ABSOLUTE_PATH.sub(lambda m: "<path>/" + m.group(0).rstrip("/").rsplit("/", 1)[-1], text)
    text = _IPV4.sub("<ip>", text)
    return text[:MAX_TEXT]


def public_referrer(value: Any) -> str | None:
    """A referrer as scheme://host/path: its query string can carry tokens."""
    if not value:
        return None
    text = str(value)
    parts = urlsplit(text)
    if parts.scheme and parts.netloc:
        host = parts.hostname or ""
        return f"{parts.scheme}://{host}{parts.path}"[:512]
    return sanitise(text.split("?", 1)[0][:512])


def format_time(epoch: float) -> str:
    """DateTime64(3) text as Tinybird's JSON ingestion and ClickHouse parse it."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _status_word(http_status: int | None, event_name: str) -> str:
    if event_name == "content.flagged" or http_status == 451:
        return "content_violation"
    if event_name == "generation.failed" or (http_status is not None and http_status >= 500):
        return "error"
    if http_status is not None and http_status >= 400:
        return "rejected"
    return "success"


def _terminal_type(http_status: int, cache_status: str | None) -> str:
    if http_status >= 500:
        return "image_generation_error"
    if http_status == 451:
        return "content_flagged"
    if http_status >= 400:
        return "image_request_rejected"
    if cache_status == "hit":
        return "image_served_from_cache"
    return "image_generation"


def _as_bool(value: Any) -> bool | None:
    return None if value is None else bool(value)


def _as_int(value: Any, upper: int) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if 0 <= number <= upper else None


def _metadata(event: dict[str, Any], environment: str) -> str:
    data = {
        "organization": "pollinations",
        "project": f"{event.get('service_type', 'image')}.pollinations.ai",
        "environment": environment,
    }
    for key in ("route", "method", "cache_backend", "span_id", "parent_span_id", "labels"):
        if event.get(key) is not None:
            data[key] = event[key]
    return orjson.dumps(data, default=str).decode()


def build_row(event: dict[str, Any], environment: str = "development") -> dict[str, Any]:
    """The row for one event (an image stage event, a terminal event, or a text completion)."""
    name = str(event.get("event", ""))
    end = float(event.get("_ts", 0.0))
    start = float(event.get("request_start", end))
    text = name == TEXT_EVENT
    terminal = name == TERMINAL_EVENT
    http_status = _as_int(event.get("status") if not text else event.get("http_status"), 999)
    request_id = str(event.get("request_id") or secrets.token_hex(16))
    private = bool(event.get("private"))
    prompt = event.get("prompt")
    if private and prompt is not None:
        prompt = PRIVATE_PROMPT
    exception = event.get("exception")
    duration_ms = event.get("duration_ms")
    if text:
        log_event_type = str(event.get("log_event_type") or "completion")
        status = str(event.get("status") or "success")
    elif terminal:
        log_event_type = _terminal_type(http_status or 0, event.get("cache_status"))
        status = _status_word(http_status, name)
    else:
        log_event_type = STAGE_EVENT_TYPES.get(name, name.replace(".", "_"))
        status = _status_word(None, name)
    seed = event.get("seed")
    return {
        "event_id": event.get("event_id") or secrets.token_hex(16),
        "service_type": "text" if text else "image",
        "stage": str(event.get("stage") or ("text" if text else "")),
        "event": name,
        "start_time": format_time(start),
        "end_time": format_time(end),
        "message_id": request_id,
        "id": request_id,
        "trace_id": str(event.get("trace_id") or request_id),
        "duration": max(0, round(float(duration_ms))) if isinstance(duration_ms, int | float) else 0,
        "duration_ms": max(0.0, float(duration_ms)) if isinstance(duration_ms, int | float) else 0.0,
        "user": str(event.get("user") or "anonymous"),
        "username": event.get("username"),
        "tier": str(event.get("tier") or "anonymous"),
        "status": status,
        "http_status": http_status,
        "error": event.get("error"),
        "log_event_type": log_event_type,
        "call_type": "completion" if text else "image_generation",
        "model": str(event.get("model") or "unknown"),
        "provider": event.get("provider"),
        "backend": event.get("backend"),
        "cost": float(event.get("cost") or 0.0),
        "prompt_tokens": _as_int(event.get("prompt_tokens"), 2**32 - 1),
        "completion_tokens": _as_int(event.get("completion_tokens"), 2**32 - 1),
        "cached_tokens": _as_int(event.get("cached_tokens"), 2**32 - 1),
        "prompt": None if text or prompt is None else str(prompt)[:MAX_TEXT],
        "width": _as_int(event.get("width"), 65535),
        "height": _as_int(event.get("height"), 65535),
        "seed": None if seed is None else str(seed),
        "steps": _as_int(event.get("steps"), 65535),
        "guidance": None if event.get("guidance") is None else float(event["guidance"]),
        "nologo": _as_bool(event.get("nologo")),
        "enhance": _as_bool(event.get("enhance")),
        "private": None if text else private,
        "nofeed": _as_bool(event.get("nofeed")),
        "is_child": _as_bool(event.get("is_child")),
        "is_mature": _as_bool(event.get("is_mature")),
        "was_transformed": _as_bool(event.get("was_transformed")),
        "cache_status": event.get("cache_status"),
        "referrer": public_referrer(event.get("referrer")),
        "proxy_metadata": _metadata(event, environment),
        "exception": sanitise(str(exception)) if exception else None,
        "traceback": sanitise(event.get("traceback")),
    }
