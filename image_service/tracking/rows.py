"""Events become rows of the seed's unified schema (`pollinations_events`), privacy applied.

Every row has every column (null where it does not apply), so Tinybird never quarantines a row for
a missing field. Builders run in the forwarder, off the request path. Privacy is enforced here a
second time, whatever the event carried: private prompts, credentials, client addresses and
absolute paths never leave the service.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from collections import Counter
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import orjson

from .context import request_ids

TERMINAL_EVENT = "request.completed"
TEXT_EVENT = "text.completion"
PRIVATE_PROMPT = "[PRIVATE]"
MAX_TEXT = 4000
UINT16 = 2**16 - 1
UINT32 = 2**32 - 1

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

# A password may hold '@': the credentials run to the last '@' before the path.
# The look-behind starts a scheme only where one can start: else "a-a-a-..." is read from every one
# of its letters to the end, in quadratic time.
_CREDENTIAL_URL = re.compile(r"(?<![a-z0-9+.-])([a-z][a-z0-9+.-]*://)[^\s/?#]*@", re.I)
_COOKIE = re.compile(r"\b((?:set-)?cookie\s*:)[^\r\n]*", re.I)
# A name that says "secret" (also as the end of a longer one: access_token, client_secret,
# x-api-key), then `=`, `:` or a space, quoted or not, then the value; names that are ordinary
# words too ("session is closed", "signature mismatch") only before `=` or `:`.
_SECRET_ASSIGNMENT = re.compile(
    r"(?<![A-Za-z0-9])((?:token|api[_-]?key|apikey|key|secret|password|passwd|authorization|auth)"
    r"([\"']?\s*[=:]\s*[\"']?|\s+)|(?:pwd|signature|credentials?|session|sid)([\"']?\s*[=:]\s*[\"']?))"
    r"((?:bearer|basic)\s+)?[^\s&,;\"']+",
    re.I,
)
_BEARER = re.compile(r"\b(bearer)\s+[A-Za-z0-9._~+/=-]+", re.I)
# Basic credentials are base64 of "user:password": only such a value is one.
_BASIC = re.compile(r"\b(basic)\s+([A-Za-z0-9+/]{4,}={0,2})", re.I)
# Cut before scrubbing: every pattern then runs over a bounded text, whatever an exception says.
MAX_SCRUBBED = 4 * MAX_TEXT
_KEY_LIKE = re.compile(r"\b(sk|pk|tb|p)[-_][A-Za-z0-9._-]{12,}\b")
# Tokens with a vendor's own shape: GitHub, Slack (and its webhook paths), AWS access key ids.
_VENDOR_TOKEN = re.compile(
    r"\b(?:gh[pousr]_[A-Za-z0-9]{20,}|github_pat_\w{20,}|xox[abprs]-[A-Za-z0-9-]{10,}|AKIA[0-9A-Z]{16})\b"
    r"|hooks\.slack\.com/services/[\w/]+"
)
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])(/[\w.@+-]+){2,}/?")
_IPV4 = re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b")
# What could be an IPv6 address (two colons at least); only a valid one is replaced ("12:30:45" stays).
_IPV6_CANDIDATE = re.compile(r"(?<![\w:.])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:])")


def _ipv6(match: re.Match[str]) -> str:
    try:
        ipaddress.IPv6Address(match.group())
    except ValueError:
        return match.group()
    return "<ip>"


def _basic(match: re.Match[str]) -> str:
    try:
        credentials = base64.b64decode(match.group(2), validate=True)
    except ValueError:
        return match.group()
    return f"{match.group(1)} ***" if b":" in credentials else match.group()


def sanitise(text: str | None) -> str | None:
    """Remove credentials, client addresses and absolute paths from free text (exceptions, tracebacks)."""
    if not text:
        return text
    text = text[:MAX_SCRUBBED]
    text = _CREDENTIAL_URL.sub(r"\1***@", text)
    text = _COOKIE.sub(r"\1 ***", text)
    text = _SECRET_ASSIGNMENT.sub(lambda m: f"{m.group(1)}{m.group(4) or ''}***", text)
    text = _BEARER.sub(lambda m: f"{m.group(1)} ***", text)
    text = _BASIC.sub(_basic, text)
    text = _KEY_LIKE.sub("***", text)
    text = _VENDOR_TOKEN.sub("***", text)
    text = _JWT.sub("***", text)
    text = _ABSOLUTE_PATH.sub(lambda m: "<path>/" + m.group(0).rstrip("/").rsplit("/", 1)[-1], text)
    text = _IPV4.sub("<ip>", text)
    text = _IPV6_CANDIDATE.sub(_ipv6, text)
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
    return value if value is None or value is True or value is False else bool(value)


def _as_int(value: Any, upper: int) -> int | None:
    if value is None or value is True or value is False:
        return None
    if type(value) is not int:
        try:
            value = int(value)
        except (TypeError, ValueError):
            return None
    return value if 0 <= value <= upper else None


class SecondFormatter:
    """Formats epoch seconds with millisecond precision in UTC, re-using the formatted second
    (events come in bursts, so strftime runs about once a second instead of once an event)."""

    def __init__(self, pattern: str, suffix: str = "") -> None:
        self._pattern, self._suffix = pattern, suffix
        self._second = -1
        self._prefix = ""

    def __call__(self, epoch: float) -> str:
        second = int(epoch)
        if second != self._second:
            self._second, self._prefix = second, datetime.fromtimestamp(second, UTC).strftime(self._pattern)
        return f"{self._prefix}.{int((epoch - second) * 1000):03d}{self._suffix}"


# DateTime64(3) text, as Tinybird's JSON ingestion and ClickHouse parse it.
format_time = SecondFormatter("%Y-%m-%d %H:%M:%S")


def _metadata(get: Any, environment: str, service_type: str) -> str:
    data = {"organization": "pollinations", "project": f"{service_type}.pollinations.ai", "environment": environment}
    for key in ("route", "method", "cache_backend", "span_id", "parent_span_id", "labels"):
        value = get(key)
        if value is not None:
            data[key] = value
    return orjson.dumps(data, default=str).decode()


# Columns that describe one event; the others describe its request and are equal on all its rows.
EVENT_COLUMNS = (
    "event_id", "service_type", "stage", "event", "end_time", "duration", "duration_ms", "status", "http_status",
    "error", "log_event_type", "provider", "backend", "cost", "is_child", "is_mature", "cache_status",
    "proxy_metadata", "exception", "traceback",
)
REQUEST_COLUMNS = tuple(column for column in COLUMNS if column not in EVENT_COLUMNS)
# The fields an image event's outcome columns follow from (`_outcome_columns`).
OUTCOME_FIELDS = ("event", "stage", "status", "error", "provider", "backend", "cost", "is_child", "is_mature", "cache_status")
# Distinct outcomes kept serialised; past this many the encoder starts again (a few dozen in practice).
OUTCOME_CACHE = 4096


def _timing_columns(get: Any) -> dict[str, Any]:
    """The columns no two events share: the row's id and its event's time and duration."""
    duration_ms = get("duration_ms")
    duration_ms = float(duration_ms) if isinstance(duration_ms, (int, float)) and duration_ms > 0 else 0.0
    return {
        "event_id": get("event_id") or request_ids.next(),
        "end_time": format_time(float(get("_ts") or 0.0)),
        "duration": round(duration_ms),
        "duration_ms": duration_ms,
    }


def _outcome_columns(get: Any) -> dict[str, Any]:
    """What happened, as columns: the event, its status and the generation's facts."""
    name = str(get("event") or "")
    text = name == TEXT_EVENT
    service_type = "text" if text else "image"
    http_status = _as_int(get("http_status") if text else get("status"), 999)
    if text:
        log_event_type = str(get("log_event_type") or "completion")
        status = str(get("status") or _status_word(http_status, name))
    elif name == TERMINAL_EVENT:
        log_event_type = _terminal_type(http_status or 0, get("cache_status"))
        status = _status_word(http_status, name)
    else:
        log_event_type = STAGE_EVENT_TYPES.get(name) or name.replace(".", "_")
        status = _status_word(None, name)
    return {
        "service_type": service_type,
        "stage": str(get("stage") or service_type),
        "event": name,
        "status": status,
        "http_status": http_status,
        "error": get("error"),
        "log_event_type": log_event_type,
        "provider": get("provider"),
        "backend": get("backend"),
        "cost": float(get("cost") or 0.0),
        "is_child": _as_bool(get("is_child")),
        "is_mature": _as_bool(get("is_mature")),
        "cache_status": get("cache_status"),
    }


