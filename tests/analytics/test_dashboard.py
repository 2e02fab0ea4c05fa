"""/dashboard in headless Chromium: every chart draws the pipes' data; /dashboard/data answers them."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient
from playwright.async_api import async_playwright

from image_service.app import TRACKING
from image_service.tracking.rows import build_row

from ..conftest import ClientFactory, make_settings
from .conftest import ROOT

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
CHARTS = ("volume", "errors", "cache", "tiers", "violations", "latency")
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture
async def busy_client(make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch) -> TestClient[Any, Any]:
    """The real service with some traffic of its own in its local sink."""
    monkeypatch.delenv("TINYBIRD_READ_TOKEN", raising=False)
    client = await make_client(make_settings(tracking={"max_wait": 0.02}, models={
        "sketch": {"backend": "embedded", "max_side": 512, "default_side": 64}}))
    for url in ("/prompt/fox?width=32&height=32", "/prompt/fox?width=32&height=32", "/prompt/owl?model=sketch",
                "/prompt/x?model=nope", "/missing"):
        await client.get(url)
    assert await client.app[TRACKING].forwarder.flush(timeout=10)
    return client


async def test_dashboard_data_answers_every_pipe_from_the_local_sink(busy_client: TestClient[Any, Any]) -> None:
    reply = await busy_client.get("/dashboard/data?bucket=minute")
    assert reply.status == 200
    body = await reply.json()
    assert body["source"] == "local"
    volume = body["pipes"]["request_volume"]["data"]
    assert sum(row["requests"] for row in volume) == 5
    cache = body["pipes"]["cache_hit_rate"]["data"]
    assert sum(row["hits"] for row in cache) == 1 and sum(row["lookups"] for row in cache) == 3
    assert {column["name"] for column in body["pipes"]["latency_percentiles"]["meta"]} >= {"p50_ms", "p95_ms", "p99_ms"}


async def test_the_dashboard_shows_the_anomalies_alerts_check_fires_on(
    make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Twenty failures in the last minute of an hour of 400 good requests: 4.8 % over the hour
    (charted by the hour) but every request of that minute, which is what `alerts check` fires on."""
    monkeypatch.delenv("TINYBIRD_READ_TOKEN", raising=False)
    hour = (int(time.time()) // 3600 - 1) * 3600
    rows = [{"status": 200, "request_start": hour + i * 8.7} for i in range(400)]
    rows += [{"status": 504, "request_start": hour + 3540 + i} for i in range(20)]
    events = tmp_path / "events.ndjson"
    events.write_bytes(b"".join(orjson.dumps(build_row({
        "event": "request.completed", "stage": "response", "_ts": row["request_start"] + 0.1, "duration_ms": 100.0,
        "model": "flux", **row,
    })) + b"\n" for row in rows))
    client = await make_client(make_settings(tracking={"local_path": str(events)}))
    body = await (await client.get("/dashboard/data?bucket=hour")).json()
    (fired,) = body["pipes"]["anomalies"]["data"]
    assert fired["t"] == datetime.fromtimestamp(hour + 3540, UTC).strftime("%Y-%m-%d %H:%M:%S") and fired["errors"] == 20
    assert [row["error_rate"] for row in body["pipes"]["error_rates"]["data"]] == [20 / 420]


@pytest.mark.parametrize(("query", "named"), [
    ("bucket=fortnight", "bucket"),
    ("start=2025-13-45%2099:99:99", "start"),  # the right shape, no such moment
    ("end=0000-00-00%2000:00:00", "end"),
    ("start=2025-01-01%2000:00:00%0A", "start"),
    ("min_requests=999999999999999999999999999999", "min_requests"),
    ("start=2025-06-02%2000:00:00&end=2025-06-01%2000:00:00", "start must be before end"),
])
async def test_dashboard_data_refuses_bad_parameters_with_a_json_error(
    busy_client: TestClient[Any, Any], query: str, named: str
) -> None:
    """The client's mistake is a 400 naming the parameter, not the source's 502."""
    reply = await busy_client.get(f"/dashboard/data?{query}")
    body = await reply.json()
    assert reply.status == 400 and body["error"] == "bad_request" and named in body["message"]


async def test_every_chart_renders_with_data_in_chromium(busy_client: TestClient[Any, Any]) -> None:
    url = str(busy_client.make_url("/dashboard"))
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 1100})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(url + "?")
            await page.wait_for_function("document.body.dataset.loaded === 'true'", timeout=20000)
            # A new load, after the first one finished: the minute buckets are what gets checked.
            await page.evaluate("document.body.dataset.loaded = ''")
            await page.select_option("#bucket", "minute")
            await page.wait_for_function("document.body.dataset.loaded === 'true'", timeout=20000)
            for chart in CHARTS:
                svg = page.locator(f"svg#{chart}")
                assert await svg.get_attribute("data-rendered") == "true", chart
                assert int(await svg.get_attribute("data-series") or 0) >= 1, chart
                drawn = await page.locator(f"svg#{chart} .series, svg#{chart} .bar").count()
                assert drawn >= 1, chart
            assert "source: local" in (await page.locator("#status").inner_text())
            ARTIFACTS.mkdir(exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
            assert not errors
        finally:
            await browser.close()
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000


def test_starting_the_service_and_serving_a_hit_never_imports_chdb(tmp_path: Path) -> None:
    """chdb (and pandas) load on the first local analytics query, not at start-up or on the image path."""
    script = """
import asyncio, sys
from aiohttp.test_utils import TestClient, TestServer
from image_service.app import create_app
from image_service.config import load_settings

async def main():
    client = TestClient(TestServer(create_app(load_settings())))
    await client.start_server()
    for _ in range(2):
        assert (await client.get('/prompt/fox?width=32&height=32')).status == 200
    await client.close()

asyncio.run(main())
print(sorted(name for name in sys.modules if name.split('.')[0] in ('chdb', 'pandas', 'pyarrow')))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


async def test_a_quiet_stretch_shows_as_a_gap_on_a_time_axis(
    make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Traffic 10, 5 and 4 minutes ago: the line breaks over the quiet minutes (pipes give no row
    for them), and points sit where their minutes are, not evenly spaced by index."""
    monkeypatch.delenv("TINYBIRD_READ_TOKEN", raising=False)
    minute = (int(time.time()) // 60) * 60
    events = tmp_path / "events.ndjson"
    events.write_bytes(b"".join(orjson.dumps(build_row({
        "event": "request.completed", "stage": "response", "status": 200, "request_start": minute - ago * 60 + 1,
        "_ts": minute - ago * 60 + 1.1, "duration_ms": 100.0, "model": "flux",
    })) + b"\n" for ago in (10, 5, 4)))
    client = await make_client(make_settings(tracking={"local_path": str(events)}))
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            await page.goto(str(client.make_url("/dashboard")))
            await page.wait_for_function("document.body.dataset.loaded === 'true'", timeout=20000)
            await page.evaluate("document.body.dataset.loaded = ''")
            await page.select_option("#bucket", "minute")
            await page.wait_for_function("document.body.dataset.loaded === 'true'", timeout=20000)
            assert await page.locator("svg#volume").get_attribute("data-segments") == "2"
            xs = sorted([float(x) for x in await page.locator("svg#volume circle").evaluate_all("cs => cs.map(c => c.getAttribute('cx'))")])
        finally:
            await browser.close()
    assert (xs[1] - xs[0]) / (xs[2] - xs[1]) == pytest.approx(5)
