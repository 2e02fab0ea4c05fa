"""`image-service stats` and `image-service alerts check`, on the local sink and against a Tinybird stand-in."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from image_service.analytics.commands import previous_window
from image_service.analytics.engine import LocalEngine
from image_service.cli import main
from image_service.tracking.rows import build_row

from . import reference

EVER = "2000-01-01 00:00:00"


@pytest.fixture
def events(traffic: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("TINYBIRD_READ_TOKEN", raising=False)
    path = tmp_path / "events.ndjson"
    path.write_bytes(b"".join(orjson.dumps(row) + b"\n" for row in traffic + traffic[:10]))
    return path


class PipesAPI:
    """Tinybird's pipe endpoint contract: GET /v0/pipes/{name}.json, Bearer read token, {meta, data, rows, statistics}.

    Answers come from the same pipes run on chdb, so the remote path prints what Tinybird would."""

    def __init__(self, engine: LocalEngine, token: str = "read-token") -> None:
        self.engine, self.token = engine, token
        self.calls: list[tuple[str, dict[str, str]]] = []

    async def handle(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response({"error": "invalid authentication token"}, status=403)
        name = request.match_info["name"]
        self.calls.append((name, dict(request.query)))
        if name not in self.engine.pipes:
            return web.json_response({"error": f"The pipe '{name}' does not exist"}, status=404)
        return web.json_response(self.engine.run_pipe(name, dict(request.query)))


@pytest.fixture
async def pipes_api(aiohttp_server: Any, engine: LocalEngine, traffic: list[dict[str, Any]]) -> tuple[PipesAPI, str]:
    engine.truncate()
    engine.insert_rows(traffic)
    api = PipesAPI(engine)
    app = web.Application()
    app.router.add_get("/v0/pipes/{name}.json", api.handle)
    server = await aiohttp_server(app)
    return api, str(server.make_url("")).rstrip("/")


def _cli(*args: str) -> tuple[int, str, str]:
    done = subprocess.run([sys.executable, "-m", "image_service", *args], capture_output=True, text=True, timeout=60)
    return done.returncode, done.stdout, done.stderr


def test_stats_prints_every_pipe_from_the_local_sink(
    events: Path, traffic: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--events names the file, whatever the environment's tracking.local_path says."""
    monkeypatch.setenv("IMAGE_SERVICE_TRACKING__LOCAL_PATH", str(events.with_name("elsewhere.ndjson")))
    code, out, err = _cli("stats", "--events", str(events), "--bucket", "day")
    assert code == 0, err
    for pipe in ("request_volume", "error_rates", "cache_hit_rate", "tier_distribution", "content_violations",
                 "latency_percentiles"):
        assert f"== {pipe} (local) ==" in out
    expected = reference.request_volume(traffic, {"bucket": "day"})
    volume = out.split("== request_volume (local) ==", 1)[1].split("\n== ", 1)[0].splitlines()
    for (_, service), figures in expected.items():
        lines = [line for line in volume if f" {service} " in f" {line} "]
        assert lines and str(figures["requests"]) in lines[0].split(), (expected, out)


def test_stats_refuses_a_malformed_time(events: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stats", "--events", str(events), "--start", "yesterday"]) == 2
    assert "start must be 'YYYY-MM-DD HH:MM:SS'" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["stats"], ["alerts", "check"]])
