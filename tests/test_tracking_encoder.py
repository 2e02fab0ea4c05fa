"""The encoder process: rows built there equal rows built in-process, and no failure of it loses a row."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from structlog.testing import capture_logs

from image_service.tracking import EventQueue, Forwarder
from image_service.tracking.contract import Endpoint
from image_service.tracking.courier import Courier, CourierSettings, Parcel
from image_service.tracking.encoder import EncoderProcess, EncoderUnavailable
from image_service.tracking.forwarder import KEPT_FRAME_EVENTS
from image_service.tracking.processor import unpack
from image_service.tracking.rows import RowEncoder

from .events_api import EventsAPI, Fault
from .test_tracking_forwarder import Make, event, make_forwarder, received, stream, until

__all__ = ["make_forwarder"]


def request_events(n: int, **context: Any) -> list[dict[str, Any]]:
    """The events of one request, each holding the request's context, as the processor queues them."""
    now = time.time()
    ctx = {"request_id": f"req-{n:04d}", "request_start": now - 0.01, "model": "procedural", "prompt": f"fox {n}",
           "width": 64, "height": 64, "seed": n, "user": "u1", "tier": "seed", "route": "/prompt/{prompt}", **context}
    return [
        {"event": "request.received", "stage": "request", "duration_ms": 0.02, "_ts": now, "_ctx": ctx},
        {"event": "cache.lookup", "stage": "cache", "cache_status": "hit", "_ts": now, "_ctx": ctx},
        {"event": "request.completed", "stage": "response", "status": 200, "duration_ms": 4.5, "_ts": now,
         "_ctx": ctx, "exception": "GET https://user:hunter2@origin.example/x failed token=sk-abcdef1234567890"},
    ]


def framed(events: list[dict[str, Any]]) -> list[bytes]:
    """Events as the forwarder frames them for the helper."""
    queue = EventQueue(len(events))
    for item in events:
        queue.put(item)
    return queue.take(len(events)).chunks


async def test_rows_built_by_the_encoder_process_equal_rows_built_in_process() -> None:
    """Privacy rules, context columns, metadata and event ids come out the same on either path."""
    events = [e for n in range(60) for e in request_events(n, private=n % 2 == 0, referrer="https://a.example/?token=x")]
    frames = [*framed(events[:50]), *framed(events[50:])]
    helper = EncoderProcess("test")
    try:
        reply = await helper.encode(frames, len(events))
    finally:
        await helper.close()
    lines = reply.rows.splitlines(keepends=True)
    encoder = RowEncoder("test")
    expected = [encoder.encode(e) for e in unpack(frames)]
    assert reply.failed == 0 and reply.count == len(lines) and lines == expected
    rows = [orjson.loads(line) for line in lines]
    assert len({row["event_id"] for row in rows}) == len(rows)
    prompts = {row["prompt"] for row in rows}
    assert "[PRIVATE]" in prompts and "fox 0" not in prompts and "fox 1" in prompts
    assert not any("hunter2" in line.decode() or "sk-abcdef" in line.decode() for line in lines)


async def test_an_event_the_helper_cannot_encode_is_counted_and_the_rest_arrive() -> None:
    helper = EncoderProcess("test")
    try:
        reply = await helper.encode(
            framed(request_events(1) + [{"event": "x", "stage": "x", "_ts": "not a time"}] + request_events(2)), 7
        )
    finally:
        await helper.close()
    assert (len(reply.rows.splitlines()), reply.count, reply.failed, reply.first_error) == (6, 6, 1, "ValueError")


async def test_a_reply_out_of_step_with_the_request_stops_the_helper() -> None:
    """Rows are never matched to the wrong events: a reply that does not account for exactly the
    events sent is refused, and that helper is not talked to again."""
    helper = EncoderProcess("test")
    try:
        with pytest.raises(EncoderUnavailable, match="out of step"):
            await helper.encode(framed(request_events(1)), 4)
        assert not helper.running and not helper.available
    finally:
        await helper.close()


