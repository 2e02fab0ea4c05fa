"""The Redis cache backend on a real redis-server: sharing, cross-instance single-flight, degradation."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis
from structlog.typing import EventDict

from image_service.app import CACHE
from image_service.cache import CachedImage, ImageSerializer
from image_service.config import load_settings
from image_service.generation import GeneratedImage
from image_service.params import ImageParams, parse_params
from image_service.redis_state import Breaker, LinkState, RedisLink, connect
from image_service.testing import RedisServer

from .conftest import ClientFactory, CountingBackend, redis_settings
from .test_pipeline_events import capture_logs

ROOT = Path(__file__).resolve().parent.parent
FOX = "/prompt/a%20red%20fox?width=96&height=64&seed=7"


def terminal_events(logs: list[EventDict]) -> list[EventDict]:
    return [e for e in logs if e["event"] == "request.completed" and e.get("route") == "/prompt/{prompt}"]


def fox_key() -> str:
    settings = load_settings()
    query = {"width": "96", "height": "64", "seed": "7"}
    params = parse_params("a red fox", query, settings.models, settings.generation.default_model, 2000)
    return params.cache_key()


async def wait_for(condition: Callable[[], bool], deadline: float = 10.0) -> None:
    end = asyncio.get_running_loop().time() + deadline
    while not condition():
        assert asyncio.get_running_loop().time() < end, "condition not reached in time"
        await asyncio.sleep(0.01)


class TestEntryFormat:
    def test_an_entry_round_trips_bytes_and_metadata(self) -> None:
        image = CachedImage(
            body=b"\xff\xd8jpeg\x00bytes", content_type="image/jpeg", backend="embedded", provider="local",
            generation_ms=12.5, verdict={"is_mature": True, "labels": ["x"]},
        )
        assert CachedImage.from_bytes(image.to_bytes()) == image

    def test_the_header_is_json_not_pickle(self) -> None:
        """Only data is stored: an entry is magic + length + a JSON header + the image bytes."""
        image = CachedImage(body=b"JPEG", content_type="image/jpeg", backend="b", provider="p", generation_ms=1.0)
        data = image.to_bytes()
        header_length = int.from_bytes(data[4:8], "big")
        assert orjson.loads(data[8:8 + header_length])["backend"] == "b" and data.endswith(b"JPEG")

    @pytest.mark.parametrize(
        "garbage",
        [b"", b"\x80\x04\x95pickle", b"ISC1\x00\x00\xff\xff{}", b"ISC1\x00\x00\x00\x02{}", b"ISC1\x00\x00\x00\x02[]"],
    )
    def test_anything_else_reads_as_a_miss(self, garbage: bytes) -> None:
        """Foreign or corrupt bytes under our key are a miss, never an exception or an object."""
        with pytest.raises(ValueError):
            CachedImage.from_bytes(garbage)
        assert ImageSerializer().loads(garbage) is None


class TestBreaker:
    def test_backoff_doubles_up_to_the_maximum_and_a_success_closes_it(self) -> None:
        now = [0.0]
        breaker = Breaker(max_backoff=1.0, clock=lambda: now[0])
        assert breaker.failed() is True and breaker.state is LinkState.DOWN
        waits = []
        for _ in range(4):
            waited = 0.0
            while not breaker.admit():
                now[0] += 0.125  # exact in binary: no rounding drift
                waited += 0.125
            waits.append(waited)
            assert breaker.failed() is False
        assert waits == [0.25, 0.5, 1.0, 1.0]
        now[0] += 1.0
        assert breaker.succeeded() is True and breaker.state is LinkState.UP and breaker.failures == 5

    def test_only_one_probe_passes_per_backoff_while_down(self) -> None:
        """After the pause one caller probes Redis; the others keep skipping until it reports."""
        now = [0.0]
        breaker = Breaker(max_backoff=10.0, clock=lambda: now[0])
        assert breaker.admit() and breaker.admit()  # up: everyone goes
        breaker.failed()
        assert not breaker.admit()
        now[0] = 0.25
        assert [breaker.admit() for _ in range(3)] == [True, False, False]
        breaker.succeeded()
        assert breaker.admit() and breaker.admit()

    def test_non_positive_backoff_is_refused(self) -> None:
        with pytest.raises(ValueError, match="max_backoff"):
            Breaker(max_backoff=0)


class TestSharedCache:
    async def test_instances_share_images_a_miss_on_one_is_a_hit_on_the_other(
        self, make_client: ClientFactory, redis_server: RedisServer
    ) -> None:
        """B serves A's bytes without generating."""
        backend_a, backend_b = CountingBackend(), CountingBackend()
        a = await make_client(redis_settings(redis_server), backends={"embedded": backend_a})
        b = await make_client(redis_settings(redis_server), backends={"embedded": backend_b})
        first = await a.get(FOX)
        second = await b.get(FOX)
        assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("MISS", "HIT")
        assert await first.read() == await second.read()
        assert (backend_a.calls, backend_b.calls) == (1, 0)

    async def test_entries_live_under_the_key_prefix_with_the_ttl(
        self, make_client: ClientFactory, redis_server: RedisServer
    ) -> None:
        client = await make_client(redis_settings(redis_server, key_prefix="pfx:", ttl=120))
        await client.get(FOX)
        redis = aioredis.Redis(port=redis_server.port)
        try:
            keys = await redis.keys("*")
            # The image, and the client's start slot bookkeeping: everything under the prefix.
            assert f"pfx:{fox_key()}".encode() in keys and all(key.startswith(b"pfx:") for key in keys)
            assert 110 <= await redis.ttl(f"pfx:{fox_key()}") <= 120
        finally:
            await redis.aclose()

    async def test_metadata_replays_from_another_instance(
        self, make_client: ClientFactory, redis_server: RedisServer
    ) -> None:
        """A hit on B carries the backend and provider that A's generation recorded."""
        a = await make_client(redis_settings(redis_server), backends={"embedded": CountingBackend()})
        b = await make_client(redis_settings(redis_server, local_cache=False))
        await a.get(FOX)
        with capture_logs() as logs:
            await b.get(FOX)
        image = await b.app[CACHE].get(fox_key())
        assert image is not None and (image.backend, image.provider) == ("embedded", "test")
        (event,) = terminal_events(logs)
        assert (event["cache_status"], event["cache_backend"]) == ("hit", "redis")

    async def test_concurrent_identical_requests_across_instances_generate_once(
        self, make_client: ClientFactory, redis_server: RedisServer
    ) -> None:
        """Three requests on each of two instances: one generation, six identical answers."""
        backend_a, backend_b = CountingBackend(), CountingBackend()
        backend_a.gate.clear()
        backend_b.gate.clear()
        a = await make_client(redis_settings(redis_server), backends={"embedded": backend_a})
        b = await make_client(redis_settings(redis_server), backends={"embedded": backend_b})
        with capture_logs() as logs:
            requests = [asyncio.ensure_future(c.get(FOX)) for c in (a, b) for _ in range(3)]
            await wait_for(lambda: backend_a.calls + backend_b.calls >= 1)
            await asyncio.sleep(0.3)  # the other instance is polling by now
            backend_a.gate.set()
            backend_b.gate.set()
            responses = await asyncio.gather(*requests)
            bodies = {await r.read() for r in responses}
        assert backend_a.calls + backend_b.calls == 1
        assert [r.status for r in responses] == [200] * 6 and len(bodies) == 1
        statuses = [e["cache_status"] for e in terminal_events(logs)]
        # One produced it; the others waited for it (or, on a very slow machine, found it stored).
        assert statuses.count("miss") == 1 and set(statuses) <= {"miss", "shared-wait", "hit"}

    async def test_a_failure_reaches_the_instances_that_waited_for_it(
        self, make_client: ClientFactory, redis_server: RedisServer
    ) -> None:
        """B waited for A's generation; A's 502 is B's answer too, without B trying again."""
        backend_a, backend_b = CountingBackend(), CountingBackend()
        backend_a.gate.clear()
        backend_a.fail_with = RuntimeError("GPU on fire")
        a = await make_client(redis_settings(redis_server), backends={"embedded": backend_a})
        b = await make_client(redis_settings(redis_server), backends={"embedded": backend_b})
        on_a = asyncio.ensure_future(a.get(FOX))
        await wait_for(lambda: backend_a.calls == 1)
        on_b = asyncio.ensure_future(b.get(FOX))
        await asyncio.sleep(0.3)  # B is polling A's lock
        backend_a.gate.set()
        first, second = await asyncio.gather(on_a, on_b)
        assert (first.status, second.status) == (502, 502)
        body = await second.json()
        assert body["error"] == "generation_failed" and "RuntimeError" in body["message"]
        assert backend_b.calls == 0

    async def test_a_failed_generation_frees_the_lock_for_the_next_instance(
        self, make_client: ClientFactory, redis_server: RedisServer
    ) -> None:
        """A failure is not cached and does not leave the image locked."""
        failing = CountingBackend()
        failing.fail_with = RuntimeError("GPU on fire")
        a = await make_client(redis_settings(redis_server), backends={"embedded": failing})
        b = await make_client(redis_settings(redis_server))
        assert (await a.get(FOX)).status == 502
        response = await asyncio.wait_for(b.get(FOX), 5)
        assert response.status == 200 and response.headers["X-Cache"] == "MISS"


