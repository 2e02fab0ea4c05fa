"""Run the Tinybird pipes locally, in embedded ClickHouse (chdb), over the local NDJSON sink.

The table is created from `pollinations_events.datasource` itself and every pipe runs from its
`.pipe` file: the nodes become CTEs in order, and a CTE named `pollinations_events` points at this
engine's own database, so the SQL is exactly what Tinybird runs. chdb is imported only here, when
an engine is built: it is a large library that the request path never needs.

chdb keeps one ClickHouse per process; every engine uses its own database and all calls go
through one lock (chdb's sessions are not safe to use from several threads at once).
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from ..tracking.rows import is_row_line
from ..tracking.sinks import rotated_files
from .datafile import PROJECT_DIR, Datasource, Pipe, datasource, endpoint_pipes
from .template import TemplateError, render

_LOCK = threading.Lock()
# Output as Tinybird's API answers: numbers as numbers, times as 'YYYY-MM-DD HH:MM:SS' in UTC.
QUERY_SETTINGS = "SETTINGS session_timezone = 'UTC', output_format_json_quote_64bit_integers = 0"
# What Tinybird would quarantine, ClickHouse must refuse: unknown fields, nulls in non-Nullable columns.
STRICT_INSERT = (
    "SETTINGS session_timezone = 'UTC', input_format_skip_unknown_fields = 0, "
    "input_format_null_as_default = 0, input_format_defaults_for_omitted_fields = 0"
)
LENIENT_INSERT = "SETTINGS session_timezone = 'UTC', input_format_skip_unknown_fields = 1"
CHUNK_BYTES = 8 * 1024 * 1024


class AnalyticsError(RuntimeError):
    """A pipe could not run (bad parameter, unknown pipe, ClickHouse error); the message says why."""


def compose(nodes: Sequence[tuple[str, str]], table: str) -> str:
    """One query for a pipe's rendered nodes: earlier nodes as CTEs, the last one as the SELECT."""
    ctes = [f"pollinations_events AS (SELECT * FROM {table})"]
    ctes += [f"{name} AS (\n{sql}\n)" for name, sql in nodes[:-1]]
    return "WITH " + ",\n".join(ctes) + "\n" + nodes[-1][1]


def _identities(files: Sequence[Path]) -> tuple[tuple[str, int, int], ...]:
    """Name, inode and size of each file: what tells that rotated files changed."""
    found = []
    for file in files:
        with contextlib.suppress(FileNotFoundError):
            stat = file.stat()
            found.append((file.name, stat.st_ino, stat.st_size))
    return tuple(found)


def _ends_a_line(handle: BinaryIO, offset: int) -> bool:
    handle.seek(offset - 1)
    return handle.read(1) == b"\n"