async def test_large_batches_go_to_the_encoder_process(make_forwarder: Make, events_api: tuple[EventsAPI, str]) -> None:
    api, _ = events_api
    forwarder = make_forwarder(encoder_process_min_events=10, batch_rows=300)
    await started_with_helper(forwarder)
    for n in range(300):
        forwarder.queue.put(event(n))
    await until(lambda: len(api.rows) == 300 and forwarder.stats.sent == 300)
    assert received(api) == {f"ev-{n:06d}" for n in range(300)}
    assert forwarder.stats.encoded_elsewhere == 300


async def test_a_steady_stream_is_encoded_by_the_helper_not_the_event_loop(
    make_forwarder: Make, events_api: tuple[EventsAPI, str]
) -> None:
    """Events arriving between sends wait for a batch the helper takes, instead of being encoded on
    the event loop a few at a time; only a last, small remainder may be encoded in-process."""
    api, _ = events_api
    forwarder = make_forwarder(encoder_process_min_events=64, batch_rows=200, max_wait=1.0)
    await started_with_helper(forwarder)
    await stream(forwarder, 2000, burst=20, pause=0.002)
    # The helper may post rows before the forwarder has read its reply: wait for the forwarder too.
    await until(lambda: len(api.rows) == 2000 and forwarder.stats.sent == 2000)
    assert received(api) == {f"ev-{n:06d}" for n in range(2000)}
    assert forwarder.stats.encoded_elsewhere >= 2000 - 63


async def test_a_queue_smaller_than_a_helper_frame_never_waits_for_one(
    make_forwarder: Make, events_api: tuple[EventsAPI, str]
) -> None:
    """Events wait for a helper-sized batch only while the queue can hold one: otherwise the
    processor would drop what the full queue cannot take."""
    api, _ = events_api
    forwarder = make_forwarder(queue_size=50, batch_rows=50, encoder_process_min_events=128, max_wait=5.0)
    await forwarder.start()
    await stream(forwarder, 400, burst=50, pause=0.3)
    await until(lambda: len(api.rows) == 400)
    assert forwarder.queue.dropped_full == 0


async def helper_at_work(make_forwarder: Make, api: EventsAPI) -> tuple[Forwarder, EncoderProcess, int]:
    """A started forwarder whose encoder process has delivered one row itself: (forwarder, helper, its pid)."""
    forwarder = make_forwarder(encoder_process_min_events=1)
    helper = forwarder.encoder_process
    assert helper is not None
    await forwarder.start()
    forwarder.queue.put(event(0))
    # Delivered by the helper, and the forwarder has heard so: nothing of it is outstanding.
    await until(lambda: len(api.rows) == 1 and forwarder.stats.sent == 1)
    assert helper.pid is not None and helper.running and forwarder.stats.delivered_elsewhere == 1
    return forwarder, helper, helper.pid


