"""Row encoding in a helper process, so a busy server spends a second core on rows, not its event loop.

Building a row costs ~7 µs of Python per event (unpacking it, 40 columns, privacy rules); the processor
has already serialised each request's events with its context (`processor.Groups`). Under load the
forwarder therefore ships batches of those groups over a pipe to a helper Python process (`main()`
below). The helper runs the same `RowEncoder` as the in-process path, so rows are identical either
way. It is one of the service's own processes: privacy is applied there, before any row leaves the
machine, exactly as in the in-process path.

With the Tinybird sink, while it is healthy, the helper also makes the first delivery attempt
(`courier.py`): the rows stay there and only the outcome comes back. Rows it cannot deliver (a
failed call, or a courier too far behind to take them) it writes into the spool's `incoming/`
directory, as it does with every row while the breaker is open or the sink has just failed
(`spool.py` adopts the file): a failing sink's rows never cross the pipe back to the event loop.
Only a 413's rows come back, to be split; otherwise (no courier, nothing to spool) rows come back.

Protocol, one reply per request:
- request: messages, each after its 4-byte big-endian length, then a zero length. The first is
  the command (`>BId`: kind, ticket, seconds to wait for deliveries to settle); ENCODE is followed
  by chunks of serialised groups (`processor.Groups.chunks`), SPOOL and DELIVER by a file's path (where
  the rows go if they are not delivered) and then the groups, CONFIGURE by the courier's settings.
- reply: four messages, each after its length: `>IIIB` (rows that failed, length of the first
  failure's type name, rows encoded, where they went: 0 back, 1 the courier, 2 the file), that
  name and, unless taken,
  each row's length (native uint32); the rows, joined (empty if taken); the settlements since the
  last reply (JSON, each saying whether its rows went to its file); the rows that settlements give
  back, joined. The parent keeps rows as one
  chunk (`batch.Rows`) after checking the count and the lengths' total against the events it sent.

The helper ignores SIGINT and SIGTERM (the parent decides when telemetry stops) and exits when its
stdin closes, so it never outlives the server (a delivery under way is abandoned with it).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import struct
import sys
import time
from array import array
from dataclasses import dataclass
from pathlib import Path
from collections import Counter
from collections.abc import Callable, Sequence
from typing import IO, Any

import orjson

from .contract import Outcome
from .courier import Courier, CourierSettings, Parcel, Settlement
from .processor import Buffer, unpack
from .rows import RowEncoder

_LENGTH = struct.Struct(">I")
_COMMAND = struct.Struct(">BId")
_REPLY = struct.Struct(">IIIB")
_END = _LENGTH.pack(0)
ENCODE, DELIVER, COLLECT, ABANDON, CONFIGURE, SPOOL = range(6)
RETURNED, DELIVERING, SPOOLED = range(3)
# After a failure the helper is not started again for this long: rows are encoded in-process meanwhile.
RETRY_SECONDS = 30.0
# The helper imports this very copy of the package, whatever its working directory says: parent
# and helper must speak the same protocol. The directory takes the place of the working directory
# on sys.path, unless it is on sys.path already (an installed package).
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
HELPER_COMMAND = (
    "import sys; root = sys.argv.pop(1); sys.path[0:1] = [] if root in sys.path else [root]; "
    "from image_service.tracking.encoder import main; main()"
)
# Seconds for one round trip (a full frame takes about 0.1 s), plus the helper's start on the first.
REPLY_TIMEOUT = 1.0
START_TIMEOUT = 5.0
PIPE_BYTES = 1 << 20
# The reply stream's buffer: a whole frame's reply (~1.2 KB a row) without pausing the pipe.
READ_LIMIT = 8 << 20


class EncoderUnavailable(Exception):
    """The helper could not encode this batch; the caller encodes it in-process."""


@dataclass(slots=True)
class Reply:
    """The helper's answer: rows (unless the courier took them) and earlier deliveries' outcomes."""

    rows: bytes
    count: int
    failed: int
    first_error: str
    delivered: bool
    spooled: bool
    settlements: list[Settlement]


class EncoderProcess:
    """The parent's handle on the helper: started on first use, restarted RETRY_SECONDS after a failure.

    Pipe I/O runs on the event loop, through 1 MiB pipes (the helper enlarges both), so a frame
    moves in a few loop iterations and no thread competes with the loop for the GIL (with the I/O
    in a thread, every hand-over of the GIL cost the loop a context switch).
    """

    def __init__(
        self, environment: str, courier: CourierSettings | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._environment = environment
        self.courier = courier
        self._clock = clock
        self._process: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()
        self._closed = False
        self._retry_at = float("-inf")
        self._since = 0.0
        # False once the helper has been killed, before its exit is noticed: never talk to it again.
        self._healthy = False

    @property
    def busy(self) -> bool:
        """Whether a round trip is under way (a caller that cannot wait encodes in-process)."""
        return self._lock.locked()

    def busy_for(self) -> float:
        """Seconds the current round trip has taken so far; 0 when idle."""
        return self._clock() - self._since if self._lock.locked() else 0.0

    @property
    def running(self) -> bool:
        return self._healthy and self._process is not None and self._process.returncode is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def available(self) -> bool:
        """Whether a batch should be offered now (not closed, not resting after a failure)."""
        return not self._closed and self._clock() >= self._retry_at

    async def encode(
        self, slices: Sequence[Buffer], events: int, ticket: int | None = None, spool_to: Path | None = None
    ) -> Reply:
        """Rows of the `events` events in `slices` (chunks of serialised groups), in order and joined, with
        their count, the number that failed and the first failure's type. With `spool_to`, the
        helper writes them to that file (`Reply.spooled`); with a `ticket` as well (and a courier),
        it delivers them itself (`Reply.delivered`) and writes to the file only what it cannot
        deliver, now or when the call fails (`Settlement.spooled`). On any failure the helper is
        stopped and EncoderUnavailable raised."""
        if spool_to is None:
            return await self._request(ENCODE, 0, 0.0, slices, events)
        kind = SPOOL if ticket is None or self.courier is None else DELIVER
        return await self._request(kind, ticket or 0, 0.0, [str(spool_to).encode(), *slices], events)

    async def collect(self, wait: float = 0.0, abandon: bool = False) -> list[Settlement]:
        """Deliveries settled since the last reply, waiting up to `wait` seconds for all of them;
        with `abandon`, the unsettled ones come back too, with their rows."""
        if not self.running:
            raise EncoderUnavailable("the encoder process is gone, with the deliveries it had")
        return (await self._request(ABANDON if abandon else COLLECT, 0, wait, [], 0)).settlements

    async def _request(self, kind: int, ticket: int, wait: float, slices: Sequence[Buffer], events: int) -> Reply:
        if self._closed:
            raise EncoderUnavailable("closed")
        async with self._lock:
            self._since = self._clock()
            try:
                timeout = REPLY_TIMEOUT + wait + (0.0 if self.running else START_TIMEOUT)
                return _checked(await asyncio.wait_for(self._started_round_trip(kind, ticket, wait, slices), timeout), events)
            except (OSError, ValueError, TimeoutError, asyncio.IncompleteReadError, struct.error) as exc:
                self._retry_at = self._clock() + RETRY_SECONDS
                self._kill()
                raise EncoderUnavailable(str(exc) or type(exc).__name__) from exc
            except BaseException:
                # Cancelled (or worse) half-way: the pipes may be out of step, so this helper is done.
                self._kill()
                raise

    async def _start(self) -> None:
        await self._stop()
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", HELPER_COMMAND, PACKAGE_ROOT, self._environment,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=READ_LIMIT,
        )
        self._process = process
        self._healthy = True
        if self.courier is not None:
            # The key travels over the pipe, never on the command line, where `ps` would show it.
            _checked(await self._round_trip(CONFIGURE, 0, 0.0, [self.courier.to_json()]), 0)

    async def _started_round_trip(self, kind: int, ticket: int, wait: float, slices: Sequence[Buffer]) -> list[bytes]:
        if not self.running:
            await self._start()
        return await self._round_trip(kind, ticket, wait, slices)

    async def _round_trip(self, kind: int, ticket: int, wait: float, slices: Sequence[Buffer]) -> list[bytes]:
        process = self._process
        assert process is not None and process.stdin is not None and process.stdout is not None
        parts: list[Buffer] = []
        for part in [_COMMAND.pack(kind, ticket, wait), *slices]:
            parts += (_LENGTH.pack(len(part)), part)
        parts.append(_END)
        _write_all(process.stdin, parts)
        await process.stdin.drain()
        messages = []
        for _ in range(4):
            size = _LENGTH.unpack(await process.stdout.readexactly(_LENGTH.size))[0]
            messages.append(await process.stdout.readexactly(size))
        return messages

    def _kill(self) -> None:
        self._healthy = False
        if self._process is not None and self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()

    async def close(self) -> None:
        """Stop the helper (idempotent); rows it was encoding were still held by the caller."""
        if self._closed:
            return
        self._closed = True
        if self.busy:
            self._kill()
        async with self._lock:
            await self._stop()

    async def _stop(self) -> None:
        """End the current helper, if any: closing its input lets it finish; a stuck one is killed."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.stdin is not None:
            process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), 2.0)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


