"""Tiers and queues: caps, intervals, depth, 429s, idle clean-up, the model gate and trusted proxies."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from image_service.config import TierSettings
from image_service.errors import TooManyRequests
from image_service.generation import GeneratedImage
from image_service.identity import token_digest
from image_service.limits import InMemoryLimiter
from image_service.moderation import PassThroughModerator, Verdict
from image_service.params import ImageParams
from image_service.queues import ManualClock, MemoryLimiter
from image_service.testing import RedisServer

from .conftest import ClientFactory, CountingBackend, make_settings, redis_settings
from .test_pipeline_events import capture_logs


def limits(concurrency: int, interval: float, depth: int) -> TierSettings:
    return TierSettings(concurrency=concurrency, interval=interval, queue_depth=depth)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


class TestMemoryLimiter:
    async def test_concurrency_cap_holds_the_next_request_until_a_release(self) -> None:
        limiter = MemoryLimiter(ManualClock())
        tier = limits(2, 0, 5)
        await limiter.acquire("a", "seed", tier)
        await limiter.acquire("a", "seed", tier)
        third = asyncio.ensure_future(limiter.acquire("a", "seed", tier))
        await settle()
        assert not third.done()
        await limiter.release("a")
        await settle()
        assert third.done()

    async def test_interval_spaces_starts_on_the_clock(self) -> None:
        """With a free slot, the next start still waits for the interval; nothing sleeps for real."""
        clock = ManualClock()
        limiter = MemoryLimiter(clock)
        tier = limits(3, 10.0, 5)
        await limiter.acquire("a", "seed", tier)
        second = asyncio.ensure_future(limiter.acquire("a", "seed", tier))
        await clock.advance(9.9)
        assert not second.done()
        await clock.advance(0.1)
        assert second.done()

    async def test_clients_do_not_wait_for_each_other(self) -> None:
        limiter = MemoryLimiter(ManualClock())
        tier = limits(1, 60.0, 1)
        await limiter.acquire("a", "anonymous", tier)
        await asyncio.wait_for(limiter.acquire("b", "anonymous", tier), 1)

    async def test_waiters_are_served_in_arrival_order(self) -> None:
        clock = ManualClock()
        limiter = MemoryLimiter(clock)
        tier = limits(1, 0, 10)
        order: list[int] = []
        await limiter.acquire("a", "seed", tier)

        async def take(index: int) -> None:
            await limiter.acquire("a", "seed", tier)
            order.append(index)

        tasks = [asyncio.ensure_future(take(i)) for i in range(4)]
        await settle()
        for _ in range(4):
            await limiter.release("a")
            await settle()
        await asyncio.gather(*tasks)
        assert order == [0, 1, 2, 3]

    async def test_full_queue_refuses_with_retry_after_and_queue_info(self) -> None:
        clock = ManualClock()
        limiter = MemoryLimiter(clock)
        tier = limits(1, 5.0, 2)
        await limiter.acquire("a", "anonymous", tier)
        waiting = asyncio.ensure_future(limiter.acquire("a", "anonymous", tier))
        await settle()
        with pytest.raises(TooManyRequests) as refused:
            await limiter.acquire("a", "anonymous", tier)
        assert refused.value.retry_after >= 5
        assert refused.value.headers() == {"Retry-After": str(refused.value.retry_after)}
        info = refused.value.details["queueInfo"]
        assert (info["running"], info["queued"], info["queueDepth"], info["tier"]) == (1, 1, 2, "anonymous")
        waiting.cancel()

    async def test_cancelled_waiter_leaves_the_queue(self) -> None:
        """A client that gives up frees its place: the queue is not full any more."""
        limiter = MemoryLimiter(ManualClock())
        tier = limits(1, 0, 2)
        await limiter.acquire("a", "seed", tier)
        waiting = asyncio.ensure_future(limiter.acquire("a", "seed", tier))
        await settle()
        waiting.cancel()
        await settle()
        again = asyncio.ensure_future(limiter.acquire("a", "seed", tier))
        await settle()
        await limiter.release("a")
        await settle()
        assert again.done() and again.exception() is None

    async def test_idle_queues_are_forgotten(self) -> None:
        """Thousands of one-off clients leave no state behind once their interval has passed."""
        clock = ManualClock()
        limiter = MemoryLimiter(clock)
        tier = limits(1, 5.0, 5)
        for index in range(5000):
            await limiter.acquire(f"client-{index}", "anonymous", tier)
            await limiter.release(f"client-{index}")
        assert limiter.tracked_keys == 5000  # each interval is still running: it must be remembered
        await clock.advance(5)
        await limiter.acquire("late", "anonymous", limits(1, 0, 5))
        await limiter.release("late")
        assert limiter.tracked_keys == 0


TOKEN = "tok-flower-abcdef"
SLOW = "/prompt/slow?width=32&height=32"


def tiers(**anonymous: Any) -> dict[str, Any]:
    return {"anonymous": {"concurrency": 1, "interval": 0.0, "queue_depth": 1, **anonymous}}


class TestHttpQueues:
    async def test_full_queue_is_429_json_with_retry_after(
        self, make_client: ClientFactory, backend: CountingBackend
    ) -> None:
        """While a client's generation runs, its next one is refused with queueInfo, and the refusal is logged."""
        client = await make_client(make_settings(tiers=tiers(interval=3.0)), backends={"embedded": backend})
        backend.gate.clear()
        first = asyncio.ensure_future(client.get(SLOW))
        while backend.calls == 0:
            await asyncio.sleep(0.01)
        with capture_logs() as logs:
            response = await client.get("/prompt/other?width=32&height=32")
            body = await response.json()
        assert response.status == 429 and body["error"] == "too_many_requests"
        assert int(response.headers["Retry-After"]) >= 3
        assert body["queueInfo"]["queueDepth"] == 1 and body["queueInfo"]["running"] == 1
        assert {"requestId", "requestParameters", "message"} <= body.keys()
        (event,) = [e for e in logs if e["event"] == "request.completed"]
        assert (event["status"], event["error"], event["tier"]) == (429, "too_many_requests", "anonymous")
        backend.gate.set()
        assert (await first).status == 200

    async def test_cache_hits_and_shared_generations_are_not_queued(
        self, make_client: ClientFactory, backend: CountingBackend
    ) -> None:
        """Only generations take a slot: a hit or a request joining an identical one is served."""
        client = await make_client(make_settings(tiers=tiers()), backends={"embedded": backend})
        backend.gate.clear()
        requests = [asyncio.ensure_future(client.get(SLOW)) for _ in range(3)]
        while backend.calls == 0:
            await asyncio.sleep(0.01)
        backend.gate.set()
        assert [r.status for r in await asyncio.gather(*requests)] == [200] * 3
        assert (await client.get(SLOW)).status == 200

    async def test_interval_delays_the_next_generation(
        self, make_client: ClientFactory, backend: CountingBackend
    ) -> None:
        """An anonymous client's second image waits for the interval on the app's clock."""
        clock = ManualClock()
        client = await make_client(
            make_settings(tiers=tiers(interval=30.0, queue_depth=3)), backends={"embedded": backend}, clock=clock)
        assert (await client.get("/prompt/one?width=32&height=32")).status == 200
        second = asyncio.ensure_future(client.get("/prompt/two?width=32&height=32"))
        await asyncio.sleep(0.2)
        assert not second.done() and backend.calls == 1
        await clock.advance(30)
        assert (await asyncio.wait_for(second, 5)).status == 200

    async def test_tokens_get_their_own_queue_and_tier(
        self, make_client: ClientFactory, backend: CountingBackend, tmp_path: Path
    ) -> None:
        """A paying user is not queued behind the anonymous limits of the address it shares."""
        tokens = tmp_path / "tokens.toml"
        tokens.write_text(f'[tokens]\n"{token_digest(TOKEN)}" = {{ user_id = "u-1", username = "a", tier = "flower" }}\n')
        flower = {"concurrency": 6, "interval": 0.0, "queue_depth": 30}
        settings = make_settings(tiers={**tiers(), "flower": flower}, access={"tokens_file": str(tokens)})
        client = await make_client(settings, backends={"embedded": backend})
        backend.gate.clear()
        first = asyncio.ensure_future(client.get(SLOW))
        while backend.calls == 0:
            await asyncio.sleep(0.01)
        paid = [asyncio.ensure_future(client.get(f"/prompt/paid{i}?width=32&height=32&token={TOKEN}")) for i in range(3)]
        while backend.calls < 4:
            await asyncio.sleep(0.01)
        backend.gate.set()
        assert [r.status for r in await asyncio.gather(first, *paid)] == [200] * 4

    async def test_spoofed_forwarded_for_from_untrusted_peer_shares_the_queue(
        self, make_client: ClientFactory, backend: CountingBackend
    ) -> None:
        """Rotating X-Forwarded-For does not buy a fresh queue unless the peer is a trusted proxy."""
        for trusted, expected in (((), 429), (("127.0.0.1",), 200)):
            backend = CountingBackend()
            settings = make_settings(tiers=tiers(), access={"trusted_proxies": list(trusted)})
            client = await make_client(settings, backends={"embedded": backend})
            first = await held_generation(client, backend, "198.51.100.1")
            second = asyncio.ensure_future(
                client.get("/prompt/b?width=32&height=32", headers={"X-Forwarded-For": "198.51.100.2"}))
            await asyncio.sleep(0.1)
            backend.gate.set()
            assert (await first).status == 200
            assert (await second).status == expected

    async def test_generations_over_every_client_stay_within_the_global_cap(self, make_client: ClientFactory) -> None:
        """Distinct clients each pass their own queue; the service as a whole still makes only
        generation.max_concurrent images at once (each holds its pixels until encoded)."""
        backend = CountingBackend()
        settings = make_settings(tiers=tiers(), access={"trusted_proxies": ["127.0.0.1"]},
                                 generation={"max_concurrent": 2})
        client = await make_client(settings, backends={"embedded": backend})
        backend.gate.clear()
        requests = [asyncio.ensure_future(client.get(f"/prompt/c{n}?width=32&height=32",
                                                     headers={"X-Forwarded-For": f"198.51.100.{n}"}))
                    for n in range(5)]
        while backend.calls < 2:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        assert backend.calls == 2
        backend.gate.set()
        assert [(await r).status for r in requests] == [200] * 5 and backend.calls == 5

    async def test_a_wait_for_a_generation_permit_ends_with_503(self, make_client: ClientFactory) -> None:
        """The wait runs inside the client's start slot, whose lifetime allows for generation.timeout
        of it: it must not wait longer."""
        moderator = HeldModerator()
        settings = make_settings(tiers=tiers(), access={"trusted_proxies": ["127.0.0.1"]},
                                 generation={"max_concurrent": 1, "timeout": 0.5})
        client = await make_client(settings, moderator=moderator)
        first = asyncio.ensure_future(client.get(SLOW, headers={"X-Forwarded-For": "198.51.100.1"}))
        await moderator.entered.wait()  # the first image holds the one permit, past generation.timeout
        second = await client.get("/prompt/other?width=32&height=32", headers={"X-Forwarded-For": "198.51.100.2"})
        assert second.status == 503 and "making 1 images already" in (await second.json())["message"]
        moderator.release.set()
        assert (await first).status == 200

    async def test_ipv6_addresses_of_one_network_share_a_queue(self, make_client: ClientFactory) -> None:
        """A subscriber holds a whole /64: stepping to the next address in it buys no fresh queue."""
        backend = CountingBackend()
        settings = make_settings(tiers=tiers(), access={"trusted_proxies": ["127.0.0.1"]})
        client = await make_client(settings, backends={"embedded": backend})
        first = await held_generation(client, backend, "2001:db8:1:2::1")
        same_network = asyncio.ensure_future(
            client.get("/prompt/b?width=32&height=32", headers={"X-Forwarded-For": "2001:db8:1:2:ffff::9"}))
        other_network = asyncio.ensure_future(
            client.get("/prompt/c?width=32&height=32", headers={"X-Forwarded-For": "2001:db8:1:3::1"}))
        while backend.calls < 2:
            await asyncio.sleep(0.01)
        backend.gate.set()
        assert [(await task).status for task in (first, same_network, other_network)] == [200, 429, 200]