async def started_with_helper(forwarder: Forwarder) -> None:
    """Start the forwarder and its encoder process ahead of traffic, as the service does: a helper
    still starting (a second or more on a cold machine) lags, and the forwarder rightly encodes
    and sends in-process meanwhile."""
    helper = forwarder.encoder_process
    assert helper is not None
    await forwarder.start()
    forwarder.start_helper()
    await until(lambda: helper.running and not helper.busy, seconds=8)


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """The process is stopped (SIGSTOP) inside the block, and continued afterwards if it still exists."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


async def test_a_killed_encoder_process_loses_no_row(make_forwarder: Make, events_api: tuple[EventsAPI, str]) -> None:
    """Rows it was given are encoded in-process instead; a later batch starts a fresh helper."""
    api, _ = events_api
    forwarder, _, pid = await helper_at_work(make_forwarder, api)
    os.kill(pid, signal.SIGKILL)
    for n in range(1, 200):
        forwarder.queue.put(event(n))
    await until(lambda: received(api) == {f"ev-{n:06d}" for n in range(200)})
    assert sum(forwarder.stats.dropped.values()) == 0


async def test_a_stalled_encoder_process_does_not_hold_rows_back(make_forwarder: Make, events_api: tuple[EventsAPI, str]) -> None:
    """While the helper does not answer, new events are encoded in-process; nothing waits for it."""
    api, _ = events_api
    forwarder, _, pid = await helper_at_work(make_forwarder, api)
    with stopped(pid):
        for n in range(1, 100):
            forwarder.queue.put(event(n))
        await until(lambda: received(api) == {f"ev-{n:06d}" for n in range(100)}, seconds=8)


async def test_an_event_orjson_cannot_serialise_still_arrives(
    make_forwarder: Make, events_api: tuple[EventsAPI, str]
) -> None:
    api, _ = events_api
    forwarder = make_forwarder(encoder_process_min_events=1)
    await forwarder.start()
    forwarder.queue.put({**event(1), "width": 2**70})
    await until(lambda: len(api.rows) == 1)
    assert api.rows[0]["width"] is None and sum(forwarder.stats.dropped.values()) == 0


async def test_the_encoder_process_ends_with_the_forwarder(make_forwarder: Make, events_api: tuple[EventsAPI, str]) -> None:
    api, _ = events_api
    forwarder, helper, pid = await helper_at_work(make_forwarder, api)
    await forwarder.close(timeout=2)
    assert not helper.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_shutdown_while_the_encoder_process_stalls_keeps_every_row(
    make_forwarder: Make, events_api: tuple[EventsAPI, str]
) -> None:
    """Events the worker was waiting on the helper for go back to the queue, and close() spools them."""
    api, _ = events_api
    forwarder, helper, pid = await helper_at_work(make_forwarder, api)
    with stopped(pid):
        for n in range(1, 100):
            forwarder.queue.put(event(n))
        await until(lambda: helper.busy)
        await forwarder.close(timeout=0.2)
    assert len(api.rows) + forwarder.stats.spooled == 100
    assert forwarder.spool.stats.rows_written == forwarder.stats.spooled > 0


async def test_a_healthy_sinks_rows_are_delivered_by_the_encoder_process(
    make_forwarder: Make, events_api: tuple[EventsAPI, str]
) -> None:
    """The rows never come back to the server: only how their delivery went."""
    api, _ = events_api
    forwarder = make_forwarder(encoder_process_min_events=10, batch_rows=300)
    await started_with_helper(forwarder)
    await stream(forwarder, 600, burst=100, pause=0.01)
    await until(lambda: forwarder.stats.sent == 600)
    assert sorted(row["event_id"] for row in api.rows) == [f"ev-{n:06d}" for n in range(600)]
    assert forwarder.stats.delivered_elsewhere == 600 and api.encodings == {"gzip"}
    assert api.datasources == {"pollinations_events"}


async def test_the_encoder_process_can_be_kept_from_delivering(
    make_forwarder: Make, events_api: tuple[EventsAPI, str]
) -> None:
    api, _ = events_api
    forwarder = make_forwarder(encoder_process_min_events=10, batch_rows=300, encoder_process_delivers=False)
    await started_with_helper(forwarder)
    await stream(forwarder, 300, burst=100, pause=0.01)
    await until(lambda: forwarder.stats.sent == 300)
    assert forwarder.stats.encoded_elsewhere == 300 and forwarder.stats.delivered_elsewhere == 0


async def test_rows_the_helper_could_not_deliver_wait_in_the_spool_and_the_forwarder_takes_over(
    make_forwarder: Make, events_api: tuple[EventsAPI, str]
) -> None:
    """After a failed delivery the helper writes the rows into the spool, and the forwarder sends
    (and retries) them from there until the sink answers again; then the helper delivers again."""
    api, _ = events_api
    api.script.extend([Fault(503), Fault(503)])
    forwarder = make_forwarder(encoder_process_min_events=10, batch_rows=300, breaker_failures=10)
    await started_with_helper(forwarder)
    await stream(forwarder, 100, burst=100, pause=0)
    await until(lambda: forwarder.stats.sent == 100)
    assert forwarder.stats.delivered_elsewhere == 0 and forwarder.stats.retried == 100
    assert forwarder.stats.spooled_elsewhere == forwarder.stats.spooled == forwarder.stats.replayed == 100
    await stream(forwarder, 100, burst=100, pause=0)
    await until(lambda: forwarder.stats.delivered_elsewhere == 100)
    assert sorted(row["event_id"] for row in api.rows) == sorted(f"ev-{n:06d}" for n in [*range(100), *range(100)])
    assert api.statuses == [503, 503, 200, 200]


async def test_after_a_failed_delivery_new_rows_wait_in_the_spool_until_the_sink_takes_rows_again(
    make_forwarder: Make, events_api: tuple[EventsAPI, str]
) -> None:
    """With the breaker still closed, a sink that failed the helper's last call is not trusted with
    new rows: the helper writes them into the spool (none come back through the event loop), and
    once a call of the forwarder's succeeds, the helper delivers again."""
    api, _ = events_api
    api.down = True
    forwarder = make_forwarder(encoder_process_min_events=10, breaker_failures=1000, max_retries=0)
    await started_with_helper(forwarder)
    await stream(forwarder, 100, burst=100, pause=0)
    await until(lambda: forwarder.stats.spooled_elsewhere == 100)
    await stream(forwarder, 100, burst=100, pause=0)
    await until(lambda: forwarder.stats.spooled_elsewhere == 200)
    assert forwarder.stats.spooled == 200 and forwarder.breaker.state.name == "CLOSED" and not api.rows
    api.down = False
    await until(lambda: len(api.rows) == 200)
    await stream(forwarder, 100, burst=100, pause=0)
    await until(lambda: forwarder.stats.delivered_elsewhere == 100)
    assert forwarder.stats.replayed == 200 and forwarder.stats.spooled == 200


