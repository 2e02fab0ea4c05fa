"""Serialised rows on their way to the sink, held as chunks of whole NDJSON rows.

A frame of rows from the encoder process arrives as one bytes object and stays one chunk until a
batch boundary, a byte limit, a 413 split or the spool needs it cut: slicing thousands of rows out
of it and joining them again into a request body cost the event loop more than building the body
from whole frames. Rows never contain a raw newline (JSON escapes it), so a chunk is cut at its
newlines, which only happens on those rarer paths.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator


class Rows:
    """An ordered run of rows: `chunks[i]` holds `counts[i]` whole rows."""

    __slots__ = ("chunks", "counts", "rows", "size")

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.counts: list[int] = []
        self.rows = 0
        self.size = 0

    @classmethod
    def of_lines(cls, lines: Iterable[bytes]) -> Rows:
        rows = cls()
        for line in lines:
            rows.add(line, 1)
        return rows

    def __len__(self) -> int:
        return self.rows

    def __bool__(self) -> bool:
        return self.rows > 0

    def add(self, chunk: bytes, count: int) -> None:
        """Append `count` whole rows held in `chunk`."""
        if count:
            self.chunks.append(chunk)
            self.counts.append(count)
            self.rows += count
            self.size += len(chunk)

    def extend(self, other: Rows) -> None:
        for chunk, count in zip(other.chunks, other.counts):
            self.add(chunk, count)

    def take(self, count: int) -> Rows:
        """Remove and return the first `count` rows (all of them if fewer)."""
        taken = Rows()
        index = 0
        while index < len(self.chunks) and taken.rows + self.counts[index] <= count:
            taken.add(self.chunks[index], self.counts[index])
            index += 1
        if index < len(self.chunks) and taken.rows < count:
            head, tail = _cut(self.chunks[index], count - taken.rows)
            taken.add(head, count - taken.rows)
            self.chunks[index] = tail
            self.counts[index] -= taken.counts[-1]
        del self.chunks[:index], self.counts[:index]
        self.rows -= taken.rows
        self.size -= taken.size
        return taken

    def split_bytes(self, limit: int) -> list[Rows]:
        """Consecutive runs of at most `limit` bytes each (a single larger row makes a run of its own)."""
        if self.size <= limit:
            return [self] if self.rows else []
        runs = [Rows()]
        for line in _pieces(self, limit):
            if runs[-1].rows and runs[-1].size + len(line[0]) > limit:
                runs.append(Rows())
            runs[-1].add(*line)
        return runs

    def halves(self) -> tuple[Rows, Rows]:
        """The first half of the rows and the rest, in order."""
        rest = Rows()
        rest.extend(self)
        first = rest.take(self.rows // 2)
        return first, rest

    def parts(self, rows_per_part: int) -> Iterator[list[bytes]]:
        """The rows in groups to be joined into a request body's parts: a frame is a part already,
        single rows are gathered up to `rows_per_part`."""
        group: list[bytes] = []
        for chunk, count in zip(self.chunks, self.counts):
            if count > 1:
                if group:
                    yield group
                    group = []
                yield [chunk]
            else:
                group.append(chunk)
                if len(group) >= rows_per_part:
                    yield group
                    group = []
        if group:
            yield group


def concat(runs: Iterable[Rows]) -> Rows:
    joined = Rows()
    for run in runs:
        joined.extend(run)
    return joined


def _cut(chunk: bytes, rows: int) -> tuple[bytes, bytes]:
    """The first `rows` rows of `chunk` and the rest."""
    end = 0
    for _ in range(rows):
        end = chunk.index(b"\n", end) + 1
    return chunk[:end], chunk[end:]


def _pieces(rows: Rows, limit: int) -> Iterator[tuple[bytes, int]]:
    """The chunks of `rows`, with any chunk over `limit` bytes cut into single rows."""
    for chunk, count in zip(rows.chunks, rows.counts):
        if count > 1 and len(chunk) > limit:
            for line in chunk.splitlines(keepends=True):
                yield line, 1
        else:
            yield chunk, count
