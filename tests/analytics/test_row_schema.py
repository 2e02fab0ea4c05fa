"""Every row the forwarder can emit fits the datasource: nothing Tinybird would quarantine, nothing altered.

ClickHouse is laxer than Tinybird's quarantine (it wraps overflowing integers, fills omitted columns
with defaults, reads null as NaN in a Float64), so a row passes only if (1) it carries every column,
with null only in Nullable ones, (2) a strict insert accepts it, and (3) reading it back gives the
values that were sent.
"""

from __future__ import annotations

import math
import time
from typing import Any

import orjson
import pytest

from image_service.analytics.engine import AnalyticsError, LocalEngine
from image_service.tracking import COLUMNS, build_row


def _equal(sent: Any, stored: Any, kind: str) -> bool:
    if sent is None or stored is None:
        return sent is stored
    if "Float" in kind:
        return math.isclose(float(sent), float(stored), rel_tol=1e-6)
    return sent == stored


def assert_ingests_exactly(engine: LocalEngine, rows: list[dict[str, Any]]) -> None:
    for row in rows:
        assert sorted(row) == sorted(COLUMNS), f"a row without every column is quarantined: {set(COLUMNS) ^ set(row)}"
        nulls = [k for k, kind in COLUMNS.items() if row[k] is None and not kind.startswith("Nullable")]
        assert not nulls, f"null in a non-Nullable column is quarantined: {nulls}"
    engine.truncate()
    engine.insert_rows(rows, strict=True)
    stored = {r["event_id"]: r for r in engine.query(f"SELECT * FROM {engine.table}")["data"]}
    assert len(stored) == len(rows)
    for row in rows:
        back = stored[row["event_id"]]
        changed = {k: (v, back[k]) for k, v in row.items() if not _equal(v, back[k], COLUMNS[k])}
        assert not changed, (row["event"], changed)


def test_every_row_of_the_real_server_and_text_tracker_ingests_unchanged(
    engine: LocalEngine, traffic: list[dict[str, Any]]
) -> None:
    """Stage rows (request, cache, generation, moderation), terminal rows of each outcome, text rows."""
    assert {r["stage"] for r in traffic} == {"request", "cache", "generation", "moderation", "response", "text"}
    assert_ingests_exactly(engine, traffic)


def _event(name: str, **fields: Any) -> dict[str, Any]:
    now = time.time()
    return {"event": name, "_ts": now, "request_start": now - 0.5, "request_id": "r" * 32, **fields}


ROWS = {
    "blocked terminal (451)": _event("request.completed", stage="response", status=451, error="content_blocked",
                                     is_mature=True, is_child=False, model="flux", cache_status="miss", duration_ms=12.5),
    "content.flagged": _event("content.flagged", stage="moderation", is_child=True, labels=["child"], duration_ms=3.0),
    "generation.failed": _event("generation.failed", stage="generation", error="generation_failed",
                                exception="ConnectionError: http://user:pw@10.0.0.1/api?token=sk-abcdefabcdef1234",
                                duration_ms=5001.0, model="flux", backend="openai", provider="azure"),
    "timeout terminal (504)": _event("request.completed", stage="response", status=504, error="generation_timeout",
                                     duration_ms=60000.25, traceback="Traceback...\n  File \"/srv/app/x.py\""),
    "every optional field set": _event("request.completed", stage="response", status=200, user="u", username="n",
                                       tier="flower", referrer="https://a.example/p?token=x", was_transformed=True,
                                       steps=4, guidance=7.5, cost=0.04, seed=2**63 - 1, width=2048, height=8,
                                       nologo=True, enhance=True, private=True, prompt="secret", nofeed=True,
                                       cache_status="shared-wait", labels={"a": 1}),
    "out-of-range numbers dropped": _event("request.completed", stage="response", status=200, width=70000,
                                           height=-1, steps="many", duration_ms=-3.0),
    "bare event": {"event": "something.else", "_ts": time.time()},
    "text with nulls": _event("text.completion", stage="text", model="m", duration_ms=1.0, prompt_tokens=None,
                              completion_tokens=2**40, http_status=None, status="error"),
}


@pytest.mark.parametrize("name", sorted(ROWS))
def test_built_rows_ingest_unchanged(engine: LocalEngine, name: str) -> None:
    assert_ingests_exactly(engine, [build_row(ROWS[name])])


@pytest.mark.parametrize(("change", "value"), [("width", 70000), ("duration", -1), ("start_time", "yesterday"),
                                                ("cost", None), ("extra_column", 1)])
def test_a_row_tinybird_would_quarantine_fails_the_check(engine: LocalEngine, change: str, value: Any) -> None:
    """The check itself can fail: overflow, negative unsigned, bad time, null in a non-Nullable column, unknown field."""
    row = build_row(ROWS["bare event"]) | {change: value}
    with pytest.raises((AssertionError, AnalyticsError)):
        assert_ingests_exactly(engine, [orjson.loads(orjson.dumps(row))])


def test_a_row_missing_a_column_fails_the_check(engine: LocalEngine) -> None:
    row = build_row(ROWS["bare event"])
    del row["tier"]
    with pytest.raises(AssertionError, match="quarantined"):
        assert_ingests_exactly(engine, [row])