async def test_frames_a_courier_too_far_behind_cannot_take_go_to_the_spool_through_the_helper(
    make_forwarder: Make, events_api: tuple[EventsAPI, str]
) -> None:
    """While a slow call holds the courier, frames beyond what may wait for it are written into the
    spool by the helper, not handed back to the server; they reach the sink from there."""
    api, _ = events_api
    api.script.append(Fault(delay=30))
    forwarder = make_forwarder(timeout=5.0, encoder_process_min_events=10, batch_rows=20, breaker_failures=1000)
    await started_with_helper(forwarder)
    await stream(forwarder, 200, burst=20, pause=0.05)
    await until(lambda: forwarder.stats.spooled_elsewhere > 0)
    api.released.set()
    await until(lambda: received(api) == {f"ev-{n:06d}" for n in range(200)})
    await until(lambda: forwarder.stats.delivered_elsewhere + forwarder.stats.replayed == 200)
    assert forwarder.stats.spooled == forwarder.stats.spooled_elsewhere > 0


async def test_a_wrong_token_met_by_the_helper_is_logged_once_and_the_rows_kept(
    make_forwarder: Make, events_api: tuple[EventsAPI, str]
) -> None:
    """The helper never retries: its 403 opens the breaker at once, is logged, and the helper
    writes the rows into the spool for replay."""
    api, _ = events_api
    with capture_logs() as logs:
        forwarder = make_forwarder(token="wrong", encoder_process_min_events=10)
        await started_with_helper(forwarder)
        await stream(forwarder, 50, burst=50, pause=0)
        await until(lambda: forwarder.stats.spooled == 50)
    assert api.statuses == [403] and forwarder.stats.sent == 0 and forwarder.stats.spooled_elsewhere == 50
    assert forwarder.breaker.state.name == "OPEN"
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["telemetry.sink_misconfigured"]


