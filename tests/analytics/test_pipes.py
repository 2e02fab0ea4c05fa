"""Every pipe, rendered by Tinybird's own template renderer and run on ClickHouse, matches ground truth.

The rows are what the real server wrote for a mix of requests (plus text completions and a synthetic
40-minute series with one bad minute, built by the forwarder's own row builder), with a third of them
delivered twice, as a retried Events API batch would.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import pytest

from image_service.analytics.engine import LocalEngine, compose
from image_service.tracking.rows import build_row

from . import reference
from .conftest import official_render


def _series() -> list[dict[str, Any]]:
    """20 quiet minutes of 'flux' traffic, then a minute with 4 errors in 12 and a slow p95. Redis is
    down in the first minute and for half the second: their requests bypass the cache."""
    base = (int(time.time()) // 60 - 40) * 60
    rows = []
    for minute in range(21):
        for i in range(12):
            start = base + minute * 60 + i * 4
            bad = minute == 20
            duration = (900.0 + 40 * i) if bad else (100.0 + (i * 7 + minute * 3) % 50)
            rows.append(build_row({
                "event": "request.completed", "stage": "response", "status": 502 if bad and i < 4 else 200,
                "_ts": start + duration / 1000, "request_start": start, "duration_ms": duration, "model": "flux",
                "cache_status": "bypass" if minute == 0 or (minute == 1 and i % 2) else "miss",
                "user": f"u{i % 5}", "tier": "seed",
            }))
    return rows


def _at(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S")


@pytest.fixture(scope="module")
def rows(traffic: list[dict[str, Any]]) -> list[dict[str, Any]]:
    every = traffic + _series()
    return every + every[::3]


@pytest.fixture(scope="module")
def loaded(engine: LocalEngine, rows: list[dict[str, Any]]) -> LocalEngine:
    engine.truncate()
    engine.insert_rows(rows)
    return engine


def _param_sets() -> list[dict[str, str]]:
    now = time.time()
    return [
        {},
        {"bucket": "minute"},
        {"bucket": "day", "service_type": "image"},
        {"bucket": "minute", "model": "sketch"},
        {"bucket": "hour", "service_type": "text"},
        {"bucket": "minute", "start": _at(now - 45 * 60), "end": _at(now - 19 * 60)},
        {"bucket": "minute", "max_error_rate": "0.2", "max_p95_ms": "500", "factor": "2.5", "min_requests": "3"},
        {"bucket": "minute", "min_requests": "1", "max_error_rate": "0", "service_type": "image"},
        {"bucket": "minute", "min_error_rate": "0.5", "min_p95_rise_ms": "5000", "min_requests": "1"},
        {"bucket": "minute", "since": _at(now - 25 * 60), "min_requests": "1", "max_error_rate": "0"},
    ]


PARAM_SETS = _param_sets()


@pytest.fixture(scope="module")
def official(loaded: LocalEngine) -> dict[tuple[str, int], str]:
    """Every (pipe, parameter set) rendered node by node by tinybird.sql_template, composed into one query."""
    jobs, index = [], []
    for name, pipe in loaded.pipes.items():
        for number, params in enumerate(PARAM_SETS):
            for node in pipe.nodes:
                jobs.append({"sql": node.sql, "params": params})
                index.append((name, number, node.name))
    rendered = official_render(jobs)
    nodes: dict[tuple[str, int], list[tuple[str, str]]] = {}
    for (name, number, node), answer in zip(index, rendered, strict=True):
        assert "sql" in answer, answer
        nodes.setdefault((name, number), []).append((node, answer["sql"]))
    return {key: compose(value, loaded.table) for key, value in nodes.items()}


def _close(actual: Any, expected: Any, field: str) -> bool:
    if expected is None or actual is None or isinstance(expected, list | str):
        return actual == expected
    if field in reference.QUANTILES:
        return abs(actual - expected) <= 0.02 * abs(expected) + 1e-9
    if isinstance(expected, int):
        return actual == expected
    return abs(actual - expected) <= 1e-9


@pytest.mark.parametrize("name", sorted(reference.PIPES))
@pytest.mark.parametrize("number", range(len(PARAM_SETS)))
def test_pipe_figures_equal_an_independent_computation(
    name: str, number: int, loaded: LocalEngine, rows: list[dict[str, Any]], official: dict[tuple[str, int], str]
) -> None:
    """Counts exact, rates to 1e-9, quantiles within 2%, duplicated deliveries counted once."""
    keys, compute = reference.PIPES[name]
    expected = compute(rows, PARAM_SETS[number])
    answer = loaded.query(official[(name, number)])
    actual = {tuple(row[k] for k in keys): row for row in answer["data"]}
    assert set(actual) == set(expected)
    for key, figures in expected.items():
        wrong = {f: (actual[key][f], v) for f, v in figures.items() if not _close(actual[key][f], v, f)}
        assert not wrong, (key, wrong)


def test_the_mix_covers_every_outcome(rows: list[dict[str, Any]]) -> None:
    """The ground truth is only as good as its data: hits, misses, shared waits, 4xx, 5xx, flags, text."""
    terminal = reference.requests(rows, {})
    assert {r["status"] for r in terminal} >= {"success", "rejected", "error"}
    assert {r["cache_status"] for r in terminal} >= {"hit", "miss", "shared-wait", "bypass", None}
    assert {r["service_type"] for r in terminal} == {"image", "text"}
    assert any(r["is_mature"] for r in terminal) and any(r["is_child"] for r in terminal)
    assert len(rows) > len({r["event_id"] for r in rows})


def test_duplicated_deliveries_do_not_change_any_figure(loaded: LocalEngine, rows: list[dict[str, Any]]) -> None:
    """Inserting every row a second time leaves every pipe's answer as it was."""
    before = {name: loaded.run_pipe(name, {"bucket": "minute"})["data"] for name in loaded.pipes}
    loaded.insert_rows(rows)
    try:
        after = {name: loaded.run_pipe(name, {"bucket": "minute"})["data"] for name in loaded.pipes}
    finally:
        loaded.truncate()
        loaded.insert_rows(rows)
    assert after == before