HOLDER = """
import asyncio, sys
from image_service.cache import build_cache
from image_service.config import CacheSettings

async def main() -> None:
    cache = build_cache(CacheSettings(backend="redis", redis_url=sys.argv[1], lock_ttl=float(sys.argv[3])))
    async def produce():
        print("holding", flush=True)
        await asyncio.sleep(3600)
    await cache.produce_once(sys.argv[2], produce)

asyncio.run(main())
"""


class LockWatchingBackend(CountingBackend):
    """Records whether the generation lock of the image existed when generation started."""

    def __init__(self, redis: aioredis.Redis, lock: str) -> None:
        super().__init__()
        self._redis = redis
        self._lock = lock
        self.lock_held_at_start: list[bool] = []

    async def generate(self, params: ImageParams) -> GeneratedImage:
        self.lock_held_at_start.append(bool(await self._redis.exists(self._lock)))
        return await super().generate(params)


async def test_the_lock_of_a_killed_holder_expires_and_a_waiter_takes_over(
    make_client: ClientFactory, redis_server: RedisServer
) -> None:
    """A holder renews its lock while alive; SIGKILLed, its lock expires and B generates once, after it."""
    lock = f"image_service:lock:{fox_key()}"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, redis_server.url, fox_key(), "0.6"],
        cwd=ROOT, stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    redis = aioredis.Redis(port=redis_server.port)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"holding\n"
        await asyncio.sleep(1.0)  # longer than the lock's TTL: only renewal keeps it
        assert await redis.exists(lock)
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        backend = LockWatchingBackend(redis, lock)
        client = await make_client(redis_settings(redis_server), backends={"embedded": backend})
        response = await asyncio.wait_for(client.get(FOX), 10)
        assert response.status == 200
        assert backend.calls == 1
        # B's generation ran under B's own lock, taken only once the dead holder's had expired.
        assert backend.lock_held_at_start == [True]
        assert not await redis.exists(lock)
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
        await redis.aclose()


