"""Rows, privacy filters, the processor, the breaker and the spool, each on its own."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from image_service.tracking import COLUMNS, TELEMETRY, Breaker, BreakerState, EventQueue, Spool, build_row, sanitise
from image_service.tracking.batch import Rows
from image_service.tracking.context import bind, new_request, parse_traceparent, request_ids
from image_service.tracking.context import clear as clear_request
from image_service.tracking.processor import CHUNK_GROUPS, TelemetryProcessor, unpack
from image_service.tracking.rows import EVENT_COLUMNS, RowEncoder
from image_service.tracking.spool import SpoolUnwritable

from .conftest import disk_full_at


def terminal(**fields: object) -> dict[str, object]:
    now = time.time()
    return {"event": "request.completed", "stage": "response", "request_id": "r1", "_ts": now,
            "request_start": now - 0.25, "status": 200, "duration_ms": 250.4, **fields}


class TestRows:
    def test_every_row_has_exactly_the_schema_columns(self) -> None:
        """No row misses a column, so Tinybird never quarantines one for a missing field."""
        for event in (terminal(), terminal(event="cache.lookup", stage="cache"),
                      {"event": "text.completion", "stage": "text", "_ts": time.time(), "model": "gpt"}):
            assert list(build_row(event)) == list(COLUMNS)

    @pytest.mark.parametrize(
        ("status", "cache_status", "expected", "word"),
        [
            (200, "hit", "image_served_from_cache", "success"),
            (200, "miss", "image_generation", "success"),
            (200, "shared-wait", "image_generation", "success"),
            (502, None, "image_generation_error", "error"),
            (504, None, "image_generation_error", "error"),
            (451, None, "content_flagged", "content_violation"),
            (400, None, "image_request_rejected", "rejected"),
            (429, None, "image_request_rejected", "rejected"),
        ],
    )
    def test_terminal_rows_carry_the_seed_event_types(self, status: int, cache_status: str | None, expected: str, word: str) -> None:
        row = build_row(terminal(status=status, cache_status=cache_status))
        assert (row["log_event_type"], row["status"], row["http_status"]) == (expected, word, status)

    def test_rows_encoded_from_a_request_context_have_every_column_exactly_once(self) -> None:
        """The request's columns are encoded once and joined to each event's: no key twice, none missing."""
        encoder = RowEncoder("test")
        context = {"request_id": "r9", "request_start": time.time(), "model": "procedural", "prompt": "a fox",
                   "user": "u1", "tier": "seed", "width": 64, "cache_status": "hit"}
        for event in ({"event": "cache.lookup", "stage": "cache", "_ts": time.time(), "_ctx": context},
                      {"event": "request.completed", "stage": "response", "status": 200, "_ts": time.time(),
                       "_ctx": context}):
            pairs = json.loads(encoder.encode(event), object_pairs_hook=lambda items: items)
            assert sorted(key for key, _ in pairs) == sorted(COLUMNS)
            row = dict(pairs)
            assert (row["id"], row["user"], row["tier"], row["cache_status"]) == ("r9", "u1", "seed", "hit")

    @pytest.mark.parametrize(("field", "values"), [
        ("event", ["cache.lookup", "request.received", "content.flagged"]),
        ("stage", ["cache", "moderation", 1, True]),
        ("status", [200, 404, 1, True, 1.0]),
        ("error", [None, "timeout", ["a list"]]),
        ("provider", ["image_service", "openai", None]),
        ("backend", ["embedded", "workers"]),
        ("cost", [0.5, 1.5, 0]),
        ("is_child", [True, False, None]),
        ("is_mature", [True, False, None]),
        ("cache_status", ["hit", "miss"]),
        ("http_status", [200, 429]),
        ("exception", [None, "ValueError: at /srv/app/x.py"]),
        ("labels", [None, {"nsfw": 0.1}]),
    ])
    def test_rows_sharing_an_outcome_are_the_rows_built_whole(self, field: str, values: list[Any]) -> None:
        """The encoder serialises an outcome once for the events that share it: an event that
        differs in any field its outcome depends on gets its own, and a text event's (which reads
        more fields) is never shared."""
        context = {"request_id": "r7", "request_start": time.time(), "model": "procedural", "cache_status": "miss",
                   "provider": "image_service", "backend": "embedded", "span_id": "00f067aa0ba902b7"}
        encoder = RowEncoder("test")
        for name in ("request.completed", "text.completion"):
            # Each value after the first, then the first again: every one of them after an event
            # that differs only there has filled the cache.
            for index, value in enumerate([*values, *values[1:], values[0]]):
                event = {"event": name, "stage": "response", "_ts": time.time() + index, "duration_ms": index * 1.5,
                         "event_id": f"e{index}", field: value}
                expected = build_row({**context, **event}, "test")
                if "labels" not in event:
                    expected["proxy_metadata"] = build_row(dict(context), "test")["proxy_metadata"]
                row = orjson.loads(encoder.encode({**event, "_ctx": context}))
                assert {column: row[column] for column in EVENT_COLUMNS} == {
                    column: expected[column] for column in EVENT_COLUMNS
                }, (name, field, value)

    def test_times_are_datetime64_text_and_duration_is_milliseconds(self) -> None:
        row = build_row(terminal())
        assert len(row["start_time"]) == len("2026-01-01 00:00:00.000") and row["start_time"] < row["end_time"]
        assert (row["duration"], row["duration_ms"]) == (250, 250.4)

    def test_private_prompt_is_replaced_even_if_an_event_carried_it(self) -> None:
        """Defence in depth: a private request's prompt never reaches a row."""
        assert build_row(terminal(private=True, prompt="my secret"))["prompt"] == "[PRIVATE]"

    def test_referrer_loses_its_query_string(self) -> None:
        row = build_row(terminal(referrer="https://user:pw@app.example/page?token=abc"))
        assert row["referrer"] == "https://app.example/page"

    def test_row_ids_follow_the_request_and_event_ids_are_unique(self) -> None:
        rows = [build_row(terminal()) for _ in range(100)]
        assert {r["id"] for r in rows} == {"r1"} and {r["message_id"] for r in rows} == {"r1"}
        assert len({r["event_id"] for r in rows}) == 100

    def test_text_completion_rows_carry_text_fields(self) -> None:
        row = build_row({"event": "text.completion", "stage": "text", "_ts": time.time(), "model": "gpt-x",
                         "provider": "openai", "cost": 0.002, "prompt_tokens": 12, "completion_tokens": 30,
                         "cached_tokens": 4, "duration_ms": 800})
        assert (row["service_type"], row["call_type"], row["log_event_type"]) == ("text", "completion", "completion")
        assert (row["prompt_tokens"], row["completion_tokens"], row["cached_tokens"], row["cost"]) == (12, 30, 4, 0.002)
        assert row["prompt"] is None and row["width"] is None

    @pytest.mark.parametrize(("given", "expected"), [
        ({}, "success"), ({"http_status": 200}, "success"), ({"http_status": 429}, "rejected"),
        ({"http_status": 502}, "error"), ({"http_status": 502, "status": "timeout"}, "timeout"),
    ])
    def test_a_text_rows_status_follows_its_http_status_unless_given(self, given: dict[str, Any], expected: str) -> None:
        """A failed completion must count in the error rate, as a failed image does."""
        row = build_row({"event": "text.completion", "stage": "text", "_ts": time.time(), "model": "gpt-x", **given})
        assert row["status"] == expected


