"""Where pipe results come from: the deployed Tinybird pipes, or the same pipes run locally on chdb.

Both answer Tinybird's shape, `{meta, data, rows, statistics}`, so `stats`, `alerts` and the
dashboard do not care which one they talk to. The local source runs ClickHouse in an executor
thread: the event loop never waits on a query.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import orjson

from ..config import Settings
from .datafile import PROJECT_DIR
from .engine import AnalyticsError

READ_TOKEN_ENV = "TINYBIRD_READ_TOKEN"
BUCKETS = ("minute", "hour", "day")
DASHBOARD_PIPES = (
    "request_volume", "error_rates", "cache_hit_rate", "tier_distribution", "content_violations",
    "latency_percentiles", "anomalies",
)
_DATETIME = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}")
_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
_NUMBER = re.compile(r"-?\d+(\.\d+)?")
INT32_MAX = 2**31 - 1
PARAMETERS = (
    "start", "end", "since", "bucket", "service_type", "model", "max_error_rate", "max_p95_ms", "factor",
    "min_error_rate", "min_p95_rise_ms", "min_requests",
)
# A pipe and its parameters.
Query = tuple[str, Mapping[str, str]]
NUMBERS = ("max_error_rate", "max_p95_ms", "factor", "min_error_rate", "min_p95_rise_ms", "min_requests")


def _is_time(text: str) -> bool:
    """A real moment, not just its shape: the pipes' DateTime() refuses month 13, and the source
    would answer that as unavailable rather than as the client's mistake."""
    if not _DATETIME.fullmatch(text):
        return False
    try:
        datetime.strptime(text, "%Y-%m-%d %H:%M:%S")
    except ValueError:
        return False
    return True


def check_params(params: Mapping[str, Any]) -> dict[str, str]:
    """Pipe parameters as Tinybird takes them (strings), refused with a message naming the bad one."""
    checked: dict[str, str] = {}
    for key, value in params.items():
        if value is None or value == "":
            continue
        text = str(value)
        if key not in PARAMETERS:
            raise ValueError(f"unknown parameter {key!r} (known: {', '.join(PARAMETERS)})")
        if key == "bucket" and text not in BUCKETS:
            raise ValueError("bucket must be minute, hour or day")
        if key in ("start", "end", "since") and not _is_time(text):
            raise ValueError(f"{key} must be 'YYYY-MM-DD HH:MM:SS' (UTC)")
        if key in ("service_type", "model") and not _NAME.fullmatch(text):
            raise ValueError(f"{key} must be a plain name")
        if key in NUMBERS and not _NUMBER.fullmatch(text):
            raise ValueError(f"{key} must be a number")
        if key == "min_requests" and not (text.isdigit() and int(text) <= INT32_MAX):
            raise ValueError(f"min_requests must be a whole number from 0 to {INT32_MAX}")
        checked[key] = text
    if "start" in checked and "end" in checked and checked["start"] >= checked["end"]:
        # Same format, so the text order is the time order: an empty range is a mistake, not "no traffic".
        raise ValueError("start must be before end")
    return checked


class PipeSource(Protocol):
    name: str

    async def run(self, pipe: str, params: Mapping[str, str]) -> dict[str, Any]: ...

    async def run_many(self, queries: Sequence[Query]) -> dict[str, dict[str, Any]]: ...

    async def close(self) -> None: ...


class LocalSource:
    """The pipes over the local NDJSON sink, in embedded ClickHouse (built on first use)."""

    name = "local"

    def __init__(self, events: Path, executor: Executor | None = None, project: Path = PROJECT_DIR) -> None:
        self.events = events
        self.project = project
        self._executor = executor
        self._engine: Any = None
        # Callers run in a thread pool: one engine, and one load-and-query at a time (chdb runs one
        # query at a time anyway), or a query can run against a table another thread is reloading.
        self._lock = threading.Lock()

    def run_sync(self, queries: Sequence[Query]) -> dict[str, dict[str, Any]]:
        """The pipes over one load of the file, under the lock throughout: the answers of one
        dashboard refresh are one snapshot (rows that landed between two pipes made their totals
        disagree), and no other caller reloads the table under a query."""
        with self._lock:
            if self._engine is None:
                try:
                    from .engine import LocalEngine
                except ImportError:
                    raise AnalyticsError("local analytics need chdb: pip install 'image-service[analytics]'") from None
                self._engine = LocalEngine(self.project)
            self._engine.load_file(self.events)
            return {pipe: dict(self._engine.run_pipe(pipe, params)) for pipe, params in queries}

    async def run(self, pipe: str, params: Mapping[str, str]) -> dict[str, Any]:
        return (await self.run_many([(pipe, params)]))[pipe]

    async def run_many(self, queries: Sequence[Query]) -> dict[str, dict[str, Any]]:
        frozen = [(pipe, dict(params)) for pipe, params in queries]
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.run_sync, frozen)

    async def close(self) -> None:
        if self._engine is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._engine.close)
            self._engine = None


class TinybirdSource:
    """`GET {api_url}/v0/pipes/{pipe}.json` with a read token."""

    name = "tinybird"

    def __init__(self, api_url: str, token: str, timeout: float = 10.0) -> None:
        if not token:
            raise ValueError(f"reading Tinybird pipes needs a read token ({READ_TOKEN_ENV})")
        self._base = api_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"}
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def run(self, pipe: str, params: Mapping[str, str]) -> dict[str, Any]:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        url = f"{self._base}/v0/pipes/{pipe}.json"
        try:
            async with self._session.get(url, params=dict(params), headers=self._headers) as reply:
                body = await reply.read()
                status = reply.status
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise AnalyticsError(f"{pipe}: Tinybird did not answer ({type(exc).__name__})") from None
        try:
            answer = orjson.loads(body)
        except orjson.JSONDecodeError:
            answer = None
        if status != 200 or not isinstance(answer, dict) or not isinstance(answer.get("data"), list):
            detail = answer.get("error") if isinstance(answer, dict) else body[:200].decode(errors="replace")
            raise AnalyticsError(f"{pipe}: Tinybird answered {status}: {detail}")
        return answer

    async def run_many(self, queries: Sequence[Query]) -> dict[str, dict[str, Any]]:
        answers = await asyncio.gather(*(self.run(pipe, params) for pipe, params in queries))
        return {pipe: answer for (pipe, _), answer in zip(queries, answers, strict=True)}

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def make_source(settings: Settings, executor: Executor | None = None, choice: str | None = None) -> PipeSource:
    """Tinybird when asked for, or when a read token is set and nothing was asked; else local."""
    token = os.environ.get(READ_TOKEN_ENV, "")
    choice = choice or ("tinybird" if token else "local")
    if choice == "tinybird":
        return TinybirdSource(settings.tracking.api_url, token)
    return LocalSource(Path(settings.tracking.local_path), executor)


async def run_pipes(source: PipeSource, pipes: tuple[str, ...], params: Mapping[str, str]) -> dict[str, Any]:
    """Several pipes at once: {pipe: answer}."""
    return await source.run_many([(pipe, params) for pipe in pipes])