class LocalEngine:
    """The project's datasource and pipes on embedded ClickHouse."""

    def __init__(self, project: Path = PROJECT_DIR) -> None:
        from chdb import session

        self.datasource: Datasource = datasource(project=project)
        self.pipes: dict[str, Pipe] = endpoint_pipes(project)
        self.database = f"analytics_{secrets.token_hex(6)}"
        self.table = f"{self.database}.{self.datasource.name}"
        self._session = session.Session()
        self._loaded: tuple[Path, tuple[int, int], int, tuple[tuple[str, int, int], ...]] | None = None
        self.execute(f"CREATE DATABASE {self.database}")
        self.execute(self.datasource.create_table(self.table))

    def execute(self, sql: str, fmt: str = "CSV") -> bytes:
        with _LOCK:
            try:
                return bytes(self._session.query(sql, fmt).bytes())
            except RuntimeError as exc:  # chdb raises ChdbError (two classes of that name), a RuntimeError
                raise AnalyticsError(str(exc).strip().splitlines()[0]) from None

    def insert(self, ndjson: bytes, *, strict: bool = True) -> None:
        """Insert NDJSON rows; strict refuses any row Tinybird would quarantine (the whole insert fails)."""
        if ndjson.strip():
            settings = STRICT_INSERT if strict else LENIENT_INSERT
            self.execute(f"INSERT INTO {self.table} {settings} FORMAT JSONEachRow\n" + ndjson.decode())

    def insert_rows(self, rows: Iterable[Mapping[str, Any]], *, strict: bool = True) -> None:
        self.insert(b"".join(orjson.dumps(row) + b"\n" for row in rows), strict=strict)

    def truncate(self) -> None:
        self.execute(f"TRUNCATE TABLE {self.table}")
        self._loaded = None

    def load_file(self, path: Path) -> None:
        """Bring the table up to date with the local sink's file, reading only what was appended.
        A file that is not the one read before (rotated: another inode, shorter, or not ending a
        line where reading stopped), or rotated files that changed, are read again from the start,
        the rotated files first. Unchanged, nothing is read again (between a rotation and the next
        batch only the rotated files exist: each refresh used to read them all)."""
        try:
            stat = path.stat()
            size, identity = stat.st_size, (stat.st_dev, stat.st_ino)
        except FileNotFoundError:
            size, identity = 0, (0, 0)
        old_files = rotated_files(path)
        rotated = _identities(old_files)
        previous = self._loaded
        offset = 0
        if previous is not None and previous[:2] == (path, identity) and previous[2] <= size and previous[3] == rotated:
            offset = previous[2]
        with path.open("rb") if size else contextlib.nullcontext() as handle:
            if handle is not None and offset and not _ends_a_line(handle, offset):
                offset = 0
            # Nothing was read of this file yet (it was empty, or not there), and the rotated files
            # are as they were: what the table holds is still right.
            untouched = (previous is not None and previous[0] == path and previous[3] == rotated
                         and previous[2] == 0 and previous[1] in ((0, 0), identity))
            if offset == 0 and not untouched:
                if previous is not None:
                    self.truncate()
                for old in reversed(old_files):
                    with contextlib.suppress(FileNotFoundError), old.open("rb") as rotated_file:
                        self._read_lines(rotated_file, 0)
            if handle is not None and size > offset:
                offset = self._read_lines(handle, offset)
        self._loaded = (path, identity, offset, rotated)

    def _read_lines(self, handle: BinaryIO, offset: int) -> int:
        """Insert the whole lines from `offset` on; the answer is where they end."""
        handle.seek(offset)
        while chunk := handle.read(CHUNK_BYTES):
            complete = chunk[: chunk.rfind(b"\n") + 1]
            if not complete:
                break
            self._insert_lines(complete)
            offset += len(complete)
            handle.seek(offset)
        return offset

    def _insert_lines(self, ndjson: bytes) -> None:
        """A torn line (a crash mid-write) costs only itself: ClickHouse's own error skipping takes
        the next row with it, so the lines are checked here, and only when the insert fails."""
        try:
            self.insert(ndjson, strict=False)
        except AnalyticsError:
            self.insert(b"".join(line + b"\n" for line in ndjson.splitlines() if is_row_line(line)), strict=False)

    def pipe_sql(self, name: str, params: Mapping[str, Any] | None = None) -> str:
        pipe = self.pipes.get(name)
        if pipe is None:
            raise AnalyticsError(f"unknown pipe {name!r} (known: {', '.join(sorted(self.pipes))})")
        try:
            nodes = [(node.name, render(node.sql, params)) for node in pipe.nodes]
        except TemplateError as exc:
            raise AnalyticsError(f"{name}: {exc}") from None
        return compose(nodes, self.table)

    def query(self, sql: str) -> dict[str, Any]:
        """Run SQL; the answer has Tinybird's shape: {meta, data, rows, statistics}."""
        started = time.perf_counter()
        answer: dict[str, Any] = orjson.loads(self.execute(f"{sql}\n{QUERY_SETTINGS}", "JSON"))
        answer.setdefault("statistics", {})["elapsed"] = time.perf_counter() - started
        return answer

    def run_pipe(self, name: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return self.query(self.pipe_sql(name, params))

    def close(self) -> None:
        self.execute(f"DROP DATABASE IF EXISTS {self.database}")
