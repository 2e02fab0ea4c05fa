"""A disk spool for rows the sink cannot take now: append-only NDJSON segments, drained in order.

Rows land here when the breaker is open, when retries are exhausted, when the in-memory queue runs
high, and at shutdown. The spool is bounded in bytes; when it must evict, it drops its oldest
segments, or the oldest rows of the only one, and reports how many rows that was (counted as lost,
never silent). Rows it cannot write (a full or read-only disk) are reported too (`SpoolUnwritable`),
and leave no torn row behind. All methods are
synchronous and must be called from one thread (the forwarder's I/O thread), which keeps them ordered.

A segment being drained is deleted only once fully sent; a crash mid-segment re-sends its first rows,
which the pipes de-duplicate by `event_id`.

While the breaker is open the encoder process writes the rows it builds straight into `incoming/`
(renamed into place once whole), and the spool adopts each file as a segment, fsync'd with the
rest at the next `sync`: those rows never pass through the server. Files a crash left there are
adopted on the next start.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

from .batch import Rows

PREFIX = "segment-"
SUFFIX = ".ndjson"
INCOMING = "incoming"
# A segment's newest rows on their way to replacing it (see `_trim_head`).
TRIMMED = ".trim"
WORKER = "worker-"
DEFAULT_SEGMENT_BYTES = 8 * 1024 * 1024


@dataclass
class _Reader:
    path: Path
    size: int
    lines: list[bytes]
    offset: int = 0


@dataclass
class SpoolStats:
    rows_written: int = 0
    rows_read: int = 0
    rows_evicted: int = 0
    segments_evicted: int = 0
    # Segments gone from disk before they were drained (deleted by hand), and their rows where known:
    # a segment an earlier run left is counted only as a segment (its rows were never read).
    segments_missing: int = 0
    rows_missing: int = 0
    files: list[str] = field(default_factory=list)


class SpoolUnwritable(OSError):
    """The spool could not store `rows` rows (a full or read-only disk): what was written before them
    is whole, and no torn row is left behind."""

    def __init__(self, rows: int, error: OSError) -> None:
        self.error = errno.errorcode.get(error.errno or 0, type(error).__name__)  # ENOSPC, EROFS...
        super().__init__(f"{rows} rows could not be spooled: {self.error}")
        self.rows = rows


class SpoolInUse(OSError):
    """Another process serves this spool (it holds its lock)."""

    def __init__(self, directory: Path) -> None:
        super().__init__(f"the spool {directory} is in use by a running image-service: it drains the spool itself")


# A spool on a filesystem without flock (some network or FUSE ones) is served unlocked, as before locks.
NO_LOCK = -1


def _try_lock(directory: Path) -> int | None:
    """The spool's lock (an flock on its directory, held by the process that serves it from `open`
    to `close`), taken without waiting: its descriptor, or None when another process holds it.
    `events replay` and a process gathering old spools leave a spool in use alone: a replay once
    drained the segments a server was still writing, and their rows were lost uncounted."""
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        return None
    except OSError as exc:
        os.close(descriptor)
        if exc.errno in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS):
            return NO_LOCK
        raise  # ENOLCK and the like: whether another process holds it is unknown, so nothing is taken
    return descriptor


def _unlock(descriptor: int | None) -> None:
    if descriptor is not None and descriptor != NO_LOCK:
        os.close(descriptor)


def in_use(directory: Path) -> list[Path]:
    """The spools in `directory` (it and its workers') that a running process serves."""
    busy = []
    for spool in [directory, *sorted(path for path in directory.glob(f"{WORKER}*") if path.is_dir())]:
        descriptor = _try_lock(spool)
        if descriptor is None:
            busy.append(spool)
        _unlock(descriptor)
    return busy


class Spool:
    """`own_if_busy`: when another process serves `directory` (a second instance started from the
    same place), keep a spool of its own inside it, `worker-pid<pid>`, which the next process to
    open the directory gathers once this one has stopped; otherwise `open` raises SpoolInUse."""

    def __init__(
        self, directory: Path, max_bytes: int, segment_bytes: int = DEFAULT_SEGMENT_BYTES, own_if_busy: bool = True
    ) -> None:
        if max_bytes <= 0:
            raise ValueError(f"spool max_bytes must be positive, got {max_bytes}")
        self.directory = directory
        self._own_if_busy = own_if_busy
        self.max_bytes = max_bytes
        self.segment_bytes = max(1, min(segment_bytes, max_bytes // 4))
        self.stats = SpoolStats()
        # Closed segments, oldest first: (path, bytes, rows; None for a segment found at open).
        self._segments: list[tuple[Path, int, int | None]] = []
        self._writer: io.FileIO | None = None
        self._writer_path: Path | None = None
        self._writer_size = 0
        self._writer_rows = 0
        self._next = 0
        self._reader: _Reader | None = None
        self._dirty = False
        self._opened = False
        # Adopted segments not yet fsync'd, with the directory that holds their new names.
        self._unsynced: list[Path] = []
        self._lock: int | None = None

    @property
    def incoming(self) -> Path:
        """Where the encoder process writes segments for `adopt`."""
        return self.directory / INCOMING

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size, _ in self._segments) + self._writer_size

    @property
    def needs_sync(self) -> bool:
        """Whether rows were written or adopted since the last `sync`."""
        return (self._writer is not None and self._dirty) or bool(self._unsynced)

    def has_data(self) -> bool:
        return bool(self._segments) or self._writer_size > 0 or (
            self._reader is not None and self._reader.offset < len(self._reader.lines)
        )

    def open(self) -> int:
        """Find segments left by an earlier run (a run with `--workers N` too); they are drained
        first. Returns how many rows were evicted to fit the bound (a smaller one than theirs)."""
        if self._opened:
            return 0
        configured = self.directory
        try:
            return self._open()
        except BaseException:
            _unlock(self._lock)  # a start that failed must not keep the spool from the next one
            self._lock = None
            self.directory = configured
            raise

    def _open(self) -> int:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = _try_lock(self.directory)
        if self._lock is None and self._own_if_busy:
            shared, self.directory = self.directory, self.directory / f"{WORKER}pid{os.getpid()}"
            self.directory.mkdir(exist_ok=True)
            self._lock = _try_lock(self.directory)
            if self._lock is not None:
                # What stopped instances left beside it would otherwise wait for the process
                # serving the shared spool to restart.
                gather(sorted(path for path in shared.glob(f"{WORKER}*") if path != self.directory), self.directory)
        if self._lock is None:
            raise SpoolInUse(self.directory)
        gather(sorted(self.directory.glob(f"{WORKER}*")), self.directory)
        for leftover in self.directory.glob(f"{PREFIX}*{TRIMMED}"):
            leftover.unlink()  # a trim a crash cut short: the segment it came from is still whole
        found = sorted(self.directory.glob(f"{PREFIX}*{SUFFIX}"))
        self._segments = [(path, path.stat().st_size, None) for path in found if path.stat().st_size > 0]
        for path in found:
            if path.stat().st_size == 0:
                path.unlink()
        self._next = 1 + max((int(path.stem.removeprefix(PREFIX)) for path in found), default=0)
        self._opened = True
        evicted = 0
        for path in sorted(self.incoming.iterdir()) if self.incoming.is_dir() else []:
            if path.suffix == SUFFIX:
                evicted += self.adopt(path, path.read_bytes().count(b"\n"))
            else:
                # Written but never renamed into place: its rows were still the forwarder's.
                path.unlink()
        return evicted + self._enforce_bound()

    def adopt(self, path: Path, rows: int) -> int:
        """Take a complete NDJSON file of `rows` rows as the newest segment (fsync'd with the rest at
        the next `sync`); returns how many older rows were evicted to stay within the bound."""
        self._close_writer()
        target = self.directory / f"{PREFIX}{self._next:012d}{SUFFIX}"
        self._next += 1
        path.rename(target)
        self._segments.append((target, target.stat().st_size, rows))
        self._unsynced.append(target)
        self.stats.rows_written += rows
        return self._enforce_bound()

    def append(self, rows: Rows) -> int:
        """Write NDJSON rows; returns how many older rows were evicted to stay within the bound.
        A chunk of rows that would overfill the open segment is written a row at a time, so no
        segment outgrows its size by more than a row."""
        written = 0
        try:
            for chunk, count in zip(rows.chunks, rows.counts):
                used = self._writer_size if self._writer is not None and self._writer_size < self.segment_bytes else 0
                fits = used + len(chunk) <= self.segment_bytes
                for piece in (chunk,) if count == 1 or fits else chunk.splitlines(keepends=True):
                    if self._writer is None or self._writer_size >= self.segment_bytes:
                        self._rotate()
                    assert self._writer is not None
                    self._dirty = True  # before the write: a rotation in this call must still sync it
                    self._write(piece)
                    self._writer_size += len(piece)
                    pieces = count if piece is chunk else 1
                    self._writer_rows += pieces
                    written += pieces
        except OSError as exc:
            self._close_writer()  # what it holds is whole; the next rows go to a new segment
            self.stats.rows_written += written
            raise SpoolUnwritable(len(rows) - written, exc) from None
        self.stats.rows_written += len(rows)
        return self._enforce_bound() if rows else 0

    def _write(self, piece: bytes) -> None:
        writer = self._writer
        assert writer is not None
        write_whole(writer.fileno(), piece, self._writer_size)

    def sync(self) -> None:
        """Flush and fsync the open segment and the adopted ones (the forwarder calls this at least
        once a second)."""
        if self._writer is not None and self._dirty:
            os.fsync(self._writer.fileno())
            self._dirty = False
        if self._unsynced:
            for path in self._unsynced:
                with contextlib.suppress(FileNotFoundError):
                    _fsync(path)
            _fsync(self.directory)
            self._unsynced.clear()

    def read_batch(self, max_rows: int, max_bytes: int) -> list[bytes]:
        """The next rows in order, without consuming them; `commit` consumes."""
        if self._reader is None or self._reader.offset >= len(self._reader.lines):
            if not self._load_next():
                return []
        assert self._reader is not None
        batch: list[bytes] = []
        size = 0
        for line in self._reader.lines[self._reader.offset : self._reader.offset + max_rows]:
            if batch and size + len(line) > max_bytes:
                break
            batch.append(line)
            size += len(line)
        return batch

    def commit(self, count: int) -> None:
        """Mark the first `count` rows of the last batch as delivered (or deliberately dropped)."""
        reader = self._reader
        if reader is None:
            return
        reader.offset += count
        self.stats.rows_read += count
        if reader.offset >= len(reader.lines):
            reader.path.unlink(missing_ok=True)
            self._segments = [segment for segment in self._segments if segment[0] != reader.path]
            self._reader = None

    def close(self) -> None:
        try:
            self._close_writer()
            self.sync()
        finally:
            _unlock(self._lock)
            self._lock, self._opened = None, False

    def _close_writer(self) -> None:
        """Close the open segment; what it holds unsynced is fsync'd at the next `sync`, with the
        adopted segments: under an outage a segment is adopted every frame, and an fsync each
        would cost the machine what the once-a-second sync saves."""
        if self._writer is None:
            return
        writer, self._writer = self._writer, None
        with contextlib.suppress(OSError):  # unbuffered: a failed close (a full disk) loses nothing
            writer.close()
        if self._writer_path is not None and self._writer_size:
            self._segments.append((self._writer_path, self._writer_size, self._writer_rows))
            if self._dirty:
                self._unsynced.append(self._writer_path)
        elif self._writer_path is not None:
            self._writer_path.unlink(missing_ok=True)  # nothing made it in: no empty file per failed spill
        self._dirty = False
        self._writer_path, self._writer_size, self._writer_rows = None, 0, 0

    def _rotate(self) -> None:
        self._close_writer()
        self._writer_path = self.directory / f"{PREFIX}{self._next:012d}{SUFFIX}"
        self._next += 1
        self._writer = self._writer_path.open("ab", buffering=0)
        self._writer_size = 0

    def _load_next(self) -> bool:
        if not self._segments and self._writer_size:
            self._close_writer()
            self.sync()
        if not self._segments:
            return False
        path, size, _ = self._segments[0]
        data = self._head_bytes()
        if data is None:
            return self._load_next()
        lines = data.splitlines(keepends=True)
        if lines and not lines[-1].endswith(b"\n"):
            lines[-1] += b"\n"
        self._reader = _Reader(path, size, lines)
        if not lines:
            self.commit(0)
            return self._load_next()
        return True

    def _head_bytes(self) -> bytes | None:
        """The oldest segment's bytes; None when it was deleted under us (by hand), and then it is
        dropped and counted: left in the list, it would hold up every segment after it for ever."""
        path, _, rows = self._segments[0]
        try:
            return path.read_bytes()
        except FileNotFoundError:
            self._segments.pop(0)
            self.stats.segments_missing += 1
            self.stats.rows_missing += rows or 0
            return None

    def _enforce_bound(self) -> int:
        """Evict the oldest rows until the spool fits its bound: whole segments while others remain,
        then the head of the last one (a frame adopted from the encoder process can outgrow the
        bound by itself, and would otherwise take every row with it)."""
        evicted = 0
        while self.total_bytes > self.max_bytes and self._segments:
            if len(self._segments) == 1 and (self._reader is None or self._reader.path != self._segments[0][0]):
                evicted += self._trim_head(self.max_bytes - self._writer_size)
                break
            path, _, rows = self._segments.pop(0)
            if self._reader is not None and self._reader.path == path:
                evicted += len(self._reader.lines) - self._reader.offset
                self._reader = None
            elif rows is not None:
                # Known since it was written or adopted: a long outage evicts a segment for every
                # one it adds, and reading each (megabytes) just to count it cost the server's core.
                evicted += rows
            else:
                try:
                    evicted += path.read_bytes().count(b"\n")
                except FileNotFoundError:
                    self.stats.segments_missing += 1
                    continue
            path.unlink(missing_ok=True)
            self.stats.segments_evicted += 1
        self.stats.rows_evicted += evicted
        return evicted

    def _trim_head(self, allowed: int) -> int:
        """Keep the newest whole rows of the only segment within `allowed` bytes; return the rows cut.
        The kept rows are a new file: on a disk with no room for it the whole segment goes instead."""
        path = self._segments[0][0]
        data = self._head_bytes()
        if data is None:
            return 0
        boundary = data.find(b"\n", max(len(data) - max(allowed, 0) - 1, 0))
        kept = data[boundary + 1:] if boundary >= 0 else b""
        trimmed = path.with_suffix(TRIMMED)
        if kept:
            try:
                trimmed.write_bytes(kept)
                _fsync(trimmed)  # whole on disk before it replaces the segment
            except OSError:
                trimmed.unlink(missing_ok=True)
                kept = b""
        if not kept:
            path.unlink(missing_ok=True)
            self._segments.pop(0)
            self.stats.segments_evicted += 1
            return data.count(b"\n")
        trimmed.replace(path)
        self._segments[0] = (path, len(kept), kept.count(b"\n"))
        self._unsynced.append(path)
        return data[: len(data) - len(kept)].count(b"\n")


def write_whole(descriptor: int, data: bytes, size: int, sync: bool = False) -> None:
    """Append `data` whole (and fsync it, with `sync`) to a file of `size` bytes opened unbuffered
    for appending, or leave the file as it was: a full disk may take part of it, which is cut off
    again, so that the file ends with a whole row and a retry does not follow a torn one."""
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(descriptor, view):]
        if sync:
            os.fsync(descriptor)
    except OSError:
        with contextlib.suppress(OSError):
            os.ftruncate(descriptor, size)
        raise


def worker_directory(directory: Path, index: int) -> Path:
    """The spool of worker `index` of `serve --workers N`: segment numbers are a spool's own, so
    two processes never write or drain one spool."""
    return directory / f"{WORKER}{index}"


def share_out(directory: Path, workers: int) -> None:
    """Before `workers` workers start on the spool `directory`, hand what no worker's own spool
    holds (the segments of a run without workers, of a run with more workers) to the workers'."""
    gather([directory], worker_directory(directory, 0), remove=False)
    for path in sorted(directory.glob(f"{WORKER}*")):
        index = path.name.removeprefix(WORKER)
        owner = worker_directory(directory, int(index) % workers if index.isdigit() else 0)
        if path != owner:
            gather([path], owner)


def holds_rows(directory: Path) -> bool:
    """Whether `directory` is a spool with rows where `Spool.open` looks for them: its segments, its
    incoming files, and the same in the spools of its workers."""
    for spool in [directory, *directory.glob(f"{WORKER}*")]:
        files = [*spool.glob(f"{PREFIX}*{SUFFIX}"), *(spool / INCOMING).glob(f"*{SUFFIX}")]
        if any(path.stat().st_size for path in files):
            return True
    return False


def gather(sources: list[Path], into: Path, remove: bool = True) -> None:
    """Move the rows of spools no process serves any more into `into`'s incoming directory, where
    `Spool.open` adopts them as segments. Order across spools does not matter: each row has its
    own `event_id`. Files that were never renamed into place held rows still in memory: deleted.
    With `remove`, the emptied sources go too."""
    target = into / INCOMING
    for source in sources:
        lock = _try_lock(source) if source.is_dir() else None
        if lock is None and source.is_dir():
            continue  # served by a running process: its rows are its own
        try:
            _move_rows(source, target, remove)
        finally:
            _unlock(lock)
    if target.is_dir():
        _fsync(target)


def _move_rows(source: Path, target: Path, remove: bool) -> None:
    incoming = source / INCOMING
    leftovers = sorted(incoming.iterdir()) if incoming.is_dir() else []
    files = sorted(source.glob(f"{PREFIX}*{SUFFIX}")) + [path for path in leftovers if path.suffix == SUFFIX]
    for number, path in enumerate(files):
        target.mkdir(parents=True, exist_ok=True)
        moved = target / f"{source.name}-{number:06d}{SUFFIX}"
        while moved.exists():
            moved = moved.with_name(f"{moved.stem}-{SUFFIX}")
        path.rename(moved)
    for path in leftovers:
        path.unlink(missing_ok=True)
    for directory in (incoming, source) if remove else (incoming,):
        with contextlib.suppress(OSError):
            directory.rmdir()


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