def _write_all(stream: asyncio.StreamWriter, parts: list[Buffer]) -> None:
    """Write `parts` in one system call, without joining them (a frame is ~0.3 MB): a write a
    part cost the event loop ~17 µs each. Whatever the pipe does not take now, and every part
    while the transport holds earlier bytes, goes through the transport, in order."""
    transport = stream.transport
    pipe = transport.get_extra_info("pipe")
    written = 0
    if pipe is not None and transport.get_write_buffer_size() == 0:
        try:
            written = os.writev(pipe.fileno(), parts)
        except (BlockingIOError, InterruptedError):
            written = 0
    for part in parts:
        if written >= len(part):
            written -= len(part)
            continue
        stream.write(part[written:] if written else part)
        written = 0


def _checked(messages: list[bytes], events: int) -> Reply:
    """The reply's four messages as a Reply; ValueError when they do not account for exactly the
    events sent, or the rows given back do not add up."""
    header, rows, settled, returned = messages
    failed, name_length, count, destination = _REPLY.unpack_from(header)
    offset = _REPLY.size + name_length
    lengths = array("I")
    lengths.frombytes(header[offset:])
    # Rows end in their only newline by construction (orjson escapes newlines in strings); counting
    # them here would cost the event loop ~0.6 µs a row.
    if destination != RETURNED:
        in_step = not rows and not lengths
    else:
        in_step = len(lengths) == count and sum(lengths) == len(rows) and rows[-1:] in (b"", b"\n")
    if failed + count != events or not in_step:
        raise ValueError("the encoder process's reply is out of step")
    settlements = []
    start = 0
    for ticket, rows_count, status, error, wait, body, size, spooled in orjson.loads(settled):
        settlements.append(
            Settlement(ticket, rows_count, status, error, wait, body.encode(), returned[start:start + size], spooled)
        )
        start += size
    if start != len(returned):
        raise ValueError("the encoder process's settlements are out of step")
    name = header[_REPLY.size:offset].decode()
    return Reply(rows, count, failed, name, destination == DELIVERING, destination == SPOOLED, settlements)