def test_the_bad_minute_is_reported_as_an_anomaly(loaded: LocalEngine) -> None:
    """The synthetic series' last minute fires on both baselines; the quiet minutes do not."""
    data = loaded.run_pipe("anomalies", {"model": "flux"})["data"]
    assert len(data) == 1
    (fired,) = data
    assert fired["errors"] == 4 and fired["requests"] == 12
    assert set(fired["reasons"]) == {"error_rate_above_threshold", "error_rate_above_baseline", "p95_above_baseline"}


def _minute_rows(minute: int, durations: list[float], statuses: list[int]) -> list[dict[str, Any]]:
    """One minute of 'flux' terminal rows, `minute` minutes after a base 30 minutes ago."""
    base = (int(time.time()) // 60 - 30 + minute) * 60
    return [build_row({
        "event": "request.completed", "stage": "response", "status": status,
        "_ts": base + i * 50 / len(durations) + duration / 1000, "request_start": base + i * 50 / len(durations),
        "duration_ms": duration, "model": "flux", "cache_status": "miss",
    }) for i, (duration, status) in enumerate(zip(durations, statuses, strict=True))]


def _run_on(engine: LocalEngine, rows: list[dict[str, Any]], restore: list[dict[str, Any]], pipe: str,
            params: dict[str, str]) -> list[dict[str, Any]]:
    engine.truncate()
    engine.insert_rows(rows)
    try:
        return engine.run_pipe(pipe, params)["data"]
    finally:
        engine.truncate()
        engine.insert_rows(restore)


def test_a_flood_of_rejections_does_not_hide_a_slow_service(loaded: LocalEngine, rows: list[dict[str, Any]]) -> None:
    """429s answer in a millisecond; the p95 that matters is the answered requests' 15 s."""
    minute = _minute_rows(0, [2000.0] * 45 + [15000.0] * 5 + [1.0] * 50, [200] * 50 + [429] * 50)
    (latency,) = _run_on(loaded, minute, rows, "latency_percentiles", {"bucket": "minute"})
    assert latency["requests"] == 50 and latency["p95_ms"] >= 14000
    (fired,) = _run_on(loaded, minute, rows, "anomalies", {"max_p95_ms": "10000"})
    assert fired["reasons"] == ["p95_above_threshold"] and fired["requests"] == 100


def test_healthy_traffic_over_a_spotless_baseline_raises_no_alert(loaded: LocalEngine, rows: list[dict[str, Any]]) -> None:
    """A first error in a thousand, or p95 moving from 0.3 ms to 5 ms, is a multiple of its
    baseline and nothing an operator should be woken for."""
    quiet = [row for m in range(12) for row in _minute_rows(m, [0.3] * 200, [200] * 200)]
    busier = _minute_rows(12, [0.3] * 900 + [5.0] * 100, [200] * 999 + [502])
    assert _run_on(loaded, quiet + busier, rows, "anomalies", {}) == []
    worse = _minute_rows(12, [0.3] * 900 + [900.0] * 100, [200] * 950 + [502] * 50)
    (fired,) = _run_on(loaded, quiet + worse, rows, "anomalies", {})
    assert set(fired["reasons"]) == {"error_rate_above_baseline", "p95_above_baseline"}


def test_daily_windows_have_the_days_they_need_for_a_baseline(loaded: LocalEngine, rows: list[dict[str, Any]]) -> None:
    """With bucket=day the default range reaches back far enough for three preceding days."""
    days = []
    for day in range(6, -1, -1):
        start = int(time.time()) - day * 86400 - 60
        days += [build_row({
            "event": "request.completed", "stage": "response", "status": 502 if day == 0 and i < 3 else 200,
            "_ts": start + i, "request_start": start + i, "duration_ms": 100.0, "model": "flux",
        }) for i in range(20)]
    (fired,) = _run_on(loaded, days, rows, "anomalies", {"bucket": "day"})
    assert "error_rate_above_baseline" in fired["reasons"]


def test_an_unknown_bucket_is_refused(loaded: LocalEngine) -> None:
    with pytest.raises(Exception, match="bucket must be minute, hour or day"):
        loaded.run_pipe("request_volume", {"bucket": "week"})


def test_a_check_just_after_a_timeout_ended_reports_it(loaded: LocalEngine, rows: list[dict[str, Any]]) -> None:
    """Twenty requests start in one minute and time out 60 s later: their rows exist only from then
    on, so a check that reports from the next minute must find them there, not in the minute past."""
    timeouts = _minute_rows(0, [60000.0] * 20, [504] * 20)
    ended = datetime.fromisoformat(max(row["end_time"] for row in timeouts)).replace(second=0, microsecond=0)
    (fired,) = _run_on(loaded, timeouts, rows, "anomalies", {"since": ended.strftime("%Y-%m-%d %H:%M:%S")})
    assert fired["t"] == ended.strftime("%Y-%m-%d %H:%M:%S") and fired["errors"] == 20
    assert set(fired["reasons"]) == {"error_rate_above_threshold", "p95_above_threshold"}


def test_a_few_slow_answers_among_rejections_do_not_fire_a_latency_alert(loaded: LocalEngine, rows: list[dict[str, Any]]) -> None:
    """One client's burst: seven 429s and five answers queued 19 s behind each other. Five answers
    are below min_requests, whatever the rejections add to the window's count."""
    burst = _minute_rows(0, [1.0] * 7 + [19000.0] * 5, [429] * 7 + [200] * 5)
    assert _run_on(loaded, burst, rows, "anomalies", {}) == []


def test_latency_counts_only_requests_the_service_answered(loaded: LocalEngine, rows: list[dict[str, Any]]) -> None:
    """A prompt refused as content answers at once; a request cancelled at shutdown was never answered."""
    minute = _minute_rows(0, [50.0, 70.0, 1.0, 1.0, 30000.0], [200, 502, 451, 451, 503])
    minute[-1]["error"] = "cancelled"
    (latency,) = _run_on(loaded, minute, rows, "latency_percentiles", {"bucket": "minute"})
    assert latency["requests"] == 2 and latency["p50_ms"] == 60.0


def test_an_end_alone_reaches_back_a_day_from_it(loaded: LocalEngine, rows: list[dict[str, Any]]) -> None:
    old = [build_row({
        "event": "request.completed", "stage": "response", "status": 200, "_ts": time.time() - 3 * 86400 + i,
        "request_start": time.time() - 3 * 86400 + i, "duration_ms": 5.0, "model": "flux",
    }) for i in range(50)]
    (volume,) = _run_on(loaded, old, rows, "request_volume", {"bucket": "day", "end": _at(time.time() - 2 * 86400)})
    assert volume["requests"] == 50


def test_the_default_range_starts_on_a_bucket_boundary(loaded: LocalEngine, rows: list[dict[str, Any]]) -> None:
    """One request an hour for three days: yesterday's daily bucket holds all 24, not the part of
    it after this time yesterday."""
    now = time.time()
    hourly = [build_row({
        "event": "request.completed", "stage": "response", "status": 200, "_ts": now - hour * 3600,
        "request_start": now - hour * 3600, "duration_ms": 5.0, "model": "flux",
    }) for hour in range(72)]
    yesterday = datetime.fromtimestamp(now - 86400, UTC).strftime("%Y-%m-%d 00:00:00")
    volume = {row["t"]: row["requests"] for row in _run_on(loaded, hourly, rows, "request_volume", {"bucket": "day"})}
    assert volume[yesterday] == 24 and min(volume) == yesterday
