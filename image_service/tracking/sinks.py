"""Where batches go: Tinybird's Events API, or a local NDJSON file when no API key is configured.

A sink sends one NDJSON body, handed over in parts so that no single copy of a large batch
stalls the event loop, and classifies the answer (contract.py); retry, split, spool and breaker
decisions belong to the forwarder.

Compression and file writes run in a thread below the event loop (priority.py): on a busy machine
they wait for an idle core rather than take the loop's.
"""

from __future__ import annotations

import asyncio
import fcntl
import glob
import os
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import aiohttp
import structlog

from ..priority import background_executor
from .contract import Endpoint, Outcome, SendResult, classify, gzip, retry_after
from .spool import write_whole

__all__ = ["FileSink", "Outcome", "SendResult", "Sink", "TinybirdSink", "rotated_files"]


class Sink(Protocol):
    name: str

    async def send(self, parts: list[bytes], rows: int) -> SendResult: ...

    async def close(self) -> None: ...


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


class TinybirdSink:
    """POST gzip'd NDJSON to `{api_url}/v0/events?name={datasource}&wait=true`."""

    name = "tinybird"

    def __init__(self, api_url: str, api_key: str, datasource: str, timeout: float, executor: Executor | None) -> None:
        if not api_key:
            raise ValueError("TinybirdSink needs an API key")
        self.endpoint = Endpoint(api_url, api_key, datasource, timeout)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._worker = _Worker(executor, "telemetry-gzip")
        self._session: aiohttp.ClientSession | None = None

    async def send(self, parts: list[bytes], rows: int) -> SendResult:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        compressed = await asyncio.get_running_loop().run_in_executor(self._worker.executor, gzip, parts)
        endpoint = self.endpoint
        try:
            async with self._session.post(endpoint.url, params=endpoint.params, data=compressed, headers=endpoint.headers) as reply:
                body = await reply.read()
                status = reply.status
                wait = retry_after(reply.headers)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return SendResult(Outcome.RETRY, detail=type(exc).__name__)
        except Exception as exc:
            # The call could not be made at all (aiohttp refusing the URL or a header, say): it will
            # not heal by itself, and the rows must still go to the spool, not vanish with the
            # exception. Only the type is told: the message could quote the key.
            return SendResult(Outcome.MISCONFIGURED, detail=type(exc).__name__)
        return classify(status, body, wait)

    async def close(self) -> None:
        try:
            if self._session is not None:
                await self._session.close()
                self._session = None
        finally:
            self._worker.close()


class FileSink:
    """Append NDJSON to a local file: exactly the rows production would send, for a newcomer to read.

    Past `max_bytes` the file is rotated, logrotate-style: `events.ndjson.1` is the newest old
    file, and the oldest beyond `keep` is deleted (0 = never rotate). Deleted rows were delivered,
    to a file someone can read: retention, not telemetry loss."""

    name = "file"

    def __init__(self, path: Path, executor: Executor | None, max_bytes: int = 0, keep: int = 1) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self._worker = _Worker(executor, "telemetry-file")
        self._rotation_failed = False

    def _append(self, parts: list[bytes]) -> str | None:
        """The batch in one write to a file opened for appending, under a lock on the directory:
        the workers of `serve --workers N` share the file, a buffered writer would interleave their
        batches mid-row, and two of them rotating at once would shift one file twice. The answer
        is why rotation failed, if it did: the batch is in the file all the same."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = b"".join(parts)
        directory = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(directory, fcntl.LOCK_EX)
            descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                before = os.fstat(descriptor).st_size
                write_whole(descriptor, data, before, sync=True)
                size = before + len(data)
            finally:
                os.close(descriptor)
            if not self.max_bytes or size < self.max_bytes:
                return None
            try:
                self._rotate()
            except OSError as exc:
                return f"{type(exc).__name__}: {exc.strerror}"
            return None
        finally:
            os.close(directory)

    def _rotate(self) -> None:
        """Oldest first, so that no rename lands on a file not yet moved."""
        for number, old in reversed(_numbered(self.path)):
            if number >= self.keep:
                old.unlink()
            else:
                old.rename(self.path.with_name(f"{self.path.name}.{number + 1}"))
        self.path.rename(self.path.with_name(f"{self.path.name}.1"))

    async def send(self, parts: list[bytes], rows: int) -> SendResult:
        try:
            failed = await asyncio.get_running_loop().run_in_executor(self._worker.executor, self._append, parts)
        except OSError as exc:
            return SendResult(Outcome.RETRY, detail=f"{type(exc).__name__}: {exc.strerror}")
        if failed and not self._rotation_failed:
            self._rotation_failed = True
            structlog.get_logger("image_service.tracking").warning("telemetry.local_rotation_failed", path=str(self.path), error=failed)
        return SendResult(Outcome.SENT)

    async def close(self) -> None:
        self._worker.close()


def _numbered(path: Path) -> list[tuple[int, Path]]:
    found = [
        (int(suffix), candidate)
        for candidate in path.parent.glob(f"{glob.escape(path.name)}.*")
        if (suffix := candidate.name[len(path.name) + 1:]).isascii() and suffix.isdigit() and candidate.is_file()
    ]
    return sorted(found)


def rotated_files(path: Path) -> list[Path]:
    """`path`'s rotated files, newest first (`path.1`, `path.2`, …)."""
    return [candidate for _, candidate in _numbered(path)]