async def delivery_under_way(make_forwarder: Make, api: EventsAPI) -> tuple[Forwarder, EncoderProcess, int]:
    """`helper_at_work`, then events 0-49 in a delivery the sink holds (until `api.released`)."""
    forwarder, helper, pid = await helper_at_work(make_forwarder, api)
    api.script.append(Fault(delay=30))
    await stream(forwarder, 50, burst=50, pause=0)
    await until(lambda: api.requests == 2)
    return forwarder, helper, pid


async def test_a_helper_killed_while_delivering_loses_no_row(
    make_forwarder: Make, events_api: tuple[EventsAPI, str]
) -> None:
    """Its frames' events are encoded again (a row the sink took anyway may arrive twice)."""
    api, _ = events_api
    forwarder, _, pid = await delivery_under_way(make_forwarder, api)
    os.kill(pid, signal.SIGKILL)
    await until(lambda: received(api) >= {f"ev-{n:06d}" for n in range(50)})
    api.released.set()
    assert sum(forwarder.stats.dropped.values()) == 0


async def test_close_spools_what_the_helper_could_not_deliver_in_time(
    make_forwarder: Make, events_api: tuple[EventsAPI, str]
) -> None:
    """A delivery still waiting on the sink at the deadline comes back and goes to the spool."""
    api, _ = events_api
    forwarder, helper, _ = await delivery_under_way(make_forwarder, api)
    await forwarder.close(timeout=0.5)
    api.released.set()
    assert forwarder.stats.spooled == 50 and forwarder.spool.stats.rows_written == 50
    assert not helper.running


async def test_a_rejected_delivery_is_dropped_counted_and_never_sent_again(
    make_forwarder: Make, events_api: tuple[EventsAPI, str]
) -> None:
    """A 422 means partly written: the forwarder does not resend what the helper's call got it for."""
    api, _ = events_api
    api.script.append(Fault(422))
    with capture_logs() as logs:
        forwarder = make_forwarder(encoder_process_min_events=10)
        await started_with_helper(forwarder)
        await stream(forwarder, 50, burst=50, pause=0)
        await until(lambda: forwarder.stats.dropped["http_422"] == 50)
        await forwarder.flush(timeout=2)
    assert api.statuses == [422] and forwarder.stats.sent == 0 and forwarder.stats.spooled == 0
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["telemetry.batch_rejected"]


def courier_to(url: str, timeout: float, token: str = "test-token") -> Courier:
    """A courier of its own (no encoder process) posting to the Events API at `url`."""
    return Courier(CourierSettings(Endpoint(url, token, "pollinations_events", timeout), 50.0, 100, 10**6))


async def test_an_unexpected_courier_failure_gives_the_rows_back_and_keeps_it_working(
    events_api: tuple[EventsAPI, str]
) -> None:
    """A key http.client refuses (a stray newline) fails that call alone, and the error that
    comes back names its type, never the key."""
    api, url = events_api
    broken = courier_to(url, 2.0, token="test-token\n")
    broken.offer(Parcel(1, b'{"event_id":"a"}\n', 1))
    [failed] = await asyncio.to_thread(broken.collect, 5.0)
    assert (failed.status, failed.error, failed.rows) == (None, "ValueError", b'{"event_id":"a"}\n')
    assert "test-token" not in repr(failed) and "test-token" not in repr(broken._settings)
    broken.offer(Parcel(2, b'{"event_id":"b"}\n', 1))
    [again] = await asyncio.to_thread(broken.collect, 5.0)
    assert again.ticket == 2 and again.error == "ValueError" and api.rows == []


