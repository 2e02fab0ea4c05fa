"""The forwarder against a local Events API that keeps Tinybird's contract, faults included."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from image_service.config import TrackingSettings
from image_service.priority import WORKER_NICE
from image_service.tracking import TELEMETRY, Forwarder, Spool, TinybirdSink
from image_service.tracking.batch import Rows
from image_service.tracking.context import clear as clear_request
from image_service.tracking.context import new_request
from image_service.tracking.sinks import FileSink

from .conftest import disk_full_at
from .events_api import EventsAPI, Fault

Make = Callable[..., Forwarder]


def event(n: int) -> dict[str, Any]:
    now = time.time()
    return {"event": "request.completed", "stage": "response", "request_id": f"req-{n}", "status": 200,
            "duration_ms": 1.0, "_ts": now, "request_start": now, "event_id": f"ev-{n:06d}"}


@pytest.fixture
async def make_forwarder(events_api: tuple[EventsAPI, str], tmp_path: Path) -> AsyncIterator[Make]:
    api, url = events_api
    made: list[Forwarder] = []

    def make(token: str = "test-token", timeout: float = 0.5, spool_dir: Path | None = None, **options: Any) -> Forwarder:
        settings = TrackingSettings(**{"max_wait": 0.02, "backoff_base": 0.01, "backoff_cap": 0.05,
                                        "breaker_cooldown": 0.2, "batch_rows": 100, **options})
        forwarder = Forwarder(
            settings, TinybirdSink(url, token, "pollinations_events", timeout, executor=None),
            Spool(spool_dir or tmp_path / "spool", max_bytes=50_000_000),
        )
        made.append(forwarder)
        return forwarder

    yield make
    for forwarder in made:
        await forwarder.close(timeout=2)


async def until(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def received(api: EventsAPI) -> set[str]:
    return {row["event_id"] for row in api.rows}


async def stream(forwarder: Forwarder, count: int, burst: int, pause: float) -> None:
    """Queue events 0..count-1 in bursts with pauses between them, as a busy server would."""
    for n in range(count):
        forwarder.queue.put(event(n))
        if n % burst == burst - 1:
            await asyncio.sleep(pause)


async def test_rows_arrive_in_batches_with_bearer_token_and_gzip(make_forwarder: Make, events_api: tuple[EventsAPI, str]) -> None:
    api, _ = events_api
    forwarder = make_forwarder()
    await forwarder.start()
    for n in range(250):
        forwarder.queue.put(event(n))
    await until(lambda: len(api.rows) == 250)
    assert received(api) == {f"ev-{n:06d}" for n in range(250)}
    assert api.requests <= 5 and api.datasources == {"pollinations_events"} and api.encodings == {"gzip"}
    assert forwarder.stats.sent == 250


async def test_an_idle_forwarder_rests_and_its_queues_first_event_wakes_it(
    make_forwarder: Make, events_api: tuple[EventsAPI, str]
) -> None:
    """Idle, the forwarder polls every max_wait / 2 instead of twenty times a second; a burst of
    events after a quiet spell still leaves at once, not when the nap ends."""
    api, _ = events_api
    forwarder = make_forwarder(max_wait=4.0, encoder_process=False)
    rounds = 0
    real_round = forwarder._round

    async def counted() -> bool:
        nonlocal rounds
        rounds += 1
        return await real_round()

    forwarder._round = counted  # type: ignore[method-assign]
    await forwarder.start()
    await asyncio.sleep(1.0)
    assert rounds <= 2
    for n in range(100):
        forwarder.queue.put(event(n))
    await until(lambda: len(api.rows) == 100, seconds=1.5)


async def test_an_event_that_cannot_be_serialised_is_counted_and_the_rest_still_arrive(
    make_forwarder: Make, events_api: tuple[EventsAPI, str]
) -> None:
    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no text either")

    api, _ = events_api
    forwarder = make_forwarder()
    await forwarder.start()
    with capture_logs() as logs:
        forwarder.queue.put({**event(0), "width": Unprintable()})
        await until(lambda: forwarder.queue.unserialisable == 1)
        forwarder.queue.put(event(1))
        await until(lambda: len(api.rows) == 1)
    assert received(api) == {"ev-000001"}
    assert not [entry for entry in logs if entry["event"] == "telemetry.worker_error"]


async def test_thirty_percent_injected_failures_lose_nothing(make_forwarder: Make, events_api: tuple[EventsAPI, str]) -> None:
    """429s, 5xx, resets and timeouts are retried until every row is in."""
    api, _ = events_api
    api.failure_rate = 0.3
    forwarder = make_forwarder(timeout=0.3, batch_rows=20, breaker_failures=50, max_retries=50)
    await forwarder.start()
    for n in range(400):
        forwarder.queue.put(event(n))
        if n % 50 == 0:
            await asyncio.sleep(0.01)
    await until(lambda: received(api) >= {f"ev-{n:06d}" for n in range(400)}, seconds=30)
    assert forwarder.stats.retried > 0 and sum(forwarder.stats.dropped.values()) == 0
    assert {0, 429, 500, 503} & set(api.statuses)


async def test_an_answer_trickled_past_the_timeout_is_retried_as_a_timeout(
    make_forwarder: Make, events_api: tuple[EventsAPI, str]
) -> None:
    """The timeout bounds the whole call, not each read: a sink answering a byte at a time cannot
    hold a batch, and the rows arrive on the next attempt."""
    api, _ = events_api
    api.script.append(Fault(trickle=0.05))
    forwarder = make_forwarder(timeout=0.5)
    await forwarder.start()
    forwarder.queue.put(event(1))
    await until(lambda: received(api) == {"ev-000001"}, seconds=10)
    assert forwarder.stats.retried == 1 and api.statuses == [200, 200]


async def test_retry_after_is_honoured(make_forwarder: Make, events_api: tuple[EventsAPI, str]) -> None:
    api, _ = events_api
    api.script.extend([Fault(429, retry_after="0.4")])
    forwarder = make_forwarder()
    await forwarder.start()
    started = time.monotonic()
    forwarder.queue.put(event(1))
    await until(lambda: len(api.rows) == 1)
    assert time.monotonic() - started >= 0.4


async def test_sink_down_then_up_delivers_everything_from_the_spool(
    make_forwarder: Make, events_api: tuple[EventsAPI, str], tmp_path: Path
) -> None:
    """The breaker opens, rows wait on disk, the half-open probe succeeds and the spool drains."""
    api, _ = events_api
    api.down = True
    forwarder = make_forwarder(breaker_failures=2, max_retries=1)
    await forwarder.start()
    for n in range(300):
        forwarder.queue.put(event(n))
    await until(lambda: forwarder.stats.spooled >= 300)
    assert forwarder.breaker.state.name in {"OPEN", "HALF_OPEN"} and not api.rows
    api.down = False
    await until(lambda: received(api) == {f"ev-{n:06d}" for n in range(300)})
    await until(lambda: not forwarder.spool.has_data())
    assert forwarder.stats.replayed == 300


async def test_spooled_rows_are_sent_by_the_next_process(make_forwarder: Make, events_api: tuple[EventsAPI, str], tmp_path: Path) -> None:
    """Rows spooled while the sink was down survive a restart and go out on the next start."""
    api, _ = events_api
    api.down = True
    first = make_forwarder(breaker_failures=1, max_retries=0)
    await first.start()
    for n in range(50):
        first.queue.put(event(n))
    await until(lambda: first.stats.spooled >= 50)
    await first.close(timeout=1)
    api.down = False
    second = make_forwarder()
    await second.start()
    await until(lambda: received(api) == {f"ev-{n:06d}" for n in range(50)})


async def test_forbidden_is_not_retried_and_rows_are_kept(make_forwarder: Make, events_api: tuple[EventsAPI, str]) -> None:
    """A wrong token is a configuration error: one call, one loud log line, rows spooled for replay."""
    api, _ = events_api
    with capture_logs() as logs:
        forwarder = make_forwarder(token="wrong")
        await forwarder.start()
        for n in range(10):
            forwarder.queue.put(event(n))
        await until(lambda: forwarder.stats.spooled == 10)
        for n in range(10, 20):
            forwarder.queue.put(event(n))
        await until(lambda: forwarder.stats.spooled == 20)
    assert api.statuses == [403]
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["telemetry.sink_misconfigured"]


async def test_a_call_the_http_client_refuses_to_make_keeps_the_rows(
    events_api: tuple[EventsAPI, str], tmp_path: Path
) -> None:
    """aiohttp will not send credentials in the URL beside our Authorization header: the batch
    used to vanish with the exception, neither sent, spooled nor counted."""
    api, url = events_api
    sink = TinybirdSink(url.replace("http://", "http://user:pw@"), "test-token", "pollinations_events", 0.5, executor=None)
    forwarder = Forwarder(TrackingSettings(max_wait=0.02, batch_rows=100), sink, Spool(tmp_path / "spool", 50_000_000))
    with capture_logs() as logs:
        await forwarder.start()
        try:
            for n in range(10):
                forwarder.queue.put(event(n))
            await until(lambda: forwarder.stats.spooled == 10)
        finally:
            await forwarder.close(timeout=2)
    assert api.rows == [] and forwarder.stats.spooled == 10
    assert "telemetry.sink_misconfigured" in [e["event"] for e in logs]


async def test_rows_a_full_disk_cannot_spool_are_counted_not_silently_lost(
    make_forwarder: Make, events_api: tuple[EventsAPI, str]
) -> None:
    """With the sink down and no room on disk the rows have nowhere to wait: they used to vanish
    with an OSError in the log and every drop counter at 0. The file size limit stands in for a
    full disk (root ignores permissions)."""
    api, _ = events_api
    api.down = True
    forwarder = make_forwarder(encoder_process=False)
    await forwarder.start()
    with disk_full_at(0), capture_logs() as logs:
        for n in range(10):
            forwarder.queue.put(event(n))
        await until(lambda: forwarder.stats.dropped["spool_unwritable"] == 10)
    assert forwarder.health()["rowsDropped"] == 10 and forwarder.stats.spooled == 0
    assert "telemetry.spool_unwritable" in [e["event"] for e in logs]


async def test_rows_a_smaller_spool_cannot_keep_at_start_are_counted(
    make_forwarder: Make, events_api: tuple[EventsAPI, str], tmp_path: Path
) -> None:
    """A spool left by a run with a larger bound (or by several workers) is cut to this one's."""
    earlier = Spool(tmp_path / "spool", 10**6, segment_bytes=10**6)
    earlier.open()
    earlier.append(Rows.of_lines([b'{"event_id":"%d"}\n' % n for n in range(1000)]))
    earlier.close()
    forwarder = make_forwarder(spool_max_bytes=2_000, encoder_process=False)
    forwarder.spool = Spool(tmp_path / "spool", 2_000)
    await forwarder.start()
    kept = sum(path.read_bytes().count(b"\n") for path in (tmp_path / "spool").glob("segment-*"))
    assert 0 < forwarder.spool.total_bytes <= 2_000 and forwarder.stats.dropped["spool_full"] + kept == 1000