@pytest.mark.parametrize(
    ("text", "leak"),
    [
        ("connect to https://admin:hunter2@db.internal/x failed", "hunter2"),
        ("upstream said: Authorization: Bearer abc.def.ghi", "abc.def.ghi"),
        ("GET /v1?token=tok_123456789&x=1", "tok_123456789"),
        ("api_key=sk-proj-ABCDEFGHIJKLMNOP rejected", "sk-proj-ABCDEFGHIJKLMNOP"),
        ("key sk-live-0123456789abcdef leaked", "sk-live-0123456789abcdef"),
        ("File /home/alice/service/secret_module.py, line 3", "/home/alice"),
        ("peer 203.0.113.9 reset the connection", "203.0.113.9"),
        ("jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl expired", "eyJzdWIiOiIxIn0"),
        ("Authorization: Basic YWxpY2U6QkFTSUNTRUNSRVQ=", "YWxpY2U6QkFTSUNTRUNSRVQ"),
        ("upstream said Basic YWxpY2U6QkFTSUNTRUNSRVQ= is wrong", "YWxpY2U6QkFTSUNTRUNSRVQ"),
        ("POST /oauth access_token=ACCESSTOKSECRET&x=1", "ACCESSTOKSECRET"),
        ("refresh_token=REFRESHSECRET client_secret=CLIENTSECRETVAL", "REFRESHSECRET"),
        ("refresh_token=REFRESHSECRET client_secret=CLIENTSECRETVAL", "CLIENTSECRETVAL"),
        ('body {"api_key": "JSONKEYSECRET99"} refused', "JSONKEYSECRET99"),
        ('password:  "PWSECRET"', "PWSECRET"),
        ("X-Api-Key: HEADERKEY123", "HEADERKEY123"),
        ("Cookie: sid=COOKIE1; theme=dark; auth=COOKIE2", "COOKIE2"),
        ("redis://:REDIS@PW3@127.0.0.1:6379/0 refused", "PW3"),
        ("peer 2001:db8::dead:beef reset the connection", "dead:beef"),
        ("posting to https://hooks.slack.com/services/T000/B000/XXXXSECRET failed", "XXXXSECRET"),
        ("token ghp_abcdefghijklmnopqrstuvwxyz0123 is revoked", "ghp_abcdefghijklmnopqrstuvwxyz0123"),
        ("aws AKIAABCDEFGHIJKLMNOP denied", "AKIAABCDEFGHIJKLMNOP"),
    ],
)
def test_sanitise_removes_credentials_addresses_and_paths(text: str, leak: str) -> None:
    """Exception text is scrubbed before it leaves the process."""
    cleaned = sanitise(text)
    assert cleaned is not None and leak not in cleaned