async def test_cancelling_a_batch_never_requeues_frames_the_helper_took(
    make_forwarder: Make, events_api: tuple[EventsAPI, str]
) -> None:
    """Shutdown may cancel the worker between frames of one batch: frames the helper took stay
    its own (delivered, or given back through it), whatever their delivery's outcome so far."""
    api, _ = events_api
    frame_events = KEPT_FRAME_EVENTS  # the helper delivers these frames itself
    total = 2 * frame_events + 904
    forwarder = make_forwarder(encoder_process_min_events=1, batch_rows=total, queue_size=total)
    helper = forwarder.encoder_process
    assert helper is not None
    frames = 0
    real_encode = helper.encode

    async def third_frame_stalls(slices: list[bytes], events: int, ticket: int | None = None, spool_to: Any = None) -> Any:
        nonlocal frames
        frames += 1
        if frames == 2:
            # The first frame's delivery has settled, so this reply reports it.
            await until(lambda: len(api.rows) == frame_events)
            await asyncio.sleep(0.2)
        if frames == 3:
            await asyncio.sleep(3600)
        return await real_encode(slices, events, ticket, spool_to)

    helper.encode = third_frame_stalls  # type: ignore[method-assign]
    for n in range(total):
        forwarder.queue.put(event(n))
    await forwarder.start()
    await until(lambda: frames == 3)
    worker = forwarder._task
    assert worker is not None
    worker.cancel()
    with pytest.raises(asyncio.CancelledError):
        await worker
    assert len(forwarder.queue) == total - 2 * frame_events
    requeued = forwarder.queue.take(total)
    assert "ev-000000" not in {event["event_id"] for event in unpack(requeued.chunks)}
    forwarder.queue.give_back([requeued])
    await until(lambda: len(api.rows) == 2 * frame_events)
    await forwarder.close(timeout=2)
    assert sorted(row["event_id"] for row in api.rows) == [f"ev-{n:06d}" for n in range(2 * frame_events)]
    assert forwarder.stats.spooled == total - 2 * frame_events


async def test_with_the_breaker_open_the_helper_writes_rows_into_the_spool(
    make_forwarder: Make, events_api: tuple[EventsAPI, str]
) -> None:
    """The rows of a sink outage never come back to the server: the helper writes them where the
    spool adopts them, and they drain from there once the sink is back."""
    api, _ = events_api
    api.down = True
    forwarder = make_forwarder(encoder_process_min_events=10, breaker_failures=1, max_retries=0, breaker_cooldown=30)
    await started_with_helper(forwarder)
    await stream(forwarder, 20, burst=20, pause=0)
    await until(lambda: forwarder.stats.spooled == 20 and forwarder.breaker.state.name == "OPEN")
    await stream(forwarder, 300, burst=100, pause=0.05)
    await until(lambda: forwarder.stats.spooled == 320)
    assert forwarder.stats.spooled_elsewhere >= 300 - 9 and forwarder.spool.stats.rows_written == 320
    assert not list(forwarder.spool.incoming.iterdir())
    api.down = False
    forwarder.breaker.success()
    await until(lambda: len(api.rows) == 320)
    assert sorted(row["event_id"] for row in api.rows) == sorted(f"ev-{n:06d}" for n in [*range(20), *range(300)])


async def test_a_sink_failing_the_helpers_calls_opens_the_breaker_without_a_call_of_the_forwarders(
    make_forwarder: Make, events_api: tuple[EventsAPI, str]
) -> None:
    """A delivery the helper could not make is a failed call to the sink like any other: a failing
    or slow sink opens the breaker without the forwarder first failing calls of its own (5 s each
    against a sink that does not answer), while every new row comes back through the event loop."""
    api, _ = events_api
    api.down = True
    forwarder = make_forwarder(encoder_process_min_events=10, breaker_failures=1, breaker_cooldown=30)
    await started_with_helper(forwarder)
    await stream(forwarder, 20, burst=20, pause=0)
    await until(lambda: forwarder.stats.spooled == 20)
    assert forwarder.breaker.state.name == "OPEN" and api.requests == 1


