"""Render pipe nodes with Tinybird's official renderer; runs under .venv-tb's Python (tinybird-cli).

stdin: JSON [{"sql": ..., "params": {...}}]; stdout: JSON [{"sql": ...} | {"error": ...}].
"""

import json
import sys

from tinybird.sql_template import render_sql_template


def render(sql: str, params: dict[str, str]) -> dict[str, str]:
    stripped = sql.lstrip()
    if not stripped.startswith("%"):
        return {"sql": sql}
    try:
        return {"sql": render_sql_template(stripped[1:].lstrip("\n"), params)[0]}
    except Exception as exc:  # every failure is reported back to the test
        return {"error": f"{type(exc).__name__}: {exc}"}


json.dump([render(job["sql"], job["params"]) for job in json.load(sys.stdin)], sys.stdout)
