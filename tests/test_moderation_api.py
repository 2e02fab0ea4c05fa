"""Moderation through the HTTP surface: refusals as JSON, the policy on hits, telemetry fields, blocks."""

from __future__ import annotations

import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import orjson
import pytest
from PIL import Image

from image_service.config import load_settings
from image_service.moderation import ClassifierModerator, Classifiers, Detection, Face, Findings, Thresholds

from .conftest import ClientFactory, CountingBackend, make_settings
from .test_pipeline_events import capture_logs

THRESHOLDS = Thresholds.from_settings(load_settings().moderation)
NUDE = Detection("FEMALE_BREAST_EXPOSED", 0.9, (4, 4, 20, 20))
FACE = Detection("FACE_FEMALE", 0.9, (30, 4, 20, 20))


class InjectedAnalyser:
    """Reports fixed detector results, so the policy can be driven through the real app."""

    def __init__(self, mature: bool = False, child: bool = False) -> None:
        faces = (Face(FACE.box, FACE.score, minor_probability=0.95 if child else 0.02, age=8 if child else 30),)
        self.findings = Findings(detections=((NUDE,) if mature else ()) + (FACE,), faces=faces, models={"test": "1"})
        self.calls = 0

    def analyse(self, image: Image.Image) -> Findings:
        self.calls += 1
        return self.findings


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=2) as executor:
        yield executor


def moderator(pool: ThreadPoolExecutor, **flags: bool) -> ClassifierModerator:
    return ClassifierModerator(InjectedAnalyser(**flags), THRESHOLDS, pool)




def pixels(body: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(body)).convert("RGB"), dtype=np.int16)


class TestPromptRefusals:
    async def test_blocked_prompt_answers_451_without_calling_the_backend(
        self, make_client: ClientFactory, backend: CountingBackend
    ) -> None:
        client = await make_client(backends={"embedded": backend})
        response = await client.get("/prompt/n4k3d%20k1d?width=64&height=64")
        assert response.status == 451
        body = await response.json()
        assert body["error"] == "content_blocked" and body["reason"] == "sexual_minor_prompt"
        assert body["requestId"] == response.headers["X-Request-Id"] and "Traceback" not in str(body)
        assert backend.calls == 0

    async def test_sexual_prompt_with_safe_is_refused_before_generation(
        self, make_client: ClientFactory, backend: CountingBackend
    ) -> None:
        client = await make_client(backends={"embedded": backend})
        refused = await client.get("/prompt/a%20nude%20statue?width=64&height=64&safe=true")
        served = await client.get("/prompt/a%20nude%20statue?width=64&height=64")
        assert (refused.status, served.status) == (451, 200)
        assert (await refused.json())["reason"] == "sexual_prompt_safe" and backend.calls == 1
        for query in ("safe=false&safe=true", "Safe=true"):  # safe fails closed, a cache hit too
            assert (await client.get(f"/prompt/a%20nude%20statue?width=64&height=64&{query}")).status == 451

    async def test_refusal_emits_verdict_and_flag_events_and_binds_the_booleans(self, client) -> None:
        with capture_logs() as logs:
            await client.get("/prompt/naked%20child?width=64&height=64")
        events = [e["event"] for e in logs]
        assert events == ["request.received", "moderation.verdict", "content.flagged", "request.completed"]
        flagged = logs[2]
        assert flagged["stage"] == "moderation" and flagged["action"] == "refused"
        assert logs[1]["categories"] == {"sexual": True, "sexual/minors": True}