class HeldModerator(PassThroughModerator):
    """Holds every image at moderation until released: its generation permit stays taken."""

    def __init__(self) -> None:
        self.entered, self.release = asyncio.Event(), asyncio.Event()

    async def check_image(self, generated: GeneratedImage, params: ImageParams) -> Verdict:
        self.entered.set()
        await self.release.wait()
        return await super().check_image(generated, params)


async def held_generation(client: Any, backend: CountingBackend, forwarded: str) -> asyncio.Future[Any]:
    """A generation for the client at `forwarded`, held at the backend's gate once it has started."""
    backend.gate.clear()
    first = asyncio.ensure_future(client.get(SLOW, headers={"X-Forwarded-For": forwarded}))
    while backend.calls == 0:
        await asyncio.sleep(0.01)
    return first


@dataclass
class Overlap:
    """Generations running at once across every instance sharing it, the most seen, and start times."""

    running: int = 0
    peak: int = 0
    starts: list[float] = field(default_factory=list)


class ObservedBackend(CountingBackend):
    """A gated CountingBackend that reports its generations to an `Overlap` shared by instances."""

    def __init__(self, overlap: Overlap) -> None:
        super().__init__()
        self.overlap = overlap

    async def generate(self, params: ImageParams) -> GeneratedImage:
        self.overlap.running += 1
        self.overlap.peak = max(self.overlap.peak, self.overlap.running)
        self.overlap.starts.append(time.monotonic())
        try:
            return await super().generate(params)
        finally:
            self.overlap.running -= 1


