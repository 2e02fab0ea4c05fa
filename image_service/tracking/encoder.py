"""Row encoding in a helper process, so a busy server spends a second core on rows, not its event loop.

Building a row costs ~9 µs of Python per event (40 columns, privacy rules, metadata); serialising the
raw event with orjson costs ~0.7 µs. Under load the forwarder therefore ships batches of raw events,
with their request contexts, over a pipe to a helper Python process (`main()` below) and gets NDJSON
rows back. The helper runs the same `RowEncoder` as the in-process path, so rows are identical
either way. It is one of the service's own processes: privacy is applied there, before any row
leaves the machine, exactly as in the in-process path.

Protocol, one reply per request:
- request: JSON arrays of events, each after its 4-byte big-endian length, then a zero length
  (the forwarder serialises events in slices, and the event loop gets a turn between them);
- reply: a 4-byte big-endian length; `>III` (rows that failed, length of the first failure's type
  name, rows encoded); that name; each row's length (native uint32); the rows. The lengths spare
  the parent a scan for newlines, which costs more than slicing the rows out.

The helper ignores SIGINT and SIGTERM (the parent decides when telemetry stops) and exits when its
stdin closes, so it never outlives the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import struct
import subprocess
import sys
import time
from array import array
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any

import orjson

from .rows import RowEncoder

_LENGTH = struct.Struct(">I")
_REPLY = struct.Struct(">III")
_END = _LENGTH.pack(0)
# After a failure the helper is not started again for this long: rows are encoded in-process meanwhile.
RETRY_SECONDS = 30.0
HELPER_COMMAND = "from image_service.tracking.encoder import main; main()"
# Seconds for one round trip (a full frame takes about 0.1 s), plus the helper's start on the first.
REPLY_TIMEOUT = 2.0
START_TIMEOUT = 10.0
PIPE_BYTES = 1 << 20
IOV_MAX = 1024


class EncoderUnavailable(Exception):
    """The helper could not encode this batch; the caller encodes it in-process."""


def encode_batch(encoder: RowEncoder, events: list[dict[str, Any]]) -> tuple[list[bytes], int, str]:
    """NDJSON rows of `events`, how many could not be encoded, and the first failure's type name."""
    lines: list[bytes] = []
    failed, first_error = 0, ""
    try:
        for event in events:
            try:
                lines.append(encoder.encode(event))
            except Exception as exc:
                failed += 1
                first_error = first_error or type(exc).__name__
    finally:
        encoder.reset()
    return lines, failed, first_error


class EncoderProcess:
    """The parent's handle on the helper: started on first use, restarted RETRY_SECONDS after a failure.

    Pipe I/O runs in a thread of its own, in blocking calls that release the GIL: written from the
    event loop, a large frame would move one pipe buffer per loop iteration, and a busy loop turns
    that into a backlog.
    """

    def __init__(self, environment: str, clock: Callable[[], float] = time.monotonic) -> None:
        self._environment = environment
        self._clock = clock
        self._process: subprocess.Popen[bytes] | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="telemetry-encoder")
        self._lock = asyncio.Lock()
        self._closed = False
        self._retry_at = float("-inf")
        self._since = 0.0

    @property
    def busy(self) -> bool:
        """Whether a round trip is under way (a caller that cannot wait encodes in-process)."""
        return self._lock.locked()

    def busy_for(self) -> float:
        """Seconds the current round trip has taken so far; 0 when idle."""
        return self._clock() - self._since if self._lock.locked() else 0.0

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def available(self) -> bool:
        """Whether a batch should be offered now (not closed, not resting after a failure)."""
        return not self._closed and self._clock() >= self._retry_at

    async def encode(self, slices: list[bytes]) -> tuple[list[bytes], int, str]:
        """Rows of the events in `slices` (JSON arrays), in order; on any failure the helper is
        stopped and EncoderUnavailable raised."""
        if self._closed:
            raise EncoderUnavailable("closed")
        loop = asyncio.get_running_loop()
        async with self._lock:
            self._since = self._clock()
            timeout = REPLY_TIMEOUT if self.running else REPLY_TIMEOUT + START_TIMEOUT
            try:
                reply = await asyncio.wait_for(loop.run_in_executor(self._thread, self._round_trip, slices), timeout)
            except (OSError, ValueError, TimeoutError, EncoderUnavailable) as exc:
                self._retry_at = self._clock() + RETRY_SECONDS
                # Killing the helper also ends a round trip still blocked in the thread.
                self._kill()
                raise EncoderUnavailable(str(exc) or type(exc).__name__) from exc
            except asyncio.CancelledError:
                self._kill()
                raise
        return _parse_reply(reply)

    def _round_trip(self, slices: list[bytes]) -> bytearray:
        """Send one request and read its reply, in system calls that release the GIL: this thread
        never competes with the event loop for it (the loop slices the rows out afterwards)."""
        process = self._process
        if process is None or process.poll() is not None:
            if process is not None:
                _close_pipes(process)
            process = self._process = self._spawn()
        assert process.stdin is not None and process.stdout is not None
        parts: list[bytes] = []
        for part in slices:
            parts += (_LENGTH.pack(len(part)), part)
        parts.append(_END)
        _write_all(process.stdin.fileno(), parts)
        replies = process.stdout.fileno()
        return _read_all(replies, _LENGTH.unpack(_read_all(replies, _LENGTH.size))[0])

    def _spawn(self) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            [sys.executable, "-c", HELPER_COMMAND, self._environment],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True, bufsize=0,
        )
        for stream in (process.stdin, process.stdout):
            with contextlib.suppress(OSError, AttributeError):
                # Fewer, larger pipe transfers (Linux; the default is 64 KiB).
                fcntl.fcntl(stream.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)  # type: ignore[union-attr]
        return process

    def _kill(self) -> None:
        process = self._process
        if process is not None and process.poll() is None:
            process.kill()

    async def close(self) -> None:
        """Stop the helper (idempotent); rows it was encoding were still held by the caller."""
        if self._closed:
            return
        self._closed = True
        if self.busy:
            self._kill()
        async with self._lock:
            await asyncio.get_running_loop().run_in_executor(self._thread, self._stop)
        self._thread.shutdown(wait=True)

    def _stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.stdin is not None:
            with contextlib.suppress(OSError):
                process.stdin.close()
        try:
            process.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        _close_pipes(process)