class TestDegradation:
    async def test_requests_succeed_while_redis_is_stopped_and_hit_again_after_restart(
        self, make_client: ClientFactory, redis_server: RedisServer
    ) -> None:
        backend = CountingBackend()
        client = await make_client(redis_settings(redis_server, local_cache=False), backends={"embedded": backend})
        first = await client.get(FOX)
        assert first.status == 200 and first.headers["X-Cache"] == "MISS"
        redis_server.stop()
        with capture_logs() as logs:
            during = await client.get(FOX)
            assert during.status == 200 and await during.read() == await first.read()
            other = await client.get("/prompt/another?width=32&height=32")
            assert other.status == 200
        assert [e["cache_status"] for e in terminal_events(logs)] == ["bypass", "bypass"]
        assert any(e["event"] == "redis.down" for e in logs)
        health = await (await client.get("/health")).json()
        assert health["status"] == "ok" and health["cache"]["state"] == "down"
        assert health["cache"]["redisFailures"] >= 1

        redis_server.start()  # same port, empty: nothing survived
        statuses = []
        while "HIT" not in statuses:
            assert len(statuses) < 200, statuses
            response = await client.get(FOX)
            assert response.status == 200
            statuses.append(response.headers["X-Cache"])
            await asyncio.sleep(0.05)
        health = await (await client.get("/health")).json()
        assert health["cache"]["state"] == "up"

    async def test_the_local_level_keeps_serving_hits_while_redis_is_down(
        self, make_client: ClientFactory, redis_server: RedisServer
    ) -> None:
        """With two levels, an image this instance served stays a hit without Redis."""
        backend = CountingBackend()
        client = await make_client(redis_settings(redis_server), backends={"embedded": backend})
        first = await client.get(FOX)
        redis_server.stop()
        again = await client.get(FOX)
        assert again.headers["X-Cache"] == "HIT" and await again.read() == await first.read()
        assert backend.calls == 1

    async def test_a_frozen_redis_is_bypassed_within_the_timeout(
        self, make_client: ClientFactory, redis_server: RedisServer
    ) -> None:
        """Redis accepting connections but not answering must not hang requests."""
        client = await make_client(redis_settings(redis_server))
        await client.get("/health")
        redis_server.pause()
        try:
            response = await asyncio.wait_for(client.get(FOX), 5)
            assert response.status == 200
        finally:
            redis_server.resume()

    async def test_an_unreachable_redis_at_start_still_serves(self, make_client: ClientFactory, tmp_path: Path) -> None:
        """Start-up does not need Redis; the service answers and reports the cache as down."""
        nobody = RedisServer(tmp_path)  # a free port that no one listens on
        client = await make_client(redis_settings(nobody))
        response = await client.get(FOX)
        assert response.status == 200
        assert (await (await client.get("/health")).json())["cache"]["state"] == "down"