def test_sanitise_keeps_ordinary_messages_readable() -> None:
    for text in ("the embedded backend failed (RuntimeError)", "timed out at 12:30:45 after 3 tries",
                 "the monkey ate a banana", "keyboard layout: de-CH", "Session is closed", "keys must be str",
                 "5000 tokens (4000 in your prompt)", "signature mismatch", "No credentials found",
                 "a basic image of a cat", "basic information", "fetching https://cdn.example.com/@artist/x.png"):
        assert sanitise(text) == text


@contextlib.contextmanager
def request_routed(processor: TelemetryProcessor, queue: EventQueue, request_id: str) -> Iterator[None]:
    """Inside the block, the current task is one request whose events go to `queue`."""
    processor.route_current_context(queue)
    new_request(request_id=request_id)
    try:
        yield
    finally:
        processor.route_current_context(None)
        clear_request()


def queued(queue: EventQueue) -> list[dict[str, object]]:
    """The events waiting in `queue`, taken as the forwarder takes them."""
    return unpack(queue.take(len(queue)).chunks)


class TestProcessor:
    def test_copies_stage_events_onto_the_queue_and_returns_them_unchanged(self) -> None:
        processor, queue = TelemetryProcessor(), EventQueue(10)
        processor.default = queue
        event = {"event": "cache.lookup", "stage": "cache"}
        assert processor(None, "info", event) is event
        [copy] = queued(queue)
        assert copy["event"] == "cache.lookup" and "_ts" in copy and "_ts" not in event

    def test_a_requests_events_wait_for_its_terminal_event_then_share_one_context(self) -> None:
        """The context is serialised once per request, with the facts bound after the first event."""
        processor, queue = TelemetryProcessor(), EventQueue(10)
        with request_routed(processor, queue, "a" * 32):
            processor(None, "info", {"event": "request.received", "stage": "request"})
            processor(None, "info", {"event": "cache.lookup", "stage": "cache"})
            assert len(queue) == 0 and len(queue.open) == 1
            bind(tier="seed")
            processor(None, "info", {"event": "request.completed", "stage": "response", "status": 200})
        assert (len(queue), queue.open) == (3, set())
        groups = queue.take(3)
        assert len(groups) == 1 and b"".join(groups.chunks).count(b"a" * 32) == 1
        events = unpack(groups.chunks)
        assert [event["event"] for event in events] == ["request.received", "cache.lookup", "request.completed"]
        assert all(event["_ctx"] == {"request_id": "a" * 32, "tier": "seed"} for event in events)

    def test_waiting_events_of_a_slow_request_can_be_released_early(self) -> None:
        processor, queue = TelemetryProcessor(), EventQueue(10)
        with request_routed(processor, queue, "b" * 32):
            processor(None, "info", {"event": "request.received", "stage": "request"})
        queue.release_older_than(time.time() - 60)
        assert len(queue) == 0
        queue.release_older_than(time.time() + 1)
        assert [event["event"] for event in queued(queue)] == ["request.received"] and not queue.open

    def test_rows_built_again_from_a_group_keep_their_event_ids(self) -> None:
        """A group encoded twice (its encoder process died mid-delivery, say) yields the same ids,
        so the sink can drop the copies; every event of every request still has an id of its own."""
        queue = EventQueue(100)
        for n in range(3):
            queue.put_group({"request_id": f"{n:032x}"}, [
                {"event": "request.received", "_ts": 5.0}, {"event": "cache.lookup", "_ts": 5.0},
                {"event": "request.completed", "_ts": 5.001},
            ])
        data = queue.take(9).chunks
        first, again = [[event["event_id"] for event in unpack(data)] for _ in range(2)]
        assert first == again and len(set(first)) == 9

    def test_a_value_orjson_refuses_travels_as_text_and_loses_no_event(self) -> None:
        """An integer past 64 bits, a key that is not text, a lone surrogate (a header byte that is
        not UTF-8, as aiohttp decodes it)."""
        queue = EventQueue(10)
        queue.put_group({"request_id": "c" * 32, 3: "three", "referrer": "ex\udcffample"}, [
            {"event": "request.received", "_ts": 1.0},
            {"event": "cache.lookup", "width": 2**70, "_ts": 2.0, "k\udcfe": 1},
        ])
        assert (len(queue), queue.unserialisable) == (2, 0)
        received, lookup = queued(queue)
        assert lookup["width"] == str(2**70) and lookup["k\\udcfe"] == 1
        assert received["_ctx"] == {"request_id": "c" * 32, "3": "three", "referrer": "ex\\udcffample"}

    def test_ignores_ordinary_log_lines(self) -> None:
        processor, queue = TelemetryProcessor(), EventQueue(10)
        processor.default = queue
        processor(None, "info", {"event": "server started"})
        assert len(queue) == 0

    def test_never_raises(self) -> None:
        """A broken event is counted, not thrown at the request handler."""
        processor = TelemetryProcessor()

        class Hostile(dict):  # type: ignore[type-arg]
            def keys(self) -> object:  # type: ignore[override]
                raise RuntimeError("boom")

            def __iter__(self) -> object:  # type: ignore[override]
                raise RuntimeError("boom")

        processor.default = EventQueue(10)
        event = Hostile(stage="x")
        assert processor(None, "info", event) is event and processor.errors == 1

    def test_full_queue_counts_what_it_refuses(self) -> None:
        queue = EventQueue(2)
        for _ in range(5):
            queue.put({"_ts": 0.0})
        assert (len(queue), queue.enqueued, queue.dropped_full) == (2, 2, 3)


