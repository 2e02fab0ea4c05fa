"""Each pipeline stage emits one structured event bound to the request."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from structlog.testing import capture_logs as _capture_logs
from structlog.typing import EventDict

from image_service.tracking.context import merge_request_context



@contextmanager
def capture_logs() -> Iterator[list[EventDict]]:
    """Capture events with the request context merged in, as the real processor chain does."""
    with _capture_logs(processors=[merge_request_context]) as logs:
        yield logs


FOX = "/prompt/a%20red%20fox?width=128&height=96&seed=7"


async def test_a_miss_emits_one_event_per_stage_with_request_id_and_duration(client) -> None:
    with capture_logs() as logs:
        response = await client.get(FOX)
    request_id = response.headers["X-Request-Id"]
    mine = [e for e in logs if e.get("request_id") == request_id]
    assert [e["event"] for e in mine] == [
        "request.received", "cache.lookup", "generation.completed", "moderation.verdict", "request.completed",
    ]
    assert [e["stage"] for e in mine] == ["request", "cache", "generation", "moderation", "response"]
    assert all(e["duration_ms"] >= 0 for e in mine)
    assert mine[-1]["status"] == 200 and mine[-1]["cache_status"] == "miss"
    assert mine[-1]["cache_backend"] == "memory"


async def test_a_hit_skips_generation_and_moderation(client) -> None:
    await client.get(FOX)
    with capture_logs() as logs:
        response = await client.get(FOX)
    mine = [e for e in logs if e.get("request_id") == response.headers["X-Request-Id"]]
    assert [e["event"] for e in mine] == ["request.received", "cache.lookup", "request.completed"]
    assert mine[-1]["cache_status"] == "hit"


async def test_rejected_request_still_emits_the_terminal_event(client) -> None:
    with capture_logs() as logs:
        await client.get("/prompt/x?model=nope")
    (terminal,) = [e for e in logs if e["event"] == "request.completed"]
    assert terminal["status"] == 400 and terminal["error"] == "unknown_model"


async def test_private_prompt_never_reaches_the_logs(client) -> None:
    """Neither the prompt field, the route nor any other field carries a private prompt."""
    with capture_logs() as logs:
        await client.get("/prompt/my%20hidden%20idea?private=true&width=32&height=32")
        await client.get("/prompt/my%20hidden%20idea?private=true&width=wide")
    assert logs and "hidden" not in repr(logs)