async def test_a_burst_beyond_the_pool_waits_for_connections_and_keeps_redis_up(redis_server: RedisServer) -> None:
    """redis-py's pool refuses a call at once when every connection is busy: under 200 concurrent
    requests that refusal opened the breaker, and cached images were generated again."""
    link = RedisLink(connect(redis_server.url, 2.0, max_connections=4), timeout=2.0, max_backoff=5.0)
    try:
        answers = await asyncio.gather(*(link.call(lambda: link.client.ping()) for _ in range(60)))
        assert all(answers) and link.state is LinkState.UP
    finally:
        await link.close()


async def test_connections_redis_closed_are_replaced_without_a_failure(redis_server: RedisServer) -> None:
    """A Redis restart or its idle timeout closes pooled connections; the next call must take a
    fresh one, not count Redis as down (which sends every request past the shared cache)."""
    link = RedisLink(connect(redis_server.url, 2.0), timeout=2.0, max_backoff=5.0)
    admin = aioredis.Redis(port=redis_server.port)
    try:
        await asyncio.gather(*(link.call(lambda: link.client.ping()) for _ in range(5)))
        assert await admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes") >= 1
        await asyncio.gather(*(link.call(lambda: link.client.ping()) for _ in range(5)))
        assert link.state is LinkState.UP and link.failures == 0
    finally:
        await admin.aclose()
        await link.close()


async def test_the_environment_selects_the_redis_backend(
    monkeypatch: pytest.MonkeyPatch, make_client: ClientFactory, redis_server: RedisServer
) -> None:
    """IMAGE_SERVICE_CACHE__BACKEND=redis and __REDIS_URL put the images into that Redis."""
    monkeypatch.setenv("IMAGE_SERVICE_CACHE__BACKEND", "redis")
    monkeypatch.setenv("IMAGE_SERVICE_CACHE__REDIS_URL", redis_server.url)
    client = await make_client(load_settings())
    await client.get(FOX)
    redis = aioredis.Redis(port=redis_server.port)
    try:
        assert await redis.exists(f"image_service:{fox_key()}")
    finally:
        await redis.aclose()
    assert (await (await client.get("/health")).json())["cache"]["backend"] == "redis"