def requests_queue(sizes: list[int], first_ts: float = 100.0) -> EventQueue:
    """A queue holding one group per size, of that many events, named `r<n>/<i>` in order."""
    queue = EventQueue(1000)
    for n, size in enumerate(sizes):
        queue.put_group({"request_id": f"r{n}"}, [{"event": f"r{n}/{i}", "_ts": first_ts + n} for i in range(size)])
    return queue


def names(data: object) -> list[str]:
    return [str(event["event"]) for event in unpack(data)]  # type: ignore[arg-type]


class TestEventQueue:
    def test_taking_stops_at_the_limit_on_a_group_boundary_and_leaves_the_rest_in_order(self) -> None:
        queue = requests_queue([3, 2, 4])
        taken = queue.take(6)
        assert (len(taken), taken.events, len(queue)) == (2, 5, 4)
        assert names(taken.chunks) == ["r0/0", "r0/1", "r0/2", "r1/0", "r1/1"]
        assert names(queue.take(100).chunks) == [f"r2/{i}" for i in range(4)] and len(queue) == 0

    def test_a_group_larger_than_the_limit_is_taken_whole(self) -> None:
        queue = requests_queue([5, 1])
        taken = queue.take(2)
        assert (taken.events, len(queue)) == (5, 1)

    def test_groups_given_back_go_before_newer_ones_in_their_order(self) -> None:
        queue = requests_queue([1, 2, 3])
        first, second = queue.take(1), queue.take(2)
        queue.put_group({"request_id": "late"}, [{"event": "late", "_ts": 1.0}])
        queue.give_back([first, second])
        assert len(queue) == 7
        assert names(queue.take(100).chunks) == ["r0/0", "r1/0", "r1/1", "r2/0", "r2/1", "r2/2", "late"]

    def test_the_oldest_event_decides_a_batch_age_even_behind_younger_requests(self) -> None:
        """A request that ran long is queued at its end, after requests that started later."""
        queue = requests_queue([1, 1])
        queue.put_group({"request_id": "long"}, [{"event": "long", "_ts": 50.0}])
        assert queue.oldest_ts() == 50.0 and queue.take(100).since == 50.0

    def test_frames_hold_whole_groups_up_to_their_size_and_cover_the_batch_once(self) -> None:
        groups = requests_queue([2, 2, 5, 1, 1, 1]).take(100)
        runs = groups.runs(4)
        assert runs == [(0, 2), (2, 3), (3, 6)]
        assert [names(groups.slice(*run).chunks) for run in runs] == [
            ["r0/0", "r0/1", "r1/0", "r1/1"], [f"r2/{i}" for i in range(5)], ["r3/0", "r4/0", "r5/0"],
        ]
        rest = groups.without([runs[1]])
        assert [names(part.chunks) for part in rest] == [["r0/0", "r0/1", "r1/0", "r1/1"], ["r3/0", "r4/0", "r5/0"]]
        assert sum(part.events for part in rest) == groups.events - 5

    def test_a_full_chunk_of_groups_is_taken_whole_and_in_order(self) -> None:
        """Groups are serialised CHUNK_GROUPS at a time; a batch holds the chunk, not part of it."""
        queue = requests_queue([1] * (CHUNK_GROUPS + 2))
        taken = queue.take(2)
        assert (len(taken), taken.events, len(queue)) == (1, CHUNK_GROUPS, 2)
        assert names(taken.chunks) == [f"r{n}/0" for n in range(CHUNK_GROUPS)]
        assert names(queue.take(100).chunks) == [f"r{n}/0" for n in (CHUNK_GROUPS, CHUNK_GROUPS + 1)]

    def test_a_group_that_cannot_be_serialised_costs_only_its_own_events(self) -> None:
        class Unprintable:
            def __str__(self) -> str:
                raise RuntimeError("no text either")

        queue = requests_queue([2] * (CHUNK_GROUPS - 1))
        queue.put_group({"request_id": "bad"}, [{"event": "bad", "_ts": 1.0, "value": Unprintable()}])
        assert (queue.unserialisable, len(queue)) == (1, 2 * (CHUNK_GROUPS - 1))
        assert names(queue.take(100).chunks) == [f"r{n}/{i}" for n in range(CHUNK_GROUPS - 1) for i in range(2)]

    def test_routes_to_the_queue_of_the_current_request(self) -> None:
        """Two apps in one process each receive their own requests' events."""
        mine, other = EventQueue(10), EventQueue(10)
        TELEMETRY.default = other
        try:
            TELEMETRY.route_current_context(mine)
            TELEMETRY(None, "info", {"event": "request.completed", "stage": "response"})
        finally:
            TELEMETRY.route_current_context(None)
            TELEMETRY.default = None
        assert (len(mine), len(other)) == (1, 0)


