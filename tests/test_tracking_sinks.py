"""The local NDJSON sink: what a newcomer reads, bounded by rotation, shared by workers."""

from __future__ import annotations

import asyncio
from pathlib import Path

from structlog.testing import capture_logs

from image_service.tracking.sinks import FileSink, Outcome, rotated_files

from .conftest import disk_full_at


def lines(first: int, count: int) -> list[bytes]:
    return [b'{"event_id":"ev-%06d","pad":"%s"}\n' % (n, b"x" * 40) for n in range(first, first + count)]


def read_all(path: Path) -> list[bytes]:
    """Every kept line, oldest first: the rotated files from the highest number down, then the file."""
    kept: list[bytes] = []
    for part in [*reversed(rotated_files(path)), path]:
        if part.exists():
            kept += part.read_bytes().splitlines(keepends=True)
    return kept


async def test_the_local_file_rotates_past_its_size_and_keeps_the_newest_files(tmp_path: Path) -> None:
    path = tmp_path / "events.ndjson"
    sink = FileSink(path, None, max_bytes=1_000, keep=2)
    sent = [line for batch in range(40) for line in lines(batch * 5, 5)]
    try:
        for start in range(0, len(sent), 5):
            assert (await sink.send(sent[start:start + 5], 5)).outcome is Outcome.SENT
    finally:
        await sink.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.ndjson", "events.ndjson.1", "events.ndjson.2"]
    kept = read_all(path)
    assert kept == sent[-len(kept):]
    assert all(p.stat().st_size >= 1_000 for p in rotated_files(path))
    assert path.stat().st_size < 1_000


async def test_a_local_file_with_no_size_bound_is_never_rotated(tmp_path: Path) -> None:
    path = tmp_path / "events.ndjson"
    sink = FileSink(path, None, max_bytes=0)
    try:
        for start in range(0, 200, 10):
            await sink.send(lines(start, 10), 10)
    finally:
        await sink.close()
    assert [p.name for p in tmp_path.iterdir()] == ["events.ndjson"]
    assert path.read_bytes() == b"".join(lines(0, 200))


async def test_workers_sharing_the_local_file_lose_no_row_when_it_rotates(tmp_path: Path) -> None:
    """Two sinks on one file (the workers of `serve --workers 2`): every row once, whole, and no
    rotated file shifted twice (each holds at least the bound)."""
    path = tmp_path / "events.ndjson"
    sinks = [FileSink(path, None, max_bytes=2_000, keep=1_000) for _ in range(2)]

    async def write(sink: FileSink, first: int) -> None:
        for start in range(first, first + 1_000, 4):
            await sink.send(lines(start, 4), 4)

    try:
        await asyncio.gather(write(sinks[0], 0), write(sinks[1], 10_000))
    finally:
        for sink in sinks:
            await sink.close()
    kept = read_all(path)
    assert sorted(kept) == sorted(lines(0, 1_000) + lines(10_000, 1_000))
    assert all(p.stat().st_size >= 2_000 for p in rotated_files(path))


async def test_a_rotation_that_fails_keeps_the_batch_and_says_so_once(tmp_path: Path) -> None:
    """The rows are written before the rotation is tried: retrying them would write them twice."""
    path = tmp_path / "events.ndjson"
    (tmp_path / "events.ndjson.1").mkdir()  # a rename onto a directory fails
    sink = FileSink(path, None, max_bytes=100, keep=3)
    try:
        with capture_logs() as logs:
            outcomes = [(await sink.send(lines(n, 3), 3)).outcome for n in range(0, 9, 3)]
    finally:
        await sink.close()
    assert outcomes == [Outcome.SENT] * 3
    assert path.read_bytes() == b"".join(lines(0, 9))
    failures = [log for log in logs if log["event"] == "telemetry.local_rotation_failed"]
    assert len(failures) == 1 and "IsADirectoryError" in failures[0]["error"]


async def test_a_batch_a_full_disk_cuts_short_leaves_no_torn_row(tmp_path: Path) -> None:
    """The retry used to follow the torn half, and a row torn at its start was lost to every reader."""
    path = tmp_path / "events.ndjson"
    sink = FileSink(path, None)
    try:
        await sink.send(lines(0, 5), 5)
        whole = path.stat().st_size
        with disk_full_at(whole + 100):
            assert (await sink.send(lines(5, 5), 5)).outcome is Outcome.RETRY
        assert path.read_bytes() == b"".join(lines(0, 5))
        assert (await sink.send(lines(5, 5), 5)).outcome is Outcome.SENT
    finally:
        await sink.close()
    assert path.read_bytes() == b"".join(lines(0, 10))