async def until(condition: Callable[[], bool], deadline: float = 5.0) -> None:
    end = time.monotonic() + deadline
    while not condition():
        assert time.monotonic() < end, "condition not reached in time"
        await asyncio.sleep(0.01)


def image(name: str) -> str:
    return f"/prompt/{name}?width=32&height=32"


class TestSharedLimits:
    """With the Redis backend a client's concurrency and interval hold across instances."""

    async def test_queues_sharing_a_slot_store_hold_the_cap_together(self) -> None:
        """Two instances' queues on one store run one request at a time; a cancelled waiter takes nothing."""
        store = InMemoryLimiter()
        a, b = MemoryLimiter(slots=store), MemoryLimiter(slots=store)
        tier = limits(1, 0, 2)
        await a.acquire("client", "anonymous", tier)
        gave_up = asyncio.ensure_future(b.acquire("client", "anonymous", tier))
        await asyncio.sleep(0.05)
        assert not gave_up.done()
        gave_up.cancel()
        waiting = asyncio.ensure_future(b.acquire("client", "anonymous", tier))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        await a.release("client")
        await asyncio.wait_for(waiting, 2)
        await b.release("client")
        await asyncio.wait_for(a.acquire("client", "anonymous", tier), 2)

    async def test_a_request_cancelled_while_the_store_grants_gives_the_slot_back(self) -> None:
        """A client that leaves just as its slot is granted does not block its next request for slot_ttl."""
        store = InMemoryLimiter()
        a, b = MemoryLimiter(slots=store), MemoryLimiter(slots=store)
        tier = limits(1, 0, 2)
        leaving = asyncio.ensure_future(b.acquire("client", "anonymous", tier))
        await asyncio.sleep(0)  # b is now waiting on the store's answer
        leaving.cancel()
        await settle()
        assert leaving.cancelled()
        await asyncio.wait_for(a.acquire("client", "anonymous", tier), 1)

    async def test_one_clients_generations_never_overlap_across_instances(
        self, make_client: ClientFactory, redis_server: RedisServer
    ) -> None:
        """Four images from one client over two instances with concurrency 1: one generation at a time."""
        overlap = Overlap()
        backend_a, backend_b = ObservedBackend(overlap), ObservedBackend(overlap)
        settings = redis_settings(redis_server, tiers=tiers(queue_depth=3))
        a = await make_client(settings, backends={"embedded": backend_a})
        b = await make_client(settings, backends={"embedded": backend_b})
        backend_a.gate.clear()
        backend_b.gate.clear()
        first = asyncio.ensure_future(a.get(image("a1")))
        await until(lambda: backend_a.calls == 1)
        others = [asyncio.ensure_future(c.get(image(name))) for c, name in ((b, "b1"), (b, "b2"), (a, "a2"))]
        await asyncio.sleep(0.3)
        assert (backend_a.calls, backend_b.calls) == (1, 0)  # B waits for the slot A holds
        backend_a.gate.set()
        backend_b.gate.set()
        responses = await asyncio.wait_for(asyncio.gather(first, *others), 10)
        assert [r.status for r in responses] == [200] * 4
        assert overlap.peak == 1 and (backend_a.calls, backend_b.calls) == (2, 2)
        redis = aioredis.Redis(port=redis_server.port)
        try:
            limit_keys = await redis.keys("*limit:*")
        finally:
            await redis.aclose()
        assert limit_keys and not any(b"127.0.0.1" in key for key in limit_keys)  # no client address in Redis

    async def test_the_interval_holds_across_instances(
        self, make_client: ClientFactory, redis_server: RedisServer
    ) -> None:
        """A client's second image, asked of another instance, starts only after the tier's interval."""
        overlap = Overlap()
        settings = redis_settings(redis_server, tiers=tiers(concurrency=2, interval=0.4, queue_depth=2))
        a = await make_client(settings, backends={"embedded": ObservedBackend(overlap)})
        b = await make_client(settings, backends={"embedded": ObservedBackend(overlap)})
        assert (await a.get(image("one"))).status == 200
        assert (await asyncio.wait_for(b.get(image("two")), 10)).status == 200
        first, second = overlap.starts
        assert second - first >= 0.35  # 0.4 s, less Redis's millisecond rounding

    async def test_limits_hold_per_instance_while_redis_is_down(
        self, make_client: ClientFactory, redis_server: RedisServer
    ) -> None:
        """Redis stopped: both instances still answer, each limiting the client on its own."""
        overlap = Overlap()
        backend_a, backend_b = ObservedBackend(overlap), ObservedBackend(overlap)
        settings = redis_settings(redis_server, tiers=tiers())
        a = await make_client(settings, backends={"embedded": backend_a})
        b = await make_client(settings, backends={"embedded": backend_b})
        redis_server.stop()
        backend_a.gate.clear()
        backend_b.gate.clear()
        running = [asyncio.ensure_future(a.get(image("a1"))), asyncio.ensure_future(b.get(image("b1")))]
        await until(lambda: backend_a.calls == backend_b.calls == 1)
        assert overlap.peak == 2
        assert (await a.get(image("a2"))).status == 429  # this instance's queue still holds
        backend_a.gate.set()
        backend_b.gate.set()
        assert [r.status for r in await asyncio.gather(*running)] == [200, 200]


