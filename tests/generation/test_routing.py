"""Routing: ordered fallback, circuit breakers on an injected clock, telemetry facts, upstream chaining."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import pytest
from aiohttp import web
from PIL import Image
from yarl import URL

from image_service.app import EXECUTOR, create_app
from image_service.errors import BackendUnavailable, GenerationError
from image_service.generation import Generator, build_backends
from image_service.generation.upstream import prompt_url
from image_service.generation.breaker import BreakerState, CircuitBreaker
from image_service.params import parse_params

from ..conftest import ClientFactory, make_settings
from ..test_pipeline_events import capture_logs
from .conftest import Serve, base_url, fast
from .servers import OpenAIImages

pytestmark = pytest.mark.usefixtures("no_key")


@pytest.fixture
def no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class TestCircuitBreaker:
    def test_opens_after_consecutive_failures_and_refuses_at_once(self) -> None:
        clock = Clock()
        breaker = CircuitBreaker(failures=2, reset_after=30, clock=clock)
        breaker.record_failure()
        assert breaker.allow()
        breaker.record_failure()
        assert breaker.state is BreakerState.OPEN and not breaker.allow()

    def test_a_success_resets_the_failure_count(self) -> None:
        breaker = CircuitBreaker(failures=2, reset_after=30, clock=Clock())
        breaker.record_failure()
        breaker.record_success()
        breaker.record_failure()
        assert breaker.state is BreakerState.CLOSED

    def test_after_the_reset_time_one_trial_passes_and_its_outcome_decides(self) -> None:
        clock = Clock()
        breaker = CircuitBreaker(failures=1, reset_after=30, clock=clock)
        breaker.record_failure()
        clock.now += 30
        assert breaker.allow() and not breaker.allow()  # one trial only
        breaker.record_failure()
        assert breaker.state is BreakerState.OPEN and not breaker.allow()
        clock.now += 30
        assert breaker.allow()
        breaker.record_success()
        assert breaker.state is BreakerState.CLOSED and breaker.allow()

    def test_bad_options_fail_in_the_constructor(self) -> None:
        with pytest.raises(ValueError, match="failures"):
            CircuitBreaker(failures=0, reset_after=1)


def chain_settings(openai_url: str, upstream_url: str, **model: Any) -> Any:
    return make_settings(
        backends={
            "openai": fast(type="openai", base_url=openai_url, breaker_failures=2, breaker_reset=30),
            "mirror": fast(type="pollinations", base_url=upstream_url),
        },
        models={"chain": {"backend": "openai", "fallback": ["mirror", "embedded"], "max_side": 1024,
                          "default_side": 64, "cost": 0.04, **model}},
    )


class TestFallback:
    async def test_backends_are_tried_in_order_until_one_succeeds(
        self, serve: Serve, aiohttp_server: Any, make_client: ClientFactory
    ) -> None:
        """openai fails (500), the upstream fails (500), embedded serves; telemetry names embedded."""
        openai = OpenAIImages(mode="error500")
        hits: list[str] = []

        async def upstream(request: web.Request) -> web.Response:
            hits.append(f"mirror after {len(openai.requests)} openai call(s)")
            return web.json_response({"error": "down"}, status=500)

        upstream_app = web.Application()
        upstream_app.router.add_get("/prompt/{prompt:.*}", upstream)
        settings = chain_settings(base_url(await serve(openai)), base_url(await aiohttp_server(upstream_app)))
        client = await make_client(settings)
        with capture_logs() as logs:
            response = await client.get("/prompt/fox?model=chain&width=64&height=48")
        assert response.status == 200
        assert hits == ["mirror after 1 openai call(s)"]
        (terminal,) = [e for e in logs if e["event"] == "request.completed"]
        assert (terminal["backend"], terminal["provider"], terminal["cost"]) == ("embedded", "image_service", 0.04)
        failures = (await (await client.get("/health")).json())["generation"]
        assert failures["openai"]["failures"] == {"http_status": 1} and failures["mirror"]["failures"] == {"http_status": 1}

    async def test_last_failure_decides_the_status_when_all_fail(self, serve: Serve, make_client: ClientFactory) -> None:
        """A chain ending in a hang answers 504; ending in a 500 answers 502."""
        hang, fail = OpenAIImages(mode="hang"), OpenAIImages(mode="error500")
        hang_url, fail_url = base_url(await serve(hang)), base_url(await serve(fail))
        settings = make_settings(
            backends={"a": fast(type="openai", base_url=fail_url), "b": fast(type="openai", base_url=hang_url, timeout=0.3)},
            models={"ab": {"backend": "a", "fallback": ["b"], "default_side": 32},
                    "ba": {"backend": "b", "fallback": ["a"], "default_side": 32}},
        )
        client = await make_client(settings)
        assert (await client.get("/prompt/x?model=ab")).status == 504
        assert (await client.get("/prompt/x?model=ba")).status == 502


class TestBreakerInTheGenerator:
    async def test_open_breaker_skips_the_dead_backend_without_calling_it_and_recovers(
        self, serve: Serve, aiohttp_client: Any
    ) -> None:
        """Two failures open it; while open the server sees no request (503); after the reset a trial succeeds."""
        fake = OpenAIImages(mode="error500")
        settings = make_settings(
            backends={"openai": fast(type="openai", base_url=base_url(await serve(fake)), breaker_failures=2,
                                     breaker_reset=30)},
            models={"dalle": {"backend": "openai", "default_side": 32}},
        )
        app = create_app(settings)
        await aiohttp_client(app)  # start-up builds the executor
        clock = Clock()
        generator = Generator(settings, build_backends(settings, app[EXECUTOR]), clock=clock)
        params = parse_params("fox", {"model": "dalle"}, settings.models, "procedural", 100)
        try:
            for _ in range(2):
                with pytest.raises(GenerationError, match="HTTP 500"):
                    await generator.generate(params)
            with pytest.raises(BackendUnavailable):
                await generator.generate(params)
            assert len(fake.requests) == 2 and generator.stats()["openai"]["breaker"] == "open"
            fake.mode = "ok"
            clock.now += 31
            assert (await generator.generate(params)).image.size == (32, 32)
            assert len(fake.requests) == 3 and generator.stats()["openai"]["breaker"] == "closed"
        finally:
            await generator.close()


    async def test_a_request_the_backend_refuses_does_not_open_its_breaker(
        self, serve: Serve, make_client: ClientFactory
    ) -> None:
        """One client's refused prompts (a content policy's 400) must not cut the backend off for everyone."""
        fake = OpenAIImages(mode="refused")
        settings = make_settings(
            backends={"openai": fast(type="openai", base_url=base_url(await serve(fake)), breaker_failures=2)},
            models={"dalle": {"backend": "openai", "default_side": 32}},
        )
        client = await make_client(settings)
        for seed in range(4):
            refused = await client.get(f"/prompt/forbidden?model=dalle&seed={seed}")
            assert refused.status == 502 and "refused this request (HTTP 400)" in (await refused.json())["message"]
        fake.mode = "ok"
        assert (await client.get("/prompt/innocent?model=dalle")).status == 200
        health = (await (await client.get("/health")).json())["generation"]["openai"]
        assert health["breaker"] == "closed" and health["failures"] == {"refused": 4}


class TestTelemetry:
    async def test_backend_provider_and_cost_reach_the_terminal_event_on_miss_and_hit(
        self, serve: Serve, make_client: ClientFactory
    ) -> None:
        """A miss costs the model's price; a hit replays backend and provider from the cache and costs 0."""
        fake = OpenAIImages()
        settings = make_settings(
            backends={"openai": fast(type="openai", base_url=base_url(await serve(fake)), provider="azure")},
            models={"dalle": {"backend": "openai", "default_side": 32, "cost": 0.04}},
        )
        client = await make_client(settings)
        with capture_logs() as logs:
            await client.get("/prompt/fox?model=dalle")
            await client.get("/prompt/fox?model=dalle")
        miss, hit = [e for e in logs if e["event"] == "request.completed"]
        (generated,) = [e for e in logs if e["event"] == "generation.completed"]
        assert (miss["backend"], miss["provider"], miss["cost"], miss["cache_status"]) == ("openai", "azure", 0.04, "miss")
        assert (hit["backend"], hit["provider"], hit["cost"], hit["cache_status"]) == ("openai", "azure", 0.0, "hit")
        assert generated["duration_ms"] <= miss["duration_ms"] and generated["backend"] == "openai"


