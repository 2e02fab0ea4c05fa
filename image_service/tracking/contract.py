"""Tinybird's Events API contract (reference/tinybird.md), shared by the in-process sink and the
encoder process's courier: what a call looks like, and what its answer means.

- `POST {api_url}/v0/events?name={datasource}&wait=true`, `Authorization: Bearer {key}`, a gzip'd
  NDJSON body;
- 200/202 with `{successful_rows, quarantined_rows}`; 413 split; 408/429/5xx and transport errors
  retry (after `Retry-After`, else `X-RateLimit-Reset`); 401/403/404 are configuration errors;
  400/422 and anything else are never retried (422 means partially written: a retry would
  duplicate).

Only the standard library, orjson and isal: the encoder process imports this without aiohttp.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlencode

import orjson
from isal import isal_zlib

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
MISCONFIGURED_STATUSES = frozenset({401, 403, 404})
DETAIL_BYTES = 300


class Outcome(enum.Enum):
    SENT = "sent"
    RETRY = "retry"
    TOO_LARGE = "too_large"
    REJECTED = "rejected"
    MISCONFIGURED = "misconfigured"


@dataclass(frozen=True, slots=True)
class SendResult:
    outcome: Outcome
    status: int | None = None
    quarantined: int = 0
    retry_after: float | None = None
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where and how rows are posted; `key` is a secret, never logged."""

    api_url: str
    key: str = field(repr=False)
    datasource: str
    timeout: float

    @property
    def url(self) -> str:
        return f"{self.api_url.rstrip('/')}/v0/events"

    @property
    def params(self) -> dict[str, str]:
        return {"name": self.datasource, "wait": "true"}

    @property
    def url_with_query(self) -> str:
        return f"{self.url}?{urlencode(self.params)}"

    @property
    def headers(self) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {self.key}",
            "Content-Type": "application/x-ndjson",
            "Content-Encoding": "gzip",
        }


class Headers(Protocol):
    """aiohttp's and http.client's answer headers alike (both look names up case-insensitively)."""

    def get(self, name: str, /) -> Any: ...


def retry_after(headers: Headers) -> float | None:
    """Seconds to wait before retrying, from `Retry-After`, else `X-RateLimit-Reset` (capped at 5 min)."""
    for name in ("Retry-After", "X-RateLimit-Reset"):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value)
        except ValueError:
            continue
        if seconds >= 0:
            return min(seconds, 300.0)
    return None


def classify(status: int, body: bytes, wait: float | None) -> SendResult:
    """What an answer means for the batch; `wait` is the answer's `retry_after`."""
    if status in (200, 202):
        quarantined = 0
        try:
            quarantined = int(orjson.loads(body).get("quarantined_rows", 0))
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
            pass
        return SendResult(Outcome.SENT, status, quarantined=quarantined)
    detail = body[:DETAIL_BYTES].decode(errors="replace")
    if status == 413:
        return SendResult(Outcome.TOO_LARGE, status, detail=detail)
    if status in RETRY_STATUSES:
        return SendResult(Outcome.RETRY, status, retry_after=wait, detail=detail)
    if status in MISCONFIGURED_STATUSES:
        return SendResult(Outcome.MISCONFIGURED, status, detail=detail)
    return SendResult(Outcome.REJECTED, status, detail=detail)


def gzip(parts: list[bytes]) -> bytes:
    """One gzip member of all parts, by ISA-L (python-isal): ~15 times zlib's speed at level 1 on
    these rows, and smaller. Its CPU is taken from the server's other core (or, when the encoder
    process is not used, from a thread), and on a machine whose cores share execution units, from
    the event loop's too. It releases the GIL while it compresses, as zlib does."""
    compressor = isal_zlib.compressobj(1, isal_zlib.DEFLATED, 31)
    out = [compressor.compress(part) for part in parts]
    out.append(compressor.flush())
    return b"".join(out)