def _event_columns(get: Any, environment: str, metadata: str | None = None) -> dict[str, Any]:
    columns = _timing_columns(get)
    columns.update(_outcome_columns(get))
    exception = get("exception")
    traceback = get("traceback")
    columns["proxy_metadata"] = metadata if metadata is not None else _metadata(get, environment, columns["service_type"])
    columns["exception"] = sanitise(str(exception)) if exception else None
    columns["traceback"] = sanitise(str(traceback)) if traceback else None
    return columns


def _request_columns(get: Any, text: bool) -> dict[str, Any]:
    start = get("request_start")
    if start is None:
        start = get("_ts") or 0.0
    request_id = str(get("request_id") or request_ids.next())
    private = bool(get("private"))
    prompt = None if text else get("prompt")
    if private and prompt is not None:
        prompt = PRIVATE_PROMPT
    elif prompt is not None:
        prompt = str(prompt)[:MAX_TEXT]
    seed = get("seed")
    guidance = get("guidance")
    referrer = get("referrer")
    return {
        "start_time": format_time(float(start)),
        "message_id": request_id,
        "id": request_id,
        "trace_id": str(get("trace_id") or request_id),
        "user": str(get("user") or "anonymous"),
        "username": get("username"),
        "tier": str(get("tier") or "anonymous"),
        "call_type": "completion" if text else "image_generation",
        "model": str(get("model") or "unknown"),
        "prompt_tokens": _as_int(get("prompt_tokens"), UINT32),
        "completion_tokens": _as_int(get("completion_tokens"), UINT32),
        "cached_tokens": _as_int(get("cached_tokens"), UINT32),
        "prompt": prompt,
        "width": _as_int(get("width"), UINT16),
        "height": _as_int(get("height"), UINT16),
        "seed": None if seed is None else str(seed),
        "steps": _as_int(get("steps"), UINT16),
        "guidance": None if guidance is None else float(guidance),
        "nologo": _as_bool(get("nologo")),
        "enhance": _as_bool(get("enhance")),
        "private": None if text else private,
        "nofeed": _as_bool(get("nofeed")),
        "was_transformed": _as_bool(get("was_transformed")),
        "referrer": public_referrer(referrer) if referrer else None,
    }