class TestImagePolicy:
    async def test_safe_mature_image_is_refused_and_also_on_a_cache_hit(
        self, make_client: ClientFactory, backend: CountingBackend, pool: ThreadPoolExecutor
    ) -> None:
        """`safe` is not in the cache key: the replayed verdict is judged again for each request."""
        client = await make_client(backends={"embedded": backend}, moderator=moderator(pool, mature=True))
        first = await client.get("/prompt/beach?width=64&height=64&safe=true")
        assert first.status == 451 and (await first.json())["reason"] == "mature_image_safe"
        served = await client.get("/prompt/beach?width=64&height=64")
        assert served.status == 200 and served.headers["X-Cache"] == "HIT"
        again = await client.get("/prompt/beach?width=64&height=64&safe=true")
        assert again.status == 451 and backend.calls == 1

    async def test_mature_image_is_served_without_logo_and_unlisted(
        self, make_client: ClientFactory, pool: ThreadPoolExecutor
    ) -> None:
        mature = await make_client(moderator=moderator(pool, mature=True))
        clean = await make_client(moderator=moderator(pool))
        with capture_logs() as logs:
            served = await mature.get("/prompt/beach?width=256&height=256")
        logo = await clean.get("/prompt/beach?width=256&height=256")
        nologo = await clean.get("/prompt/beach?width=256&height=256&nologo=true")
        served_px = pixels(await served.read())
        assert np.abs(served_px - pixels(await nologo.read())).max() <= 8  # same pixels up to JPEG noise
        assert np.abs(served_px - pixels(await logo.read())).max() > 64  # the logo is missing
        (terminal,) = [e for e in logs if e["event"] == "request.completed"]
        flagged = [e for e in logs if e["event"] == "content.flagged"]
        assert terminal["is_mature"] is True and terminal["nofeed"] is True
        assert flagged and flagged[0]["action"] == "served_unlisted"

    async def test_mature_child_image_is_never_served_and_cached_only_as_a_refusal(
        self, make_client: ClientFactory, backend: CountingBackend, pool: ThreadPoolExecutor
    ) -> None:
        client = await make_client(backends={"embedded": backend}, moderator=moderator(pool, mature=True, child=True))
        first = await client.get("/prompt/beach?width=64&height=64")
        second = await client.get("/prompt/beach?width=64&height=64")
        assert (first.status, second.status) == (451, 451)
        assert (await second.json())["reason"] == "sexual_minor_image"
        assert backend.calls == 1  # the refusal was cached: no second generation
        assert first.content_type == second.content_type == "application/json"

    async def test_child_only_image_is_served_with_its_logo(
        self, make_client: ClientFactory, pool: ThreadPoolExecutor
    ) -> None:
        """A child in a clean image is ordinary (a family photo): served, flagged for telemetry only."""
        child = await make_client(moderator=moderator(pool, child=True))
        clean = await make_client(moderator=moderator(pool))
        with capture_logs() as logs:
            served = await child.get("/prompt/park?width=256&height=256")
        expected = await clean.get("/prompt/park?width=256&height=256")
        assert served.status == 200 and await served.read() == await expected.read()
        (terminal,) = [e for e in logs if e["event"] == "request.completed"]
        assert terminal["is_child"] is True and terminal["is_mature"] is False

    async def test_terminal_event_carries_the_booleans_on_hits_too(self, client) -> None:
        await client.get("/prompt/fox?width=64&height=64")
        with capture_logs() as logs:
            await client.get("/prompt/fox?width=64&height=64")
        (terminal,) = [e for e in logs if e["event"] == "request.completed"]
        assert terminal["cache_status"] == "hit" and terminal["is_mature"] is False and terminal["is_child"] is False


class TestRealClassifiers:
    async def test_real_models_moderate_every_generated_image(
        self, make_client: ClientFactory, classifiers: Classifiers, pool: ThreadPoolExecutor
    ) -> None:
        """The procedural renderer's abstract art passes NudeNet; the verdict names both models."""
        client = await make_client(moderator=ClassifierModerator(classifiers, THRESHOLDS, pool))
        with capture_logs() as logs:
            response = await client.get("/prompt/a%20red%20fox?width=256&height=256")
        assert response.status == 200
        (verdict,) = [e for e in logs if e["event"] == "moderation.verdict"]
        assert set(verdict["models"]) == {"nudenet", "age"} and verdict["duration_ms"] > 0


class TestClientBlock:
    async def test_repeated_violations_block_the_client_with_429(self, make_client: ClientFactory) -> None:
        client = await make_client(make_settings(moderation={"image": "none", "violation_threshold": 2}))
        statuses = [(await client.get(f"/prompt/naked%20child%20{i}")).status for i in range(2)]
        blocked = await client.get("/prompt/a%20red%20fox?width=32&height=32")
        assert statuses == [451, 451] and blocked.status == 429
        body = await blocked.json()
        assert body["error"] == "client_blocked" and int(blocked.headers["Retry-After"]) == body["retryAfter"] > 0

    async def test_client_address_never_reaches_the_logs(self, make_client: ClientFactory) -> None:
        client = await make_client(make_settings(moderation={"image": "none", "violation_threshold": 1}))
        with capture_logs() as logs:
            await client.get("/prompt/naked%20child")
            await client.get("/prompt/fox")
        assert any(e["event"] == "moderation.client_blocked" for e in logs)
        assert "127.0.0.1" not in orjson.dumps(logs, default=str).decode()
