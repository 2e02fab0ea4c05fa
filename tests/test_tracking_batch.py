"""Rows held as chunks: every cut keeps whole rows, in order, and loses none."""

from __future__ import annotations

import pytest

from image_service.tracking.batch import Rows, concat


def each_row(rows: Rows) -> list[bytes]:
    assert all(chunk.count(b"\n") == count for chunk, count in zip(rows.chunks, rows.counts))
    return b"".join(rows.chunks).splitlines(keepends=True)


def row(n: int, width: int = 10) -> bytes:
    return b'{"n":' + str(n).encode() + b',"pad":"' + b"x" * width + b'"}\n'


def frames(*sizes: int) -> tuple[Rows, list[bytes]]:
    """Rows made of frames of the given sizes (1 = a single row), and the rows they hold."""
    rows, lines, n = Rows(), [], 0
    for size in sizes:
        chunk = [row(n + i) for i in range(size)]
        n += size
        lines += chunk
        rows.add(b"".join(chunk), size)
    return rows, lines


@pytest.mark.parametrize("count", [0, 1, 2, 3, 4, 5, 7, 11, 12, 50])
def test_taking_rows_cuts_frames_at_row_boundaries(count: int) -> None:
    rows, lines = frames(3, 1, 4, 1, 3)
    taken = rows.take(count)
    assert each_row(taken) == lines[:count] and each_row(rows) == lines[count:]
    assert (len(taken), len(rows)) == (min(count, 12), 12 - min(count, 12))
    assert taken.size + rows.size == sum(map(len, lines))


def test_split_by_bytes_keeps_every_run_within_the_limit_and_the_order() -> None:
    rows, lines = frames(40, 1, 1, 25, 3)
    limit = 5 * len(lines[0]) + 1
    runs = rows.split_bytes(limit)
    assert all(run.size <= limit for run in runs)
    assert each_row(concat(runs)) == lines and sum(map(len, runs)) == len(lines)


def test_a_row_larger_than_the_byte_limit_travels_alone() -> None:
    rows = Rows.of_lines([row(0), row(1, width=500), row(2)])
    runs = rows.split_bytes(100)
    assert [len(run) for run in runs] == [1, 1, 1]


def test_halves_of_a_single_frame_hold_all_its_rows() -> None:
    rows, lines = frames(9)
    first, rest = rows.halves()
    assert each_row(first) == lines[:4] and each_row(rest) == lines[4:] and each_row(rows) == lines


def test_body_parts_send_frames_whole_and_gather_single_rows() -> None:
    rows, lines = frames(1, 1, 1, 6, 1, 1)
    parts = [b"".join(group) for group in rows.parts(rows_per_part=2)]
    assert b"".join(parts) == b"".join(lines)
    assert len(parts) == 4 and parts[2] == rows.chunks[3]