def is_row_line(line: bytes) -> bool:
    """Whether an NDJSON line holds a row at all (a JSON object): not blank, not torn by a crash."""
    try:
        return isinstance(orjson.loads(line), dict)
    except orjson.JSONDecodeError:
        return False


def build_row(event: dict[str, Any], environment: str = "development") -> dict[str, Any]:
    """The row for one self-contained event (a text completion, or an event with its context merged in)."""
    get = event.get
    parts = _event_columns(get, environment)
    parts.update(_request_columns(get, parts["service_type"] == "text"))
    return {column: parts[column] for column in COLUMNS}


class RowEncoder:
    """Serialises events to NDJSON rows, encoding each request's columns once per batch.

    The processor attaches the request's live context to an image event (`_ctx`) instead of copying
    it. By the time a batch is encoded the request has usually finished, so all its rows carry the
    request's final facts (user, tier, model, prompt...); each row's event columns come from the
    event itself, falling back to the context (for `cache_status`, `backend` and the like). Within a
    batch every event of a request sees the same context (the live dict, or equal copies of it when
    the batch was shipped to the encoder process), so the request id is the cache key (the
    context's identity for a context without one).

    An image event's outcome columns are serialised once for all events that agree on
    OUTCOME_FIELDS (their JSON is the key: `1`, `1.0` and `true` stay apart), so a row costs its
    timing columns and a join: building every column of every row cost the encoder process ~6 µs a
    row of Python.
    """

    def __init__(self, environment: str) -> None:
        self._environment = environment
        # Request id (or context identity) → (context, its columns' JSON without braces, proxy_metadata,
        # and proxy_metadata as the row's JSON member).
        self._requests: dict[str | int, tuple[dict[str, Any], bytes, str, bytes]] = {}
        # OUTCOME_FIELDS as JSON → the outcome columns' JSON without braces, exception and traceback null.
        self._outcomes: dict[bytes, bytes] = {}

    def encode(self, event: dict[str, Any]) -> bytes:
        context = event.get("_ctx")
        if context is None:
            return orjson.dumps(build_row(event, self._environment), option=orjson.OPT_APPEND_NEWLINE)
        # A context without a request id is known by identity, and kept alive while cached so
        # that its id cannot be reused by another.
        key = context.get("request_id") or id(context)
        known = self._requests.get(key)
        if known is None or (type(key) is int and known[0] is not context):
            request_json = orjson.dumps(_request_columns(context.get, False))
            metadata = _metadata(context.get, self._environment, "image")
            known = self._requests[key] = (
                context, request_json[1:-1], metadata, b'"proxy_metadata":' + orjson.dumps(metadata),
            )
        merged = context.copy()
        merged.update(event)
        get = merged.get
        outcome = None
        if "labels" not in event and not get("exception") and not get("traceback"):
            outcome = self._outcome(get)
        if outcome is None:
            event_json = orjson.dumps(
                _event_columns(get, self._environment, None if "labels" in event else known[2])
            )
            return b"".join((event_json[:-1], b",", known[1], b"}\n"))
        timing = orjson.dumps(_timing_columns(get))
        return b"".join((timing[:-1], b",", outcome, known[3], b",", known[1], b"}\n"))

    def _outcome(self, get: Any) -> bytes | None:
        """The outcome columns' JSON, followed by a comma; None for an event that needs them built
        whole. They are built from the key decoded, not from the event: a value that serialises
        like another (a tuple like a list, NaN like null) cannot give its outcome to the other."""
        try:
            key = orjson.dumps(tuple(map(get, OUTCOME_FIELDS)))
        except orjson.JSONEncodeError:
            return None
        outcome = self._outcomes.get(key)
        if outcome is None:
            fields = dict(zip(OUTCOME_FIELDS, orjson.loads(key), strict=True))
            if fields["event"] == TEXT_EVENT:
                return None
            if len(self._outcomes) >= OUTCOME_CACHE:
                self._outcomes.clear()
            columns = _outcome_columns(fields.get)
            columns["exception"] = columns["traceback"] = None
            outcome = self._outcomes[key] = orjson.dumps(columns)[1:-1] + b","
        return outcome

    def encode_all(self, events: list[dict[str, Any]], failures: Counter[str]) -> list[bytes]:
        """Rows of `events`; an event that cannot be encoded is counted in `failures` by error type."""
        lines = []
        for event in events:
            try:
                lines.append(self.encode(event))
            except Exception as exc:
                failures[type(exc).__name__] += 1
        return lines

    def reset(self) -> None:
        """Forget the encoded requests (after a batch), releasing their contexts."""
        self._requests.clear()