async def test_while_the_breaker_probes_the_sink_the_helper_spools_new_rows_and_they_drain_in_order(
    make_forwarder: Make, events_api: tuple[EventsAPI, str]
) -> None:
    """Half-open, one call probes the sink; rows that arrive meanwhile wait in the spool, as they
    do while the breaker is open, instead of coming back to the server to be sent or spooled there."""
    api, _ = events_api
    api.down = True
    forwarder = make_forwarder(encoder_process_min_events=10, breaker_failures=1, max_retries=0, breaker_cooldown=0.3)
    await started_with_helper(forwarder)
    forwarder.breaker.trip()
    await until(lambda: forwarder.breaker.state.name == "HALF_OPEN")
    await stream(forwarder, 100, burst=100, pause=0)
    await until(lambda: forwarder.stats.spooled == 100)
    assert forwarder.stats.spooled_elsewhere == 100 and not api.rows
    api.down = False
    await until(lambda: len(api.rows) == 100)
    assert [row["event_id"] for row in api.rows] == [f"ev-{n:06d}" for n in range(100)]


async def test_while_a_slow_call_drains_the_spool_new_events_keep_moving(
    make_forwarder: Make, events_api: tuple[EventsAPI, str]
) -> None:
    """A probe from the spool that the sink holds for its whole timeout does not hold the queue:
    new events go on to the helper (and into the spool) meanwhile, instead of piling up in memory."""
    api, _ = events_api
    api.down = True
    forwarder = make_forwarder(timeout=5.0, encoder_process_min_events=10, breaker_failures=1, max_retries=0,
                               breaker_cooldown=0.3)
    await started_with_helper(forwarder)
    await stream(forwarder, 100, burst=100, pause=0)
    await until(lambda: forwarder.stats.spooled == 100)
    api.down = False
    api.script.append(Fault(delay=30))
    await until(lambda: api.requests == 2)
    for n in range(100, 2100):
        forwarder.queue.put(event(n))
    await until(lambda: not forwarder.queue and forwarder.stats.spooled == 2100, seconds=3)
    assert not api.rows
    api.released.set()
    await until(lambda: received(api) == {f"ev-{n:06d}" for n in range(2100)})


async def test_a_sink_trickling_its_answer_fails_the_couriers_call_at_the_timeout(
    events_api: tuple[EventsAPI, str]
) -> None:
    """A timeout on each socket read would let a sink that answers a byte at a time hold the
    courier, and every row behind it, for as long as it liked: the call ends at the endpoint's
    timeout instead, its rows come back, and the next call goes through."""
    api, url = events_api
    api.script.append(Fault(trickle=0.05))
    courier = courier_to(url, 0.5)
    courier.offer(Parcel(1, b'{"event_id":"a"}\n', 1))
    [failed] = await asyncio.to_thread(courier.collect, 10.0)
    assert (failed.status, failed.error, failed.rows) == (None, "TimeoutError", b'{"event_id":"a"}\n')
    courier.offer(Parcel(2, b'{"event_id":"b"}\n', 1))
    [delivered] = await asyncio.to_thread(courier.collect, 10.0)
    assert delivered.status == 200 and [row["event_id"] for row in api.rows] == ["b"]


async def test_a_kept_alive_connection_the_sink_closed_is_replaced_and_the_call_made_once_more(
    aiohttp_server: Any
) -> None:
    """Between calls the sink may close an idle kept-alive connection: the next call fails before
    it carried anything, and is made again, once, on a fresh connection; its rows arrive once."""
    api = EventsAPI()
    server = await aiohttp_server(api.app(), keepalive_timeout=0.2)
    url = str(server.make_url("")).rstrip("/")
    courier = courier_to(url, 2.0)
    courier.offer(Parcel(1, b'{"event_id":"a"}\n', 1))
    [first] = await asyncio.to_thread(courier.collect, 10.0)
    await asyncio.sleep(1.0)
    courier.offer(Parcel(2, b'{"event_id":"b"}\n', 1))
    [second] = await asyncio.to_thread(courier.collect, 10.0)
    assert (first.status, second.status) == (200, 200)
    assert [row["event_id"] for row in api.rows] == ["a", "b"] and api.requests == 2