class TestContext:
    def test_valid_traceparent_is_parsed(self) -> None:
        header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        assert parse_traceparent(header) == ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", "01")

    @pytest.mark.parametrize("header", [None, "", "garbage", "00-" + "0" * 32 + "-00f067aa0ba902b7-01",
                                        "00-4bf92f3577b34da6a3ce929d0e0e4736-" + "0" * 16 + "-01"])
    def test_invalid_traceparent_is_ignored(self, header: str | None) -> None:
        assert parse_traceparent(header) is None

    def test_request_ids_are_unique_32_hex(self) -> None:
        ids = {request_ids.next() for _ in range(1000)}
        assert len(ids) == 1000 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)

    def test_new_request_replaces_the_previous_context(self) -> None:
        first = new_request(request_id="a")
        second = new_request(request_id="b")
        assert first is not second and second == {"request_id": "b"}


class TestBreaker:
    def test_opens_after_consecutive_failures_and_probes_after_cooldown(self) -> None:
        now = [0.0]
        breaker = Breaker(failures=3, cooldown=10, clock=lambda: now[0])
        breaker.failure(), breaker.failure()
        assert breaker.state is BreakerState.CLOSED
        breaker.failure()
        assert breaker.state is BreakerState.OPEN
        now[0] = 10.0
        assert breaker.state is BreakerState.HALF_OPEN
        breaker.failure()
        assert breaker.state is BreakerState.OPEN
        now[0] = 20.0
        breaker.success()
        assert breaker.state is BreakerState.CLOSED

    def test_a_success_resets_the_failure_count(self) -> None:
        breaker = Breaker(failures=2, cooldown=1, clock=lambda: 0.0)
        breaker.failure(), breaker.success(), breaker.failure()
        assert breaker.state is BreakerState.CLOSED

    def test_bad_options_fail_in_the_constructor(self) -> None:
        with pytest.raises(ValueError):
            Breaker(failures=0, cooldown=1, clock=time.monotonic)