class TestModelGate:
    @pytest.fixture
    async def gated(self, make_client: ClientFactory, tmp_path: Path) -> Any:
        tokens = tmp_path / "tokens.toml"
        tokens.write_text(f'[tokens]\n"{token_digest(TOKEN)}" = {{ user_id = "u-1", username = "a", tier = "flower" }}\n')
        settings = make_settings(
            access={"tokens_file": str(tokens)},
            models={"premium": {"backend": "embedded", "tier": "flower", "max_side": 512, "default_side": 256}},
        )
        return await make_client(settings)

    async def test_model_above_the_tier_is_403(self, gated: Any) -> None:
        response = await gated.get("/prompt/fox?model=premium&width=32&height=32")
        body = await response.json()
        assert response.status == 403 and body["error"] == "tier_required"
        assert (body["requiredTier"], body["tier"]) == ("flower", "anonymous")

    async def test_cache_hit_still_passes_the_gate(self, gated: Any) -> None:
        """An image a flower user generated is not handed to an anonymous client from the cache."""
        url = "/prompt/fox?model=premium&width=32&height=32"
        assert (await gated.get(url, headers={"Authorization": f"Bearer {TOKEN}"})).status == 200
        assert (await gated.get(url, headers={"Authorization": f"Bearer {TOKEN}"})).headers["X-Cache"] == "HIT"
        assert (await gated.get(url)).status == 403

    async def test_a_gated_models_image_is_not_for_shared_caches(self, gated: Any) -> None:
        """A CDN keeping it (the token in a header is not in the URL) would serve it to anyone."""
        response = await gated.get("/prompt/fox?model=premium&width=32&height=32", headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.headers["Cache-Control"] == "private, max-age=31536000, immutable"
        assert (await gated.get("/prompt/fox?width=32&height=32")).headers["Cache-Control"].startswith("public")

    async def test_unknown_model_tier_is_a_configuration_error(self) -> None:
        from image_service.config import ConfigError

        with pytest.raises(ConfigError, match="models.procedural.tier"):
            make_settings(models={"procedural": {"backend": "embedded", "tier": "gold"}})