async def test_bad_request_is_dropped_counted_and_not_retried(make_forwarder: Make, events_api: tuple[EventsAPI, str]) -> None:
    api, _ = events_api
    api.script.append(Fault(400))
    forwarder = make_forwarder()
    await forwarder.start()
    for n in range(5):
        forwarder.queue.put(event(n))
    await until(lambda: forwarder.stats.dropped["http_400"] == 5)
    forwarder.queue.put(event(99))
    await until(lambda: received(api) == {"ev-000099"})
    assert api.statuses == [400, 200]


async def test_too_large_batches_are_split(make_forwarder: Make, events_api: tuple[EventsAPI, str]) -> None:
    """413 halves the batch until the pieces fit; every row arrives once."""
    api, _ = events_api
    api.max_body = 20_000
    forwarder = make_forwarder(batch_rows=200)
    await forwarder.start()
    for n in range(200):
        forwarder.queue.put(event(n))
    await until(lambda: len(api.rows) == 200)
    assert 413 in api.statuses and len(received(api)) == 200


async def test_quarantined_rows_are_counted(make_forwarder: Make, events_api: tuple[EventsAPI, str]) -> None:
    api, _ = events_api
    api.columns = {"a_column_rows_never_have": "String"}
    forwarder = make_forwarder()
    await forwarder.start()
    forwarder.queue.put(event(1))
    await until(lambda: forwarder.stats.quarantined == 1)