class TestSpool:
    @pytest.fixture(autouse=True)
    def _close_spools(self) -> Iterator[None]:
        self.opened: list[Spool] = []
        yield
        for spool in self.opened:
            spool.close()

    def make(self, directory: Path, **options: int) -> Spool:
        spool = Spool(directory, **{"max_bytes": 1_000_000, **options})
        spool.open()
        self.opened.append(spool)
        return spool

    def lines(self, start: int, count: int) -> list[bytes]:
        return [orjson.dumps({"n": n}) + b"\n" for n in range(start, start + count)]

    def drain(self, spool: Spool) -> list[int]:
        seen = []
        while batch := spool.read_batch(7, 10_000):
            seen += [orjson.loads(line)["n"] for line in batch]
            spool.commit(len(batch))
        return seen

    def test_an_adopted_file_drains_after_the_rows_written_before_it(self, tmp_path: Path) -> None:
        spool = self.make(tmp_path / "spool", segment_bytes=100)
        spool.append(Rows.of_lines(self.lines(0, 10)))
        spool.incoming.mkdir()
        (spool.incoming / "helper-1.ndjson").write_bytes(b"".join(self.lines(10, 10)))
        evicted = spool.adopt(spool.incoming / "helper-1.ndjson", 10)
        spool.append(Rows.of_lines(self.lines(20, 5)))
        assert evicted == 0 and spool.stats.rows_written == 25 and not list(spool.incoming.iterdir())
        assert self.drain(spool) == list(range(25))

    def test_files_a_crash_left_in_incoming_are_adopted_on_the_next_start(self, tmp_path: Path) -> None:
        """Renamed into place means complete and fsync'd; a file still being written is not yet rows."""
        first = self.make(tmp_path / "spool")
        first.incoming.mkdir()
        (first.incoming / "helper-1.ndjson").write_bytes(b"".join(self.lines(0, 4)))
        (first.incoming / "helper-2.partial").write_bytes(b"".join(self.lines(4, 2))[:-3])
        first.close()
        second = self.make(tmp_path / "spool")
        assert self.drain(second) == [0, 1, 2, 3] and not list(second.incoming.iterdir())

    def test_drains_in_the_order_written(self, tmp_path: Path) -> None:
        spool = self.make(tmp_path, segment_bytes=100)
        for start in range(0, 50, 10):
            spool.append(Rows.of_lines(self.lines(start, 10)))
        assert self.drain(spool) == list(range(50)) and not spool.has_data()

    def test_survives_a_restart(self, tmp_path: Path) -> None:
        """Rows spooled by one process are drained by the next."""
        first = self.make(tmp_path)
        first.append(Rows.of_lines(self.lines(0, 20)))
        first.close()
        second = self.make(tmp_path)
        assert self.drain(second) == list(range(20))
        assert list(tmp_path.iterdir()) == []

    def test_bound_evicts_oldest_and_counts_the_rows(self, tmp_path: Path) -> None:
        spool = self.make(tmp_path, max_bytes=400, segment_bytes=100)
        evicted = sum(spool.append(Rows.of_lines(self.lines(n, 1))) for n in range(100))
        assert spool.total_bytes <= 400
        remaining = self.drain(spool)
        assert evicted + len(remaining) == 100 and evicted == spool.stats.rows_evicted > 0
        assert remaining == sorted(remaining) and remaining[-1] == 99

    def test_eviction_counts_the_rows_of_every_kind_of_segment(self, tmp_path: Path) -> None:
        """Segments left by an earlier process, adopted from the encoder process and written here
        are all evicted oldest first, each counted row for row as lost."""
        earlier = self.make(tmp_path, max_bytes=10_000, segment_bytes=100)
        earlier.append(Rows.of_lines(self.lines(0, 12)))
        earlier.close()
        spool = self.make(tmp_path, max_bytes=300, segment_bytes=100)
        spool.incoming.mkdir()
        evicted = 0
        for start in range(12, 60, 8):
            (spool.incoming / f"helper-{start}.ndjson").write_bytes(b"".join(self.lines(start, 8)))
            evicted += spool.adopt(spool.incoming / f"helper-{start}.ndjson", 8)
            frame = Rows()
            frame.add(b"".join(self.lines(start + 100, 3)), 3)
            evicted += spool.append(frame)
        remaining = self.drain(spool)
        assert spool.total_bytes == 0 and evicted == spool.stats.rows_evicted > 12
        assert evicted + len(remaining) == 12 + 6 * (8 + 3)

    def test_a_frame_of_rows_is_cut_to_keep_segments_and_the_bound(self, tmp_path: Path) -> None:
        """A frame from the encoder process larger than a segment is spread over segments row by
        row, so eviction still keeps the spool within its bound."""
        spool = self.make(tmp_path, max_bytes=400, segment_bytes=100)
        frame = Rows()
        frame.add(b"".join(self.lines(0, 60)), 60)
        evicted = spool.append(frame)
        assert spool.total_bytes <= 400
        assert all(path.stat().st_size <= 100 + 9 for path in tmp_path.iterdir())
        remaining = self.drain(spool)
        assert evicted + len(remaining) == 60 and remaining == list(range(60 - len(remaining), 60))

    def test_a_file_larger_than_the_bound_keeps_its_newest_rows(self, tmp_path: Path) -> None:
        """An encoder-process frame can outgrow a small bound by itself: it used to evict every
        older segment and then itself, keeping a tenth of what the bound allowed."""
        spool = self.make(tmp_path, max_bytes=300, segment_bytes=100)
        spool.append(Rows.of_lines(self.lines(0, 10)))
        spool.incoming.mkdir()
        (spool.incoming / "helper-1.ndjson").write_bytes(b"".join(self.lines(10, 60)))
        evicted = spool.adopt(spool.incoming / "helper-1.ndjson", 60)
        assert 250 < spool.total_bytes <= 300
        remaining = self.drain(spool)
        assert evicted + len(remaining) == 70 and remaining == list(range(70 - len(remaining), 70))

    def test_a_spool_larger_than_this_runs_bound_is_cut_at_start_and_counted(self, tmp_path: Path) -> None:
        earlier = self.make(tmp_path, max_bytes=10_000, segment_bytes=100)
        earlier.append(Rows.of_lines(self.lines(0, 60)))
        earlier.close()
        spool = Spool(tmp_path, max_bytes=300, segment_bytes=100)
        self.opened.append(spool)
        evicted = spool.open()
        remaining = self.drain(spool)
        assert evicted > 0 and evicted + len(remaining) == 60 and remaining[-1] == 59

    def test_a_full_disk_is_reported_with_the_rows_it_cost_and_leaves_no_torn_row(self, tmp_path: Path) -> None:
        """The kernel cuts the write short, then refuses the next, as it does when the disk fills."""
        spool = self.make(tmp_path, segment_bytes=100_000)
        spool.append(Rows.of_lines(self.lines(0, 5)))
        with disk_full_at(spool.total_bytes + 20), pytest.raises(SpoolUnwritable) as refused:
            spool.append(Rows.of_lines(self.lines(5, 10)))
        lost = refused.value.rows
        assert 0 < lost <= 10 and refused.value.error == "EFBIG"
        spool.append(Rows.of_lines(self.lines(15, 2)))  # room again: the spool goes on in a new segment
        # Every row is whole (drain parses each) and the count says exactly which never made it.
        assert self.drain(spool) == [*range(0, 15 - lost), 15, 16]

    def test_uncommitted_batch_is_read_again(self, tmp_path: Path) -> None:
        spool = self.make(tmp_path)
        spool.append(Rows.of_lines(self.lines(0, 3)))
        assert spool.read_batch(10, 10_000) == spool.read_batch(10, 10_000)

    def test_segments_are_fsynced_at_the_sync_not_one_by_one(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Under an outage the encoder process hands over a segment every frame; each is made
        durable by the forwarder's once-a-second sync (with the directory), not on adoption."""
        synced: list[int] = []
        monkeypatch.setattr("image_service.tracking.spool.os.fsync", synced.append)
        spool = self.make(tmp_path / "spool", segment_bytes=100)
        spool.incoming.mkdir()
        for n in range(10):
            (spool.incoming / f"helper-{n}.ndjson").write_bytes(b"".join(self.lines(10 * n, 5)))
            spool.adopt(spool.incoming / f"helper-{n}.ndjson", 5)
            spool.append(Rows.of_lines(self.lines(10 * n + 5, 5)))
        assert synced == [] and spool.needs_sync
        spool.sync()
        assert len(synced) == 10 + 10 + 1 and not spool.needs_sync
        assert self.drain(spool) == list(range(100))

    def test_a_segment_closed_by_a_write_after_a_sync_is_synced_too(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The spool is fsync'd at least once a second: a segment a write filled and closed right
        after a sync used to be left out of the next one."""
        spool = self.make(tmp_path, segment_bytes=100)
        spool.append(Rows.of_lines(self.lines(0, 2)))
        spool.sync()
        synced: list[int] = []
        monkeypatch.setattr("image_service.tracking.spool.os.fsync", synced.append)
        spool.append(Rows.of_lines(self.lines(2, 30)))  # fills the open segment, closes it, and more
        spool.sync()
        closed = len(list(tmp_path.glob("segment-*"))) - 1
        assert closed >= 2 and len(synced) == closed + 1 + 1  # every closed one, the open one, the directory

    def test_failed_spills_leave_no_empty_segments(self, tmp_path: Path) -> None:
        spool = self.make(tmp_path)
        with disk_full_at(0):
            for n in range(5):
                with pytest.raises(SpoolUnwritable):
                    spool.append(Rows.of_lines(self.lines(n, 1)))
        assert list(tmp_path.glob("segment-*")) == [] and not spool.has_data()

    def test_a_trim_with_no_room_evicts_the_segment_and_counts_it(self, tmp_path: Path) -> None:
        """Trimming writes the kept rows anew; without room for them the segment goes whole,
        counted, and nothing half-written stays behind (start-up must not fail on a full disk)."""
        earlier = self.make(tmp_path, max_bytes=10_000, segment_bytes=10_000)
        earlier.append(Rows.of_lines(self.lines(0, 60)))
        earlier.close()
        spool = Spool(tmp_path, max_bytes=300, segment_bytes=100)
        self.opened.append(spool)
        with disk_full_at(0):
            evicted = spool.open()
        assert evicted == 60 and list(tmp_path.iterdir()) == []

    def test_sync_makes_rows_durable_on_disk(self, tmp_path: Path) -> None:
        spool = self.make(tmp_path)
        spool.append(Rows.of_lines(self.lines(0, 5)))
        spool.sync()
        (segment,) = tmp_path.iterdir()
        assert segment.read_bytes().count(b"\n") == 5