def test_a_missing_events_file_is_an_error_not_a_quiet_service(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    """A mistyped path read as "no anomalies" (exit 0): a cron alert job would stay silent for ever."""
    missing = tmp_path / "typo" / "events.ndjson"
    assert main([*command, "--events", str(missing), "--source", "local"]) == 2
    assert f"no events file at {missing}" in capsys.readouterr().err


def test_stats_just_after_a_rotation_reads_the_rotated_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Between a rotation and the next batch only `events.ndjson.1` exists: that is traffic, not a typo."""
    path = tmp_path / "events.ndjson"
    path.with_name("events.ndjson.1").write_bytes(_terminal_rows(7, "flux"))
    assert main(["stats", "--events", str(path), "--source", "local", "--bucket", "day", "--pipe", "request_volume"]) == 0
    volume = capsys.readouterr().out.split("== request_volume (local) ==", 1)[1]
    assert any("7" in line.split() for line in volume.splitlines())


def test_figures_are_printed_without_an_exponent() -> None:
    """A p95 of 19 s read "1.903e+04" in `stats` and in the alert's text."""
    from image_service.analytics.report import alert_payload, table

    row = {"t": "2026-01-01 00:00:00", "service_type": "image", "model": "flux", "p95_ms": 19030.4,
           "error_rate": 0.00001234, "requests": 12, "reasons": ["p95_above_threshold"]}
    printed = table({"data": [row]})
    assert "19030" in printed and "0.00001234" in printed and "e+" not in printed and "e-" not in printed
    assert "p95 19030 ms" in alert_payload([row], {}, "local")["text"]
    assert table({"data": [{"a": 1e-9, "b": -0.0, "c": 0.5}]}).splitlines()[-1].split() == ["0", "0", "0.5"]


async def test_stats_reads_the_deployed_pipes_with_the_read_token(
    pipes_api: tuple[PipesAPI, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    api, url = pipes_api
    monkeypatch.setenv("TINYBIRD_API_URL", url)
    monkeypatch.setenv("TINYBIRD_READ_TOKEN", "read-token")
    code = await asyncio.to_thread(main, ["stats", "--pipe", "cache_hit_rate", "--model", "sketch", "--bucket", "day"])
    out = capsys.readouterr().out
    assert code == 0
    assert api.calls == [("cache_hit_rate", {"model": "sketch", "bucket": "day"})]
    assert "== cache_hit_rate (tinybird) ==" in out and "sketch" in out and "procedural" not in out


async def test_stats_says_why_tinybird_refused(
    pipes_api: tuple[PipesAPI, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _, url = pipes_api
    monkeypatch.setenv("TINYBIRD_API_URL", url)
    monkeypatch.setenv("TINYBIRD_READ_TOKEN", "wrong")
    assert await asyncio.to_thread(main, ["stats", "--pipe", "request_volume"]) == 2
    assert "Tinybird answered 403: invalid authentication token" in capsys.readouterr().err


async def test_alerts_check_posts_what_fired_to_the_webhook_and_exits_1(
    events: Path, aiohttp_server: Any, traffic: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    received: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/hook", hook)
    server = await aiohttp_server(app)
    args = ["alerts", "check", "--events", str(events), "--min-requests", "1", "--max-error-rate", "0.1",
            "--since", EVER, "--webhook", str(server.make_url("/hook"))]
    assert await asyncio.to_thread(main, args) == 1
    expected = reference.anomalies(traffic, {"min_requests": "1", "max_error_rate": "0.1"})
    assert expected, "the traffic has error rates above 10%"
    (payload,) = received
    assert payload["fired"] == len(expected) and payload["source"] == "local"
    assert {(a["t"], a["service_type"], a["model"]) for a in payload["anomalies"]} == set(expected)
    assert "error_rate_above_threshold" in payload["text"]
    assert "fired" in capsys.readouterr().out


async def test_alerts_check_reports_an_anomaly_once_not_all_day(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Run from cron once a window, it reports the latest windows; an old bad minute stays in the
    past (`--since` asks for it)."""
    monkeypatch.delenv("TINYBIRD_READ_TOKEN", raising=False)
    start = (int(time.time()) // 60 - 30) * 60
    rows = [build_row({"event": "request.completed", "stage": "response", "status": 502, "_ts": start + i,
                       "request_start": start + i, "duration_ms": 10.0, "model": "flux"}) for i in range(20)]
    events = tmp_path / "events.ndjson"
    events.write_bytes(b"".join(orjson.dumps(row) + b"\n" for row in rows))
    assert await asyncio.to_thread(main, ["alerts", "check", "--events", str(events)]) == 0
    assert "no anomalies" in capsys.readouterr().out
    assert await asyncio.to_thread(main, ["alerts", "check", "--events", str(events), "--since", EVER]) == 1


def test_the_previous_window_is_where_a_check_starts_reporting() -> None:
    now = datetime(2026, 3, 1, 0, 0, 30, tzinfo=UTC)
    assert [previous_window(bucket, now) for bucket in ("minute", "hour", "day")] == [
        "2026-02-28 23:59:00", "2026-02-28 23:00:00", "2026-02-28 00:00:00"]


async def test_alerts_check_is_quiet_and_exits_0_below_thresholds(
    events: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["alerts", "check", "--events", str(events), "--max-error-rate", "1", "--max-p95-ms", "1000000000"]
    assert await asyncio.to_thread(main, args) == 0
    assert "no anomalies" in capsys.readouterr().out


async def test_alerts_check_fails_when_the_webhook_refuses(events: Path, aiohttp_server: Any) -> None:
    async def refuse(request: web.Request) -> web.Response:
        return web.json_response({}, status=500)

    app = web.Application()
    app.router.add_post("/hook", refuse)
    server = await aiohttp_server(app)
    args = ["alerts", "check", "--events", str(events), "--min-requests", "1", "--max-error-rate", "0",
            "--webhook", str(server.make_url("/hook"))]
    assert await asyncio.to_thread(main, args) == 2


async def test_concurrent_pipes_on_a_fresh_local_source_all_see_the_rows(events: Path) -> None:
    """The first queries of a local source race to build its engine and load the file; every one of
    them must answer from the loaded table."""
    from concurrent.futures import ThreadPoolExecutor

    from image_service.analytics.source import LocalSource, run_pipes

    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(3):
            source = LocalSource(events, executor=pool)
            try:
                pipes = ("request_volume", "error_rates", "tier_distribution", "latency_percentiles")
                answers = await run_pipes(source, pipes, {"bucket": "day"})
            finally:
                await source.close()
            assert [bool(answers[pipe]["data"]) for pipe in pipes] == [True] * len(pipes)


async def test_one_dashboard_answer_is_one_snapshot_of_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows land while the pipes run (a busy server); every pipe of one answer counts the same rows."""
    from image_service.analytics.engine import LocalEngine
    from image_service.analytics.source import LocalSource, run_pipes

    events = tmp_path / "events.ndjson"
    events.write_bytes(_terminal_rows(10, "flux"))
    run_pipe = LocalEngine.run_pipe

    def run_then_more_rows_land(self: LocalEngine, pipe: str, params: Any = None) -> Any:
        with events.open("ab") as handle:
            handle.write(_terminal_rows(5, "flux"))
        return run_pipe(self, pipe, params)

    monkeypatch.setattr(LocalEngine, "run_pipe", run_then_more_rows_land)
    source = LocalSource(events)
    try:
        answers = await run_pipes(source, ("request_volume", "error_rates", "tier_distribution"), {"bucket": "day"})
    finally:
        await source.close()
    totals = {pipe: sum(row["requests"] for row in answer["data"]) for pipe, answer in answers.items()}
    assert totals == {"request_volume": 10, "error_rates": 10, "tier_distribution": 10}


def _terminal_rows(count: int, model: str) -> bytes:
    start = time.time() - 120
    return b"".join(orjson.dumps(build_row({
        "event": "request.completed", "stage": "response", "status": 200, "_ts": start + i,
        "request_start": start + i, "duration_ms": 5.0, "model": model,
    })) + b"\n" for i in range(count))


def _requests_by_model(engine: LocalEngine, path: Path) -> dict[str, int]:
    engine.load_file(path)
    data = engine.run_pipe("request_volume", {"bucket": "day"})["data"]
    volume = sum(row["requests"] for row in data)
    models = engine.query(f"SELECT model, count() AS n FROM {engine.table} GROUP BY model")["data"]
    assert volume == sum(row["n"] for row in models)
    return {row["model"]: row["n"] for row in models}


def test_a_rotated_sink_file_keeps_its_rows_on_the_dashboard(engine: LocalEngine, tmp_path: Path) -> None:
    """The dashboard's source reads only what was appended. After a rotation (a new file in the
    same place, even a larger one) that would start mid-line or skip rows, and the rotated file's
    rows still count: the sink rotates by size, not by age."""
    engine.truncate()
    path = tmp_path / "events.ndjson"
    try:
        path.write_bytes(_terminal_rows(40, "old"))
        assert _requests_by_model(engine, path) == {"old": 40}
        path.rename(tmp_path / "events.ndjson.1")
        path.write_bytes(_terminal_rows(60, "new"))
        assert _requests_by_model(engine, path) == {"old": 40, "new": 60}
        path.write_bytes(_terminal_rows(70, "same-inode"))  # truncated and rewritten in place
        assert _requests_by_model(engine, path) == {"old": 40, "same-inode": 70}
        with path.open("ab") as handle:
            handle.write(_terminal_rows(5, "appended"))
        assert _requests_by_model(engine, path) == {"old": 40, "same-inode": 70, "appended": 5}
        (tmp_path / "events.ndjson.1").rename(tmp_path / "events.ndjson.2")
        path.rename(tmp_path / "events.ndjson.1")
        assert _requests_by_model(engine, path) == {"old": 40, "same-inode": 70, "appended": 5}
    finally:
        engine.truncate()


def test_unchanged_rotated_files_are_not_read_again(
    engine: LocalEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between a rotation and the next batch only the rotated files exist: every dashboard refresh
    read them all again (up to three times 256 MiB). Now only a change makes them read again."""
    engine.truncate()
    path = tmp_path / "events.ndjson"
    path.with_name("events.ndjson.1").write_bytes(_terminal_rows(4, "flux"))
    reads: list[str] = []
    read_lines = LocalEngine._read_lines

    def counted(self: LocalEngine, handle: Any, offset: int) -> int:
        reads.append(Path(handle.name).name)
        return read_lines(self, handle, offset)

    monkeypatch.setattr(LocalEngine, "_read_lines", counted)
    try:
        for _ in range(3):
            assert _requests_by_model(engine, path) == {"flux": 4}
        assert reads == ["events.ndjson.1"]
        path.write_bytes(_terminal_rows(2, "sketch"))
        assert _requests_by_model(engine, path) == {"flux": 4, "sketch": 2}
        assert _requests_by_model(engine, path) == {"flux": 4, "sketch": 2}
        assert reads == ["events.ndjson.1", "events.ndjson"]
    finally:
        engine.truncate()


def test_a_torn_line_costs_only_itself(engine: LocalEngine, tmp_path: Path) -> None:
    """A crash mid-write leaves half a line; the rows around it still count."""
    engine.truncate()
    lines = _terminal_rows(5, "flux").splitlines()
    path = tmp_path / "events.ndjson"
    path.write_bytes(b"\n".join([*lines[:2], lines[2][:40], *lines[3:]]) + b"\n")
    try:
        assert _requests_by_model(engine, path) == {"flux": 4}
    finally:
        engine.truncate()