async def test_queue_overflow_goes_to_the_spool_not_lost(make_forwarder: Make, events_api: tuple[EventsAPI, str]) -> None:
    """A slow sink lets the queue fill; the excess spills to disk and is delivered later."""
    api, _ = events_api
    api.script.extend([Fault(delay=0.8)] * 2)
    forwarder = make_forwarder(queue_size=200, batch_rows=50, timeout=2.0)
    await forwarder.start()
    await stream(forwarder, 1000, burst=40, pause=0.025)
    await until(lambda: received(api) == {f"ev-{n:06d}" for n in range(1000)}, seconds=30)
    assert forwarder.stats.spooled > 0 and forwarder.queue.dropped_full == 0


async def test_close_flushes_what_is_queued(make_forwarder: Make, events_api: tuple[EventsAPI, str]) -> None:
    api, _ = events_api
    forwarder = make_forwarder(max_wait=30)
    await forwarder.start()
    for n in range(30):
        forwarder.queue.put(event(n))
    await forwarder.close(timeout=5)
    assert len(api.rows) == 30


async def test_close_with_the_sink_down_spools_the_rest(make_forwarder: Make, events_api: tuple[EventsAPI, str], tmp_path: Path) -> None:
    api, _ = events_api
    api.script.extend([Fault(delay=5)] * 3)
    forwarder = make_forwarder(max_wait=30, timeout=3)
    await forwarder.start()
    for n in range(30):
        forwarder.queue.put(event(n))
    await forwarder.close(timeout=0.5)
    spooled = b"".join(p.read_bytes() for p in (tmp_path / "spool").iterdir())
    assert spooled.count(b"\n") == 30
    forwarder.queue.put(event(31))
    assert forwarder.queue.dropped_closed == 1


