"""Render a pipe node's SQL template the way Tinybird does, for the subset our pipes use.

Tinybird's own renderer (`tinybird.sql_template.render_sql_template`, in PyPI `tinybird-cli`) pins
pydantic, urllib3, click and cryptography to old versions, so the service cannot depend on it.
This renderer covers exactly what `tinybird/pipes/*.pipe` use — `{{ String|DateTime|Int32|Float64
(name[, default]) }}`, `{% if|elif|else|end %}` with `defined(name)`, `==`, `!=`, `and`, `or`,
`not`, and `{{ error('...') }}` — and rejects anything else. The tests render every pipe with both
renderers, over many parameter sets, and require identical SQL.
"""

from __future__ import annotations

import ast
import functools
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

_TAG = re.compile(r"({{.*?}}|{%.*?%})", re.S)
# Tinybird's escaping of string values inside quotes (sqlescape_for_string_expression).
_ESCAPES = str.maketrans({
    "\0": "\\0", "\r": "\\r", "\x08": "\\b", "\x09": "\\t", "\x1a": "\\z", "\n": "\\n",
    '"': '\\"', "'": "\\'", "\\": "\\\\", "%": "\\%", "`": "\\`",
})
_INT = re.compile(r"^-?\d+$")
_FLOAT = re.compile(r"^-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class TemplateError(ValueError):
    """A parameter is missing or invalid, or the template uses syntax this renderer does not know."""


class _Sql(str):
    """A value already rendered as SQL (a cast or a quoted literal); compares as its raw value."""

    sql: str

    def __new__(cls, raw: str, sql: str) -> _Sql:
        value = super().__new__(cls, raw)
        value.sql = sql
        return value


def quote(text: str) -> str:
    return "'" + text.translate(_ESCAPES) + "'"


def _string(raw: Any) -> _Sql:
    return _Sql(str(raw), quote(str(raw)))


def _datetime(raw: Any) -> _Sql:
    text = str(raw)
    try:
        datetime.strptime(text, "%Y-%m-%d %H:%M:%S")
    except ValueError:
        raise TemplateError(f"Error validating '{text}' to type DateTime") from None
    return _Sql(text, quote(text))


def _int32(raw: Any) -> _Sql:
    text = str(raw)
    if not _INT.match(text) or not -(2**31) <= int(text) < 2**31:
        raise TemplateError(f"Error validating '{text}' to type Int32")
    return _Sql(text, f"toInt32('{int(text)}')")


def _float64(raw: Any) -> _Sql:
    text = str(raw)
    if not _FLOAT.match(text):
        raise TemplateError(f"Error validating '{text}' to type Float64")
    return _Sql(text, f"toFloat64('{float(text)}')")


TYPES = {"String": _string, "DateTime": _datetime, "Int32": _int32, "Float64": _float64}


@dataclass
class _Block:
    branches: list[tuple[ast.expr | None, list[Any]]] = field(default_factory=list)


def _parse(template: str) -> list[Any]:
    root: list[Any] = []
    stack: list[tuple[_Block, list[Any]]] = []
    current = root
    for piece in _TAG.split(template):
        if piece.startswith("{{"):
            current.append(ast.parse(piece[2:-2].strip(), mode="eval").body)
        elif piece.startswith("{%"):
            words = piece[2:-2].strip().split(None, 1)
            keyword, rest = words[0], words[1] if len(words) > 1 else ""
            if keyword == "if":
                block = _Block()
                current.append(block)
                stack.append((block, current))
                current = []
                block.branches.append((ast.parse(rest, mode="eval").body, current))
            elif keyword in ("elif", "else") and stack:
                current = []
                test = ast.parse(rest, mode="eval").body if keyword == "elif" else None
                stack[-1][0].branches.append((test, current))
            elif keyword == "end" and stack:
                current = stack.pop()[1]
            else:
                raise TemplateError(f"unsupported template tag: {piece}")
        elif piece:
            current.append(piece)
    if stack:
        raise TemplateError("an {% if %} block has no {% end %}")
    return root


class _Evaluator:
    def __init__(self, params: Mapping[str, Any]) -> None:
        self.params = params

    def value(self, node: ast.expr) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.List):
            return [self.value(item) for item in node.elts]
        if isinstance(node, ast.Name):
            return self.params.get(node.id)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return not self.value(node.operand)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -self.value(node.operand)
        if isinstance(node, ast.BoolOp):
            values = (self.value(item) for item in node.values)
            return all(values) if isinstance(node.op, ast.And) else any(values)
        if isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], ast.Eq | ast.NotEq):
            equal = str(self.value(node.left)) == str(self.value(node.comparators[0]))
            return equal if isinstance(node.ops[0], ast.Eq) else not equal
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            return self.call(node.func.id, node)
        raise TemplateError(f"unsupported template expression: {ast.unparse(node)}")

    def call(self, name: str, node: ast.Call) -> Any:
        if name == "defined":
            (arg,) = node.args
            if not isinstance(arg, ast.Name):
                raise TemplateError("defined() takes a parameter name")
            return self.params.get(arg.id) is not None
        if name == "error":
            raise TemplateError(str(self.value(node.args[0])))
        if name not in TYPES or not node.args or not isinstance(node.args[0], ast.Name):
            raise TemplateError(f"unsupported template function: {ast.unparse(node)}")
        raw = self.params.get(node.args[0].id)
        if raw is None and len(node.args) > 1:
            raw = self.value(node.args[1])
        if raw is None:
            raise TemplateError(f"the parameter {node.args[0].id!r} is required")
        return TYPES[name](raw)

    def output(self, node: ast.expr) -> str:
        value = self.value(node)
        if isinstance(value, _Sql):
            return value.sql
        if isinstance(value, str):
            return quote(value)
        if value is None:
            raise TemplateError(f'expression "{ast.unparse(node)[:20]}" evaluated to null')
        return str(value)


def _emit(nodes: list[Any], evaluator: _Evaluator, out: list[str]) -> None:
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, _Block):
            for test, body in node.branches:
                if test is None or evaluator.value(test):
                    _emit(body, evaluator, out)
                    break
        else:
            out.append(evaluator.output(node))


def is_template(sql: str) -> bool:
    return sql.lstrip().startswith("%")


# CPython 3.11's ast.parse is not safe to call from several threads at once ("AST constructor
# recursion depth mismatch"); pipes render in the CPU pool, so parsing is serialised and cached.
_PARSE_LOCK = threading.Lock()


@functools.lru_cache(maxsize=256)
def _parsed(template: str) -> list[Any]:
    """The parsed template, shared read-only between renders."""
    with _PARSE_LOCK:
        return _parse(template)


def strip_marker(sql: str) -> str:
    """The SQL without Tinybird's leading `%` line (the marker is not part of the query)."""
    stripped = sql.lstrip()
    return stripped[1:].lstrip("\n") if stripped.startswith("%") else sql


def render(sql: str, params: Mapping[str, Any] | None = None) -> str:
    """The node's SQL with `params` substituted; SQL without the `%` marker is returned as is."""
    if not is_template(sql):
        return sql
    out: list[str] = []
    _emit(_parsed(strip_marker(sql)), _Evaluator({k: v for k, v in (params or {}).items() if v is not None}), out)
    return "".join(out)