class TestUpstreamChaining:
    async def test_another_instance_of_this_service_serves_as_upstream(
        self, aiohttp_server: Any, make_client: ClientFactory
    ) -> None:
        """The prompt (slashes included) and size reach the upstream, whose image is served."""
        upstream_app = create_app(make_settings())
        upstream = await aiohttp_server(upstream_app)
        settings = make_settings(
            backends={"mirror": fast(type="pollinations", base_url=base_url(upstream))},
            models={"remote": {"backend": "mirror", "backend_model": "procedural", "default_side": 64}},
        )
        client = await make_client(settings)
        with capture_logs() as logs:
            response = await client.get("/prompt/a/b%20c?model=remote&width=64&height=40&seed=3")
        assert response.status == 200
        assert Image.open(io.BytesIO(await response.read())).size == (64, 40)
        upstream_events = [e for e in logs if e.get("event") == "request.received" and e.get("model") == "procedural"]
        assert [(e["prompt"], e["width"], e["height"], e["seed"], e["nologo"]) for e in upstream_events] == [
            ("a/b c", 64, 40, 3, True)
        ]

    @pytest.mark.parametrize(("base", "prompt", "url"), [
        ("http://up.example:8080", "a/b c", "http://up.example:8080/prompt/a%2Fb%20c"),
        ("http://up.example/", "..", "http://up.example/prompt/%2E%2E"),
        ("https://bücher.example/api", ".", "https://xn--bcher-kva.example/api/prompt/%2E"),
    ])
    def test_the_upstream_url_holds_the_prompt_whole(self, base: str, prompt: str, url: str) -> None:
        """Slashes escaped, dot segments kept, an international host sent as IDNA."""
        assert str(prompt_url(URL(base), prompt)) == url

    async def test_a_dot_segment_prompt_reaches_the_upstream_as_itself(
        self, aiohttp_server: Any, make_client: ClientFactory
    ) -> None:
        """'..' in a URL path resolves away: the upstream was asked for '/' (404), the request failed,
        and each such request counted against the breaker."""
        upstream = await aiohttp_server(create_app(make_settings()))
        settings = make_settings(
            backends={"mirror": fast(type="pollinations", base_url=base_url(upstream))},
            models={"remote": {"backend": "mirror", "backend_model": "procedural", "default_side": 32}},
        )
        client = await make_client(settings)
        with capture_logs() as logs:
            for prompt in ("..", "."):  # sent as is: an HTTP client library would resolve them too
                reader, writer = await asyncio.open_connection(client.host, client.port)
                writer.write(f"GET /prompt/{prompt}?model=remote HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
                status_line = (await reader.read()).split(b"\r\n", 1)[0]
                writer.close()
                assert status_line.split()[1] == b"200", status_line
        upstream_prompts = [e["prompt"] for e in logs if e.get("event") == "request.received" and e.get("model") == "procedural"]
        assert upstream_prompts == ["..", "."]

    @pytest.mark.parametrize(("content_type", "reason"), [("text/html", "not_image"), ("image/jpeg", "not_image")])
    async def test_non_image_answers_are_rejected(
        self, aiohttp_server: Any, make_client: ClientFactory, content_type: str, reason: str
    ) -> None:
        async def answer(request: web.Request) -> web.Response:
            return web.Response(body=b"<html>hi</html>", content_type=content_type)

        app = web.Application()
        app.router.add_get("/prompt/{prompt:.*}", answer)
        upstream = await aiohttp_server(app)
        settings = make_settings(
            backends={"mirror": fast(type="pollinations", base_url=base_url(upstream))},
            models={"remote": {"backend": "mirror", "default_side": 32}},
        )
        client = await make_client(settings)
        response = await client.get("/prompt/x?model=remote")
        assert response.status == 502 and "not" in (await response.json())["message"]
        health = await (await client.get("/health")).json()
        assert health["generation"]["mirror"]["failures"] == {reason: 1}


class TestDeadline:
    async def test_a_hung_primary_leaves_time_for_the_fallback_and_opens_its_breaker(
        self, serve: Serve, make_client: ClientFactory
    ) -> None:
        """The primary retries inside itself past the deadline; the fallback still answers in time,
        and the silent primary counts as failing, so the next requests skip it at once."""
        hang = OpenAIImages(mode="hang")
        settings = make_settings(
            backends={"gpu": fast(type="openai", base_url=base_url(await serve(hang)), timeout=5.0, breaker_failures=2)},
            models={"flux": {"backend": "gpu", "fallback": ["embedded"], "default_side": 32}},
            generation={"timeout": 1.0, "fallback_reserve": 0.5},
        )
        client = await make_client(settings)
        for seed in range(2):
            assert (await client.get(f"/prompt/fox?model=flux&seed={seed}")).status == 200
        health = (await (await client.get("/health")).json())["generation"]["gpu"]
        assert health == {"provider": health["provider"], "breaker": "open", "failures": {"timeout": 2}}
        assert (await client.get("/prompt/fox?model=flux&seed=3")).status == 200
        assert len(hang.requests) == 2

    async def test_a_hung_backend_without_fallback_answers_504_and_counts_the_timeout(
        self, serve: Serve, make_client: ClientFactory
    ) -> None:
        hang = OpenAIImages(mode="hang")
        settings = make_settings(
            backends={"gpu": fast(type="openai", base_url=base_url(await serve(hang)), timeout=5.0)},
            models={"flux": {"backend": "gpu", "default_side": 32}},
            generation={"timeout": 0.5},
        )
        client = await make_client(settings)
        response = await client.get("/prompt/fox?model=flux")
        assert response.status == 504 and "within 0.5 s" in (await response.json())["message"]
        assert (await (await client.get("/health")).json())["generation"]["gpu"]["failures"] == {"timeout": 1}

    async def test_after_a_hung_primary_every_fallback_gets_its_turn(
        self, serve: Serve, make_client: ClientFactory
    ) -> None:
        """A chain of three: the primary hangs until only the reserve is left; the second backend
        is still tried (it was skipped, unrecorded, and the third one answered)."""
        hang, healthy = OpenAIImages(mode="hang"), OpenAIImages()
        settings = make_settings(
            backends={"a": fast(type="openai", base_url=base_url(await serve(hang)), timeout=5.0),
                      "b": fast(type="openai", base_url=base_url(await serve(healthy)), timeout=5.0)},
            models={"abc": {"backend": "a", "fallback": ["b", "embedded"], "default_side": 32}},
            generation={"timeout": 1.0, "fallback_reserve": 0.5},
        )
        client = await make_client(settings)
        with capture_logs() as logs:
            assert (await client.get("/prompt/fox?model=abc")).status == 200
        (terminal,) = [e for e in logs if e["event"] == "request.completed"]
        assert terminal["backend"] == "b" and len(healthy.requests) == 1