def _read_exactly(stream: IO[bytes], size: int) -> bytes:
    data = stream.read(size) if size else b""
    if data is None or len(data) != size:
        raise EncoderUnavailable("the stream ended")
    return data


def _read_request(requests: IO[bytes]) -> list[bytes]:
    messages = []
    while size := _LENGTH.unpack(_read_exactly(requests, _LENGTH.size))[0]:
        messages.append(_read_exactly(requests, size))
    return messages


def _write_whole(path: Path, lines: list[bytes]) -> None:
    """The rows in `path`, complete before the name appears (the spool adopts only that). The
    spool's once-a-second sync makes them durable: an fsync a frame cost the machine more."""
    partial = path.with_suffix(".partial")
    try:
        path.parent.mkdir(exist_ok=True)
        with partial.open("wb") as handle:
            handle.writelines(lines)
        partial.rename(path)
    except OSError:
        # A full or read-only disk: no half file left to fill it further; the caller keeps the rows.
        partial.unlink(missing_ok=True)
        raise


def _keep_undelivered(item: Settlement, fallback: Path | None) -> None:
    """Rows of a failed delivery go to its file, for the forwarder's calls to drain from the spool;
    a 413's come back to be split, and rejected ones (never sent again) are dropped here."""
    if not item.rows:
        return
    outcome = item.result().outcome
    if outcome is Outcome.REJECTED:
        item.rows = b""
    elif outcome is not Outcome.TOO_LARGE and fallback is not None:
        with contextlib.suppress(OSError):  # unwritable: the rows go back to the forwarder instead
            _write_whole(fallback, [item.rows])
            item.rows, item.spooled = b"", True


