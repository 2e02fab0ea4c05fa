"""Read Tinybird datafiles (`.datasource`, `.pipe`) so the same files drive local ClickHouse.

Only the parts needed to run them locally are read: a datasource's schema and engine settings,
a pipe's nodes in order. `tb check` (the official CLI) validates the files themselves.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

PROJECT_DIR = Path(os.environ.get("IMAGE_SERVICE_TINYBIRD_DIR", Path(__file__).resolve().parents[2] / "tinybird"))

_COLUMN = re.compile(r"^`(?P<name>[^`]+)`\s+(?P<type>.+?)(?:\s+`json:(?P<path>[^`]+)`)?(?:\s+DEFAULT\s+(?P<default>.+))?$")
_SETTING = re.compile(r'^(?P<key>[A-Z_]+)\s+(?:"(?P<quoted>.*)"|(?P<bare>.+))$')


class DatafileError(ValueError):
    """A datafile this reader cannot understand; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type: str
    json_path: str | None
    default: str | None


@dataclass(frozen=True, slots=True)
class Datasource:
    name: str
    columns: tuple[Column, ...]
    engine: str
    partition_key: str | None
    sorting_key: str | None
    ttl: str | None

    def create_table(self, table: str) -> str:
        """CREATE TABLE for plain ClickHouse: the same columns and engine, json paths dropped."""
        columns = ",\n    ".join(
            f"`{c.name}` {c.type}" + (f" DEFAULT {c.default}" if c.default else "") for c in self.columns
        )
        clauses = [f"ENGINE = {self.engine}()"]
        if self.partition_key:
            clauses.append(f"PARTITION BY {self.partition_key}")
        clauses.append(f"ORDER BY ({self.sorting_key})" if self.sorting_key else "ORDER BY tuple()")
        if self.ttl:
            clauses.append(f"TTL {self.ttl}")
        return f"CREATE TABLE {table} (\n    {columns}\n) " + " ".join(clauses)


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    sql: str


@dataclass(frozen=True, slots=True)
class Pipe:
    name: str
    description: str
    nodes: tuple[Node, ...]
    type: str | None


def _blocks(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line number, header line, indented lines below it) for each top-level statement."""
    blocks: list[tuple[int, str, list[str]]] = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            if blocks:
                blocks[-1][2].append("")
            continue
        if line[0].isspace():
            if not blocks:
                raise DatafileError(f"{path}:{number}: indented line outside a block")
            blocks[-1][2].append(line)
        else:
            blocks.append((number, line.strip(), []))
    return blocks


def _dedent(lines: list[str]) -> str:
    text = list(lines)
    while text and not text[-1].strip():
        text.pop()
    indent = min((len(line) - len(line.lstrip()) for line in text if line.strip()), default=0)
    return "\n".join(line[indent:] for line in text)


def read_datasource(path: Path) -> Datasource:
    columns: list[Column] = []
    settings: dict[str, str] = {}
    for number, header, body in _blocks(path):
        if header == "SCHEMA >":
            for offset, line in enumerate(body, 1):
                line = line.strip().rstrip(",")
                if not line:
                    continue
                match = _COLUMN.match(line)
                if match is None:
                    raise DatafileError(f"{path}:{number + offset}: cannot read column {line!r}")
                columns.append(Column(match["name"], match["type"], match["path"], match["default"]))
        elif not header.endswith(">"):
            match = _SETTING.match(header)
            if match is not None:
                settings[match["key"]] = match["quoted"] if match["quoted"] is not None else match["bare"]
    if not columns:
        raise DatafileError(f"{path}: no SCHEMA block")
    return Datasource(
        name=path.stem,
        columns=tuple(columns),
        engine=settings.get("ENGINE", "MergeTree"),
        partition_key=settings.get("ENGINE_PARTITION_KEY"),
        sorting_key=settings.get("ENGINE_SORTING_KEY"),
        ttl=settings.get("ENGINE_TTL"),
    )


def read_pipe(path: Path) -> Pipe:
    nodes: list[Node] = []
    description = ""
    pipe_type: str | None = None
    node_name: str | None = None
    for number, header, body in _blocks(path):
        keyword, _, rest = header.partition(" ")
        if keyword == "NODE":
            node_name = rest.strip()
        elif header == "SQL >":
            if node_name is None:
                raise DatafileError(f"{path}:{number}: SQL outside a NODE")
            nodes.append(Node(node_name, _dedent(body)))
        elif header == "DESCRIPTION >" and node_name is None:
            description = " ".join(line.strip() for line in body if line.strip())
        elif keyword == "TYPE":
            pipe_type = rest.strip().lower()
    if not nodes:
        raise DatafileError(f"{path}: no NODE with SQL")
    return Pipe(path.stem, description, tuple(nodes), pipe_type)


def datasource(name: str = "pollinations_events", project: Path = PROJECT_DIR) -> Datasource:
    return read_datasource(project / "datasources" / f"{name}.datasource")


def endpoint_pipes(project: Path = PROJECT_DIR) -> dict[str, Pipe]:
    """Every pipe published as an endpoint, by name."""
    pipes = (read_pipe(path) for path in sorted((project / "pipes").glob("*.pipe")))
    return {pipe.name: pipe for pipe in pipes if pipe.type == "endpoint"}