async def test_file_sink_writes_ndjson_rows(tmp_path: Path) -> None:
    forwarder = Forwarder(TrackingSettings(max_wait=0.02), FileSink(tmp_path / "events.ndjson", None),
                          Spool(tmp_path / "spool", 1_000_000))
    await forwarder.start()
    for n in range(10):
        forwarder.queue.put(event(n))
    await forwarder.close()
    lines = (tmp_path / "events.ndjson").read_bytes().splitlines()
    assert len(lines) == 10 and b'"event_id":"ev-000000"' in lines[0]


async def test_flush_waits_for_events_still_being_serialised(make_forwarder: Make, events_api: tuple[EventsAPI, str]) -> None:
    """flush() returns only once a large backlog has actually reached the sink."""
    api, _ = events_api
    forwarder = make_forwarder(queue_size=20_000, batch_rows=5_000)
    await forwarder.start()
    for n in range(20_000):
        forwarder.queue.put(event(n))
    assert await forwarder.flush(timeout=30)
    assert len(api.rows) == 20_000


async def test_flush_reports_failure_when_rows_only_reached_the_spool(
    make_forwarder: Make, events_api: tuple[EventsAPI, str]
) -> None:
    """flush() is True only when the sink has the rows, not when they merely went to disk."""
    api, _ = events_api
    api.down = True
    forwarder = make_forwarder(breaker_failures=1, max_retries=0, max_wait=30)
    await forwarder.start()
    for n in range(10):
        forwarder.queue.put(event(n))
    assert not await forwarder.flush(timeout=2)
    assert forwarder.stats.spooled == 10
    api.down = False


async def test_flush_sends_at_once_instead_of_waiting_for_the_batch_age(
    make_forwarder: Make, events_api: tuple[EventsAPI, str]
) -> None:
    api, _ = events_api
    forwarder = make_forwarder(max_wait=60)
    await forwarder.start()
    forwarder.queue.put(event(1))
    assert await forwarder.flush(timeout=5) and len(api.rows) == 1


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice values are a Linux feature")
async def test_telemetry_threads_run_below_the_event_loop(make_forwarder: Make, events_api: tuple[EventsAPI, str]) -> None:
    """gzip and spool I/O yield the core to request handling when both want it."""
    api, _ = events_api
    forwarder = make_forwarder()
    await forwarder.start()
    await stream(forwarder, 300, burst=100, pause=0.01)
    await until(lambda: len(api.rows) == 300)
    threads = {thread.name.rsplit("_", 1)[0]: thread.native_id for thread in threading.enumerate()}
    assert {"telemetry-gzip", "telemetry-io"} <= threads.keys()
    loop_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    for name in ("telemetry-gzip", "telemetry-io"):
        assert os.getpriority(os.PRIO_PROCESS, threads[name]) == max(loop_nice, WORKER_NICE), name


async def test_events_of_a_request_still_running_reach_the_sink_within_max_wait(
    make_forwarder: Make, events_api: tuple[EventsAPI, str]
) -> None:
    """A slow generation's first events do not wait for its end: they leave after max_wait / 2."""
    api, _ = events_api
    forwarder = make_forwarder(max_wait=0.4)
    await forwarder.start()

    async def slow_request() -> None:
        TELEMETRY.route_current_context(forwarder.queue)
        new_request(request_id="slow-request")
        TELEMETRY(None, "info", {"event": "request.received", "stage": "request"})
        await asyncio.sleep(30)

    task = asyncio.create_task(slow_request())
    try:
        started = time.monotonic()
        await until(lambda: len(api.rows) == 1, seconds=5)
        assert time.monotonic() - started < 2.0
        assert api.rows[0]["event"] == "request.received" and api.rows[0]["id"] == "slow-request"
    finally:
        task.cancel()


async def test_close_delivers_the_waiting_events_of_unfinished_requests(
    make_forwarder: Make, events_api: tuple[EventsAPI, str]
) -> None:
    api, _ = events_api
    forwarder = make_forwarder(max_wait=30)
    await forwarder.start()
    TELEMETRY.route_current_context(forwarder.queue)
    try:
        new_request(request_id="unfinished")
        TELEMETRY(None, "info", {"event": "request.received", "stage": "request"})
    finally:
        TELEMETRY.route_current_context(None)
        clear_request()
    await forwarder.close(timeout=2)
    assert [row["id"] for row in api.rows] == ["unfinished"]