def serve(environment: str, requests: IO[bytes], replies: IO[bytes]) -> None:
    """The helper's loop: one reply per request, until the input closes."""
    encoder = RowEncoder(environment)
    courier: Courier | None = None
    # Where the rows of each delivery under way go if it fails, by ticket.
    fallbacks: dict[int, Path] = {}
    while True:
        try:
            command, *payload = _read_request(requests)
        except EncoderUnavailable:
            return
        kind, ticket, wait = _COMMAND.unpack(command)
        lines: list[bytes] = []
        failures: Counter[str] = Counter()
        destination = RETURNED
        if kind == CONFIGURE:
            courier = Courier(CourierSettings.from_json(payload[0]))
        elif kind in (ENCODE, DELIVER, SPOOL):
            spool_to = Path(payload.pop(0).decode()) if kind in (SPOOL, DELIVER) else None
            events = unpack(payload)
            try:
                lines = encoder.encode_all(events, failures)
            finally:
                encoder.reset()
            if kind == DELIVER and courier is not None and spool_to is not None and lines and courier.offer(
                Parcel(ticket, b"".join(lines), len(lines))
            ):
                destination = DELIVERING
                fallbacks[ticket] = spool_to
            elif spool_to is not None:
                try:
                    if lines:
                        _write_whole(spool_to, lines)
                    destination = SPOOLED
                except OSError:
                    pass  # unwritable: the rows go back to the forwarder, whose spill counts what it cannot keep
        settlements = courier.collect(wait, abandon=kind == ABANDON) if courier is not None else []
        for item in settlements:
            _keep_undelivered(item, fallbacks.pop(item.ticket, None))
        failed = sum(failures.values())
        name = next(iter(failures), "").encode()
        lengths = array("I", map(len, lines) if destination == RETURNED else [])
        header = _REPLY.pack(failed, len(name), len(lines), destination) + name + lengths.tobytes()
        settled = orjson.dumps([
            [item.ticket, item.count, item.status, item.error, item.retry_after, item.body.decode(errors="replace"),
             len(item.rows), item.spooled]
            for item in settlements
        ])
        rows = b"".join(lines) if destination == RETURNED else b""
        for message in (header, rows, settled, b"".join(item.rows for item in settlements)):
            replies.write(_LENGTH.pack(len(message)))
            replies.write(message)
        replies.flush()


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for fd in (0, 1):
        with contextlib.suppress(OSError, AttributeError):
            # Both pipes to the parent: fewer, larger transfers, so a frame crosses in a few of the
            # parent's loop iterations (Linux; the default is 64 KiB).
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
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