def _close_pipes(process: subprocess.Popen[bytes]) -> None:
    for stream in (process.stdin, process.stdout):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


def _parse_reply(reply: bytearray) -> tuple[list[bytes], int, str]:
    failed, name_length, count = _REPLY.unpack_from(reply)
    offset = _REPLY.size + name_length
    view = memoryview(reply)
    lengths = array("I")
    lengths.frombytes(view[offset:offset + count * lengths.itemsize])
    start = offset + count * lengths.itemsize
    lines = []
    for length in lengths:
        end = start + length
        lines.append(bytes(view[start:end]))
        start = end
    return lines, failed, bytes(view[_REPLY.size:_REPLY.size + name_length]).decode()


def _write_all(fd: int, parts: list[bytes]) -> None:
    """All of `parts`, in as few system calls as the pipe allows."""
    views = [memoryview(part) for part in parts if part]
    while views:
        written = os.writev(fd, views[:IOV_MAX])
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if written:
            views[0] = views[0][written:]


def _read_all(fd: int, size: int) -> bytearray:
    """Exactly `size` bytes from `fd`; EncoderUnavailable when the other side has gone."""
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        count = os.readv(fd, [view[got:]])
        if count == 0:
            raise EncoderUnavailable("the encoder process exited")
        got += count
    return buffer


def _read_exactly(stream: IO[bytes], size: int) -> bytes:
    data = stream.read(size) if size else b""
    if data is None or len(data) != size:
        raise EncoderUnavailable("the stream ended")
    return data


def serve(environment: str, requests: IO[bytes], replies: IO[bytes]) -> None:
    """The helper's loop: one reply per request, until the input closes."""
    encoder = RowEncoder(environment)
    while True:
        events: list[dict[str, Any]] = []
        try:
            while size := _LENGTH.unpack(_read_exactly(requests, _LENGTH.size))[0]:
                events.extend(orjson.loads(_read_exactly(requests, size)))
        except EncoderUnavailable:
            return
        lines, failed, first_error = encode_batch(encoder, events)
        name = first_error.encode()
        lengths = array("I", map(len, lines))
        size = _REPLY.size + len(name) + len(lengths) * lengths.itemsize + sum(lengths)
        replies.write(_LENGTH.pack(size) + _REPLY.pack(failed, len(name), len(lines)) + name + lengths.tobytes())
        replies.write(b"".join(lines))
        replies.flush()


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Only on an otherwise idle core: rows may wait, requests may not. If the cores stay busy, the
    # forwarder notices the slow answers and encodes in-process meanwhile.
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        with contextlib.suppress(OSError):
            os.nice(19)
    try:
        serve(sys.argv[1] if len(sys.argv) > 1 else "development", sys.stdin.buffer, sys.stdout.buffer)
    except Exception as exc:
        # A traceback could quote an event; the parent logs the failure and encodes in-process.
        sys.stderr.write(f"image_service encoder process: {type(exc).__name__}\n")
        raise SystemExit(1) from None
