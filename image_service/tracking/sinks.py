"""Where batches go: Tinybird's Events API, or a local NDJSON file when no API key is configured.

A sink sends one NDJSON body, handed over in parts so that no single copy of a large batch
stalls the event loop, and classifies the answer; retry, split, spool and breaker decisions
belong to the forwarder. Tinybird's contract (reference/tinybird.md): 200 with
`{successful_rows, quarantined_rows}` under `wait=true`; 429 retry after `Retry-After` (else
`X-RateLimit-Reset`); 5xx and transport errors retry; 413 split; 400/422 never retry (422 means
partially written: a retry would duplicate); 403/404 are configuration errors.

Compression and file writes run in a thread below the event loop (priority.py): on a busy machine
they wait for an idle core rather than take the loop's.
"""

from __future__ import annotations

import asyncio
import enum
import os
import zlib
from collections.abc import Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import aiohttp
import orjson

from ..priority import background_executor


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


class Sink(Protocol):
    name: str

    async def send(self, parts: list[bytes], rows: int) -> SendResult: ...

    async def close(self) -> None: ...


RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
MISCONFIGURED_STATUSES = frozenset({401, 403, 404})


def _retry_after(headers: Mapping[str, str]) -> float | None:
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


class _Worker:
    """A sink's thread: the caller's executor, or one of its own, ended with the sink."""

    def __init__(self, executor: Executor | None, name: str) -> None:
        self._own: ThreadPoolExecutor | None = None
        if executor is None:
            executor = self._own = background_executor(1, name)
        self.executor = executor

    def close(self) -> None:
        """Nothing is submitted after the last send has returned, so nothing is left to wait for."""
        if self._own is not None:
            self._own.shutdown(wait=False)


def _gzip(parts: list[bytes]) -> bytes:
    """One gzip member of all parts; zlib releases the GIL while it compresses each one."""
    compressor = zlib.compressobj(1, zlib.DEFLATED, 31)
    out = [compressor.compress(part) for part in parts]
    out.append(compressor.flush())
    return b"".join(out)


class TinybirdSink:
    """POST gzip'd NDJSON to `{api_url}/v0/events?name={datasource}&wait=true`."""

    name = "tinybird"

    def __init__(self, api_url: str, api_key: str, datasource: str, timeout: float, executor: Executor | None) -> None:
        if not api_key:
            raise ValueError("TinybirdSink needs an API key")
        self._url = f"{api_url.rstrip('/')}/v0/events"
        self._params = {"name": datasource, "wait": "true"}
        self._headers = {
            "Authorization": f"Bearer {api_key}",
            "Content-Type": "application/x-ndjson",
            "Content-Encoding": "gzip",
        }
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._worker = _Worker(executor, "telemetry-gzip")
        self._session: aiohttp.ClientSession | None = None

    async def send(self, parts: list[bytes], rows: int) -> SendResult:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        compressed = await asyncio.get_running_loop().run_in_executor(self._worker.executor, _gzip, parts)
        try:
            async with self._session.post(self._url, params=self._params, data=compressed, headers=self._headers) as reply:
                text = await reply.read()
                status = reply.status
                retry_after = _retry_after(reply.headers)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return SendResult(Outcome.RETRY, detail=type(exc).__name__)
        if status in (200, 202):
            quarantined = 0
            try:
                quarantined = int(orjson.loads(text).get("quarantined_rows", 0))
            except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
                pass
            return SendResult(Outcome.SENT, status, quarantined=quarantined)
        detail = text[:300].decode(errors="replace")
        if status == 413:
            return SendResult(Outcome.TOO_LARGE, status, detail=detail)
        if status in RETRY_STATUSES:
            return SendResult(Outcome.RETRY, status, retry_after=retry_after, detail=detail)
        if status in MISCONFIGURED_STATUSES:
            return SendResult(Outcome.MISCONFIGURED, status, detail=detail)
        return SendResult(Outcome.REJECTED, status, detail=detail)

    async def close(self) -> None:
        try:
            if self._session is not None:
                await self._session.close()
                self._session = None
        finally:
            self._worker.close()


class FileSink:
    """Append NDJSON to a local file: exactly the rows production would send, for a newcomer to read."""

    name = "file"

    def __init__(self, path: Path, executor: Executor | None) -> None:
        self.path = path
        self._worker = _Worker(executor, "telemetry-file")

    def _append(self, parts: list[bytes]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab") as handle:
            handle.writelines(parts)
            handle.flush()
            os.fsync(handle.fileno())

    async def send(self, parts: list[bytes], rows: int) -> SendResult:
        try:
            await asyncio.get_running_loop().run_in_executor(self._worker.executor, self._append, parts)
        except OSError as exc:
            return SendResult(Outcome.RETRY, detail=f"{type(exc).__name__}: {exc.strerror}")
        return SendResult(Outcome.SENT)

    async def close(self) -> None:
        self._worker.close()
