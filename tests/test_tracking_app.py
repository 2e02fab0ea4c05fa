"""Telemetry of the real app: every stage's row reaches the sink, privacy holds, nothing waits."""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog

from image_service.app import TRACKING
from image_service.tracking import COLUMNS, Tracking, configure_logging, flush_logs, record_text_completion
from image_service.tracking.context import clear as clear_request
from image_service.tracking.context import new_request
from image_service.tracking.processor import TELEMETRY

from .conftest import ClientFactory, make_settings, tracking_to
from .events_api import EventsAPI, Fault
from .test_tracking_forwarder import until

FOX = "/prompt/a%20red%20fox?width=96&height=64&seed=3"


async def flushed(client: Any) -> None:
    assert await client.app[TRACKING].forwarder.flush(timeout=10)


def by_request(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        grouped[row["id"]].append(row)
    return grouped


# Rows are built in-process for small batches and by the encoder process for large ones: a
# threshold of one event sends every batch to the helper, so both paths face the same assertions.
ENCODING_PATHS = pytest.mark.parametrize("min_events", [128, 1], ids=["in-process", "encoder-process"])


@ENCODING_PATHS
async def test_every_stage_of_every_request_arrives_as_a_row(
    make_client: ClientFactory, events_api: tuple[EventsAPI, str], min_events: int
) -> None:
    api, url = events_api
    client = await make_client(make_settings(tracking=tracking_to(url, encoder_process_min_events=min_events)))
    miss = await client.get(FOX)
    hit = await client.get(FOX)
    bad = await client.get("/prompt/x?model=nope")
    missing = await client.get("/nowhere")
    await flushed(client)
    rows = by_request(api.rows)

    def events(response: Any) -> list[str]:
        return [r["event"] for r in rows[response.headers["X-Request-Id"]]]

    assert events(miss) == ["request.received", "cache.lookup", "generation.completed", "moderation.verdict", "request.completed"]
    assert events(hit) == ["request.received", "cache.lookup", "request.completed"]
    assert events(bad) == events(missing) == ["request.completed"]
    terminal = rows[miss.headers["X-Request-Id"]][-1]
    assert (terminal["log_event_type"], terminal["status"], terminal["http_status"]) == ("image_generation", "success", 200)
    assert (terminal["model"], terminal["width"], terminal["height"], terminal["seed"]) == ("procedural", 96, 64, "3")
    assert (terminal["cache_status"], terminal["backend"], terminal["user"], terminal["tier"]) == ("miss", "embedded", "anonymous", "anonymous")
    assert terminal["is_mature"] is False and terminal["is_child"] is False and terminal["prompt"] == "a red fox"
    assert rows[hit.headers["X-Request-Id"]][-1]["log_event_type"] == "image_served_from_cache"
    rejected = rows[bad.headers["X-Request-Id"]][-1]
    assert (rejected["http_status"], rejected["status"], rejected["error"]) == (400, "rejected", "unknown_model")
    assert all(sorted(row) == sorted(COLUMNS) for row in api.rows)
    assert len({row["event_id"] for row in api.rows}) == len(api.rows)
    metrics = await (await client.get("/metrics")).text()
    elsewhere = re.search(r"^image_service_telemetry_rows_encoded_elsewhere_total (\S+)$", metrics, re.M)
    assert elsewhere is not None and (float(elsewhere.group(1)) > 0) is (min_events == 1)


async def test_the_encoder_process_is_ready_before_the_first_request(
    make_client: ClientFactory, events_api: tuple[EventsAPI, str]
) -> None:
    """The service starts its helper as it starts: the first requests' rows are built there,
    not on the event loop while a cold helper takes a second or more to start."""
    api, url = events_api
    # A max_wait long enough that a generation slowed by a busy machine does not have its first
    # events released, as a group too small for the helper, before the request completes.
    client = await make_client(make_settings(tracking=tracking_to(url, encoder_process_min_events=3, max_wait=2.0)))
    forwarder = client.app[TRACKING].forwarder
    helper = forwarder.encoder_process
    assert helper is not None
    await until(lambda: helper.running and not helper.busy, seconds=8)
    assert forwarder.queue.enqueued == 0
    assert (await client.get(FOX)).status == 200
    await flushed(client)
    assert len(api.rows) == forwarder.stats.encoded_elsewhere == 5


async def test_rows_of_one_request_share_its_id_and_times(make_client: ClientFactory, events_api: tuple[EventsAPI, str]) -> None:
    api, url = events_api
    client = await make_client(make_settings(tracking=tracking_to(url)))
    response = await client.get(FOX)
    await flushed(client)
    rows = by_request(api.rows)[response.headers["X-Request-Id"]]
    assert {r["message_id"] for r in rows} == {response.headers["X-Request-Id"]}
    assert len({r["start_time"] for r in rows}) == 1 and all(r["end_time"] >= r["start_time"] for r in rows)
    assert rows[-1]["duration_ms"] >= rows[2]["duration_ms"] > 0


async def test_incoming_traceparent_is_recorded_and_continued(make_client: ClientFactory, events_api: tuple[EventsAPI, str]) -> None:
    """A request can be followed across services by its W3C trace id."""
    api, url = events_api
    client = await make_client(make_settings(tracking=tracking_to(url)))
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    response = await client.get(FOX, headers={"traceparent": f"00-{trace}-00f067aa0ba902b7-01"})
    await flushed(client)
    assert response.headers["traceparent"].startswith(f"00-{trace}-")
    rows = by_request(api.rows)[response.headers["X-Request-Id"]]
    assert {r["trace_id"] for r in rows} == {trace}
    assert orjson.loads(rows[-1]["proxy_metadata"])["parent_span_id"] == "00f067aa0ba902b7"
    unsampled = await client.get(FOX, headers={"traceparent": f"00-{trace}-00f067aa0ba902b7-00"})
    assert unsampled.headers["traceparent"].endswith("-00")  # the caller's sampling decision goes on


@ENCODING_PATHS
async def test_private_prompts_tokens_and_ips_appear_in_no_row_and_no_log(
    make_client: ClientFactory, events_api: tuple[EventsAPI, str], capfd: Any, min_events: int
) -> None:
    """Whatever the client sends, its secrets stay in the service."""
    api, url = events_api
    configure_logging("json", "debug")
    try:
        client = await make_client(make_settings(tracking=tracking_to(url, encoder_process_min_events=min_events)))
        headers = {"Authorization": "Bearer sk-authheader-123456789", "X-Forwarded-For": "198.51.100.77",
                   "Referer": "https://site.example/page?token=sk-referer-123456789"}
        await client.get("/prompt/my%20diary%20entry?private=true&token=sk-query-123456789&width=32&height=32",
                         headers=headers)
        await client.get("/prompt/my%20diary%20entry?private=true&width=oops&token=sk-query-123456789", headers=headers)
        await flushed(client)
        flush_logs()
    finally:
        structlog.reset_defaults()
    logs = capfd.readouterr().out
    assert '"event":"request.completed"' in logs
    everything = logs + orjson.dumps(api.rows).decode()
    for secret in ("diary", "sk-authheader", "sk-query", "sk-referer", "198.51.100.77", "127.0.0.1"):
        assert secret not in everything, secret
    assert {row["prompt"] for row in api.rows if row["prompt"]} == {"[PRIVATE]"}
    assert (client.app[TRACKING].forwarder.stats.encoded_elsewhere > 0) is (min_events == 1)


async def test_a_quieter_log_level_hides_lines_but_loses_no_row(
    make_client: ClientFactory, events_api: tuple[EventsAPI, str], capfd: Any
) -> None:
    """Operators turn logs down to warnings; telemetry must not go quiet with them."""
    api, url = events_api
    configure_logging("json", "warning")
    try:
        client = await make_client(make_settings(tracking=tracking_to(url)))
        miss = await client.get(FOX)
        hit = await client.get(FOX)
        await flushed(client)
        structlog.get_logger("image_service.test").warning("operator.visible")
        flush_logs()
    finally:
        structlog.reset_defaults()
    logs = capfd.readouterr().out
    rows = by_request(api.rows)
    assert len(rows[miss.headers["X-Request-Id"]]) == 5 and len(rows[hit.headers["X-Request-Id"]]) == 3
    assert '"event":"operator.visible"' in logs and "request.completed" not in logs


@pytest.mark.parametrize("log_format", ["json", "console"])
async def test_a_referer_that_is_not_utf8_neither_fails_the_request_nor_loses_its_rows(
    make_client: ClientFactory, events_api: tuple[EventsAPI, str], capfd: Any, log_format: str
) -> None:
    """Header bytes that are not UTF-8 reach the app as lone surrogates, which no JSON encoder takes."""
    api, url = events_api
    configure_logging(log_format, "info")
    try:
        client = await make_client(make_settings(tracking=tracking_to(url)))
        reader, writer = await asyncio.open_connection(client.host, client.port)
        writer.write(f"GET {FOX} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".encode()
                     + b"Referer: https://ex\xffample.com/page\r\nOrigin: https://\xfe.example\r\n\r\n")
        head = (await reader.read()).split(b"\r\n\r\n", 1)[0].decode()
        writer.close()
        await flushed(client)
        flush_logs()
    finally:
        structlog.reset_defaults()
    assert head.startswith("HTTP/1.1 200")
    (request_id,) = re.findall(r"X-Request-Id: (\w+)", head)
    rows = by_request(api.rows)[request_id]
    assert len(rows) == 5 and {row["referrer"] for row in rows} == {None}
    assert request_id in capfd.readouterr().out


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_a_log_call_never_raises_on_text_no_encoder_takes(capfd: Any, log_format: str) -> None:
    configure_logging(log_format, "info")
    try:
        structlog.get_logger("image_service.test").warning("odd.header", value="ex\udcffample")
        flush_logs()
    finally:
        structlog.reset_defaults()
    out = capfd.readouterr().out
    assert "odd.header" in out and "ex\\udcffample" in out.replace("\\\\", "\\")  # JSON escapes the backslash


async def test_text_completions_share_the_processor_and_forwarder(
    make_client: ClientFactory, events_api: tuple[EventsAPI, str]
) -> None:
    """The seed's shared tracker: a text row lands in the same datasource as the image rows."""
    api, url = events_api
    client = await make_client(make_settings(tracking=tracking_to(url)))
    record_text_completion(model="openai-large", provider="azure", cost=0.0021, prompt_tokens=120,
                           completion_tokens=48, cached_tokens=16, duration_ms=840.0, user="u-1", tier="seed")
    await flushed(client)
    (row,) = [r for r in api.rows if r["service_type"] == "text"]
    assert (row["model"], row["provider"], row["cost"], row["prompt_tokens"], row["completion_tokens"]) == (
        "openai-large", "azure", 0.0021, 120, 48)
    assert (row["user"], row["tier"], row["call_type"], row["duration"]) == ("u-1", "seed", "completion", 840)


async def test_text_completions_from_worker_threads_arrive_once_each(
    make_client: ClientFactory, events_api: tuple[EventsAPI, str]
) -> None:
    """A text service may record from its worker threads while the loop serves images."""
    api, url = events_api
    client = await make_client(make_settings(tracking=tracking_to(url)))
    per_thread, threads = 1500, 4

    def record(thread: int) -> None:
        for index in range(per_thread):
            record_text_completion(model="openai", request_id=f"text-{thread}-{index}", duration_ms=1.0)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as CPython can: races show at once
    try:
        workers = [threading.Thread(target=record, args=(thread,)) for thread in range(threads)]
        for worker in workers:
            worker.start()
        while any(worker.is_alive() for worker in workers):
            assert (await client.get(FOX)).status == 200
    finally:
        sys.setswitchinterval(interval)
    await flushed(client)
    ids = [row["id"] for row in api.rows if row["service_type"] == "text"]
    assert len(ids) == len(set(ids)) == per_thread * threads


async def test_a_text_service_with_its_own_quiet_logging_records_its_completions(
    events_api: tuple[EventsAPI, str],
) -> None:
    """The README's recipe in a process whose structlog is its own: no telemetry processor in the
    chain, and a level that drops info calls."""
    api, url = events_api
    structlog.configure(processors=[structlog.processors.JSONRenderer()],
                        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    try:
        async with Tracking(make_settings(tracking=tracking_to(url)).tracking) as tracking:
            record_text_completion(model="openai", provider="azure", prompt_tokens=12, duration_ms=300.0)
            assert await tracking.forwarder.flush(timeout=10)
    finally:
        structlog.reset_defaults()
    (row,) = api.rows
    assert (row["service_type"], row["model"], row["provider"], row["prompt_tokens"]) == ("text", "openai", "azure", 12)


def test_a_completions_exception_is_sanitised_in_the_text_services_own_log(capfd: Any) -> None:
    """The call logs the completion at debug too, in whatever log the text service keeps."""
    configure_logging("json", "debug")
    try:
        record_text_completion(model="openai", duration_ms=1.0, http_status=502,
                               exception="upstream 401 for Authorization: Basic YWxpY2U6U0VDUkVU, access_token=AT-9")
        flush_logs()
    finally:
        structlog.reset_defaults()
    out = capfd.readouterr().out
    assert "text.completion" in out and "YWxpY2U6U0VDUkVU" not in out and "AT-9" not in out


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_a_logged_exception_is_scrubbed_and_a_private_requests_withheld(capfd: Any, log_format: str) -> None:
    """A crash's log line quoted whatever the exception said: a credential, or a private prompt."""
    configure_logging(log_format, "info")
    log = structlog.get_logger("image_service.test")
    # Built at run time: a traceback quotes its source lines, and those must not hold the words.
    message = "could not fetch https://bob:" + "hunter" + "2@cdn.example/x for " + " ".join(("my", "holiday", "plan"))
    try:
        for private in (False, True):
            new_request(request_id=f"crash-{private}", private=private, prompt="[PRIVATE]" if private else "fox")
            try:
                raise ValueError(message)
            except ValueError:
                log.exception("request.crashed")
            if not private:  # the crash's terminal line carries the text as fields (for its row) too
                log.info("request.completed", status=500, exception=message, traceback=f"Traceback ...\n{message}")
            clear_request()
        flush_logs()
    finally:
        structlog.reset_defaults()
    out = capfd.readouterr().out
    assert out.count("request.crashed") == 2 and "ValueError" in out and "hunter2" not in out
    assert out.count("my holiday plan") == 3 and "details withheld: private request" in out


def test_a_completion_recorded_with_no_tracking_running_says_it_was_lost(
    capfd: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Recording before `Tracking.start` (or after `close`) sends nothing: the text service's
    developer is told, not left to find an empty datasource."""
    monkeypatch.setattr(TELEMETRY, "unrouted_text", 0)
    configure_logging("json", "info")
    try:
        for _ in range(5):
            record_text_completion(model="openai", duration_ms=1.0)
        flush_logs()
    finally:
        structlog.reset_defaults()
    warnings = [orjson.loads(line) for line in capfd.readouterr().out.splitlines() if "not_recorded" in line]
    assert [(w["event"], w["lost"]) for w in warnings] == [("text.completion_not_recorded", n) for n in (1, 2, 4)]


async def test_without_an_api_key_rows_go_to_the_local_file(make_client: ClientFactory, tmp_path: Path) -> None:
    """A newcomer sees exactly the rows production would send, in var/events.ndjson."""
    client = await make_client(make_settings(tracking={"max_wait": 0.02}))
    response = await client.get(FOX)
    await flushed(client)
    rows = [orjson.loads(line) for line in (tmp_path / "var" / "events.ndjson").read_bytes().splitlines()]
    assert {r["id"] for r in rows} == {response.headers["X-Request-Id"]} and len(rows) == 5
    health = await (await client.get("/health")).json()
    assert health["telemetry"]["sink"] == "file" and health["telemetry"]["breaker"] == "closed"


async def test_metrics_expose_the_forwarders_counters(make_client: ClientFactory, events_api: tuple[EventsAPI, str]) -> None:
    api, url = events_api
    client = await make_client(make_settings(tracking=tracking_to(url)))
    await client.get(FOX)
    await flushed(client)
    text = await (await client.get("/metrics")).text()
    assert "image_service_telemetry_rows_sent_total 5.0" in text
    assert 'image_service_telemetry_rows_dropped_total{reason="queue_full"} 0.0' in text
    assert "image_service_telemetry_breaker_state 0.0" in text


async def test_requests_never_wait_on_a_hanging_sink(make_client: ClientFactory, events_api: tuple[EventsAPI, str]) -> None:
    """While the sink holds a call open, requests keep being answered."""
    api, url = events_api
    api.script.append(Fault(delay=30))
    settings = make_settings(tracking=tracking_to(url, timeout=60.0, shutdown_timeout=0.5))
    client = await make_client(settings)
    await client.get(FOX)
    while api.requests == 0:
        await asyncio.sleep(0.01)
    statuses = [(await client.get(FOX)).status for _ in range(20)]
    assert statuses == [200] * 20
    assert api.statuses == [], "the sink call must still be hanging"
    api.released.set()


async def test_health_checks_and_metrics_scrapes_are_not_telemetry_rows(
    make_client: ClientFactory, events_api: tuple[EventsAPI, str]
) -> None:
    """Operational routes and CORS preflights are logged but never inflate request volume (a
    browser sending a token preflights every image); an unknown path still counts."""
    api, url = events_api
    client = await make_client(make_settings(tracking=tracking_to(url)))
    for path in ("/health", "/metrics", "/models", "/openapi.json"):
        await client.get(path)
    preflight = {"Origin": "https://site.example", "Access-Control-Request-Method": "GET",
                 "Access-Control-Request-Headers": "authorization"}
    for path in ("/prompt/a%20fox", "/health"):
        answer = await client.options(path, headers=preflight)
        assert answer.status == 204 and "GET" in answer.headers["Access-Control-Allow-Methods"]
    missing = await client.get("/no-such-route")
    refused = await client.delete("/prompt/a%20fox")
    await flushed(client)
    assert {row["id"] for row in api.rows} == {missing.headers["X-Request-Id"], refused.headers["X-Request-Id"]}
    # The row's error is the one the client was answered, as for every other refusal.
    assert sorted(row["error"] for row in api.rows) == ["method_not_allowed", "not_found"]


class _Broken:
    """A backend that returns garbage, so the pipeline crashes after generation."""

    name, provider = "embedded", "test"

    async def generate(self, params: object) -> object:
        return object()

    async def close(self) -> None:
        return None


async def test_a_crash_is_recorded_on_the_terminal_row_only_and_never_quotes_a_private_request(
    make_client: ClientFactory, events_api: tuple[EventsAPI, str]
) -> None:
    api, url = events_api
    client = await make_client(make_settings(tracking=tracking_to(url)), backends={"embedded": _Broken()})
    public = await client.get("/prompt/plain%20fox?width=32&height=32")
    private = await client.get("/prompt/secret%20fox?width=32&height=32&private=true")
    await flushed(client)
    assert public.status == private.status == 500
    rows = by_request(api.rows)
    public_rows, private_rows = rows[public.headers["X-Request-Id"]], rows[private.headers["X-Request-Id"]]
    assert [r["exception"] is not None for r in public_rows] == [False] * (len(public_rows) - 1) + [True]
    assert public_rows[-1]["traceback"]
    assert private_rows[-1]["exception"] == "AttributeError" and private_rows[-1]["traceback"] is None
    assert "secret" not in orjson.dumps(private_rows).decode()
