"""Limiter state: slots and start spacing per key, the same contract in memory and in a real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from image_service.config import CacheSettings
from image_service.limits import InMemoryLimiter, Limiter, RedisLimiter, SlotLimit, build_shared_limiter
from image_service.redis_state import RedisLink, connect
from image_service.testing import RedisServer

LimiterFactory = Callable[[], Awaitable[Limiter]]


@pytest.fixture(params=["memory", "redis"])
async def make_limiter(request: pytest.FixtureRequest) -> AsyncIterator[LimiterFactory]:
    """Limiters that share state: one process's limiter in memory, or several instances on one Redis."""
    links: list[RedisLink] = []
    if request.param == "memory":
        shared = InMemoryLimiter()

        async def memory() -> Limiter:
            return shared

        yield memory
        return
    server: RedisServer = request.getfixturevalue("redis_server")

    async def redis() -> Limiter:
        link = RedisLink(connect(server.url, 1.0), 1.0, 0.2)
        links.append(link)
        return RedisLimiter(link, "test:")

    yield redis
    for link in links:
        await link.close()


class TestLimiterContract:
    async def test_no_more_than_max_active_slots_are_granted(self, make_limiter: LimiterFactory) -> None:
        limiter = await make_limiter()
        limit = SlotLimit(max_active=2)
        grants = [await limiter.acquire("client", limit) for _ in range(3)]
        assert [g.acquired for g in grants] == [True, True, False]
        assert [g.active for g in grants] == [1, 2, 2]
        assert grants[2].token is None and grants[2].retry_after == 0

    async def test_a_released_slot_can_be_taken_again(self, make_limiter: LimiterFactory) -> None:
        limiter = await make_limiter()
        limit = SlotLimit(max_active=1)
        first = await limiter.acquire("client", limit)
        assert not (await limiter.acquire("client", limit)).acquired
        assert first.token is not None
        await limiter.release("client", first.token)
        await limiter.release("client", first.token)  # idempotent
        assert (await limiter.acquire("client", limit)).acquired

    async def test_keys_are_independent(self, make_limiter: LimiterFactory) -> None:
        limiter = await make_limiter()
        limit = SlotLimit(max_active=1)
        assert (await limiter.acquire("alice", limit)).acquired
        assert (await limiter.acquire("bob", limit)).acquired

    async def test_starts_are_spaced_by_min_interval(self, make_limiter: LimiterFactory) -> None:
        """A second start within the interval is refused with the time left; after it, granted."""
        limiter = await make_limiter()
        limit = SlotLimit(max_active=5, min_interval=0.3)
        first = await limiter.acquire("client", limit)
        assert first.acquired and first.last_start is None
        refused = await limiter.acquire("client", limit)
        assert not refused.acquired and 0 < refused.retry_after <= 0.3
        await asyncio.sleep(refused.retry_after + 0.02)
        later = await limiter.acquire("client", limit)
        assert later.acquired and later.last_start is not None
        assert later.active == 2

    async def test_an_unreleased_slot_frees_itself_after_slot_ttl(self, make_limiter: LimiterFactory) -> None:
        """A crashed instance cannot hold a client's slot forever."""
        limiter = await make_limiter()
        limit = SlotLimit(max_active=1, slot_ttl=0.2)
        assert (await limiter.acquire("client", limit)).acquired
        assert not (await limiter.acquire("client", limit)).acquired
        await asyncio.sleep(0.25)
        assert (await limiter.acquire("client", limit)).acquired

    async def test_concurrent_acquires_from_several_instances_never_overshoot(
        self, make_limiter: LimiterFactory
    ) -> None:
        """Check-and-take is atomic: 60 racing acquires through three handles get exactly 3 slots."""
        limiters = [await make_limiter() for _ in range(3)]
        limit = SlotLimit(max_active=3)
        grants = await asyncio.gather(*(limiters[i % 3].acquire("client", limit) for i in range(60)))
        assert sum(g.acquired for g in grants) == 3


async def test_redis_limits_are_shared_and_fall_back_to_memory_while_redis_is_down(
    redis_server: RedisServer,
) -> None:
    """Two instances see one limit; with Redis stopped each instance still limits on its own."""
    links = [RedisLink(connect(redis_server.url, 0.3), 0.3, 0.2) for _ in range(2)]
    a, b = (RedisLimiter(link, "test:") for link in links)
    try:
        limit = SlotLimit(max_active=1)
        held = await a.acquire("client", limit)
        assert held.acquired and held.shared
        assert not (await b.acquire("client", limit)).acquired
        redis_server.stop()
        local = await b.acquire("client", limit)
        assert local.acquired and not local.shared
        assert not (await b.acquire("client", limit)).acquired
        assert local.token is not None
        await b.release("client", local.token)
        assert (await b.acquire("client", limit)).acquired
    finally:
        for link in links:
            await link.close()


async def test_a_slot_whose_release_redis_missed_is_freed_once_redis_answers(redis_server: RedisServer) -> None:
    """A stall while a generation ends must not hold its client's slot for the slot's whole TTL."""
    link = RedisLink(connect(redis_server.url, 0.2), 0.2, 0.05)
    limiter = RedisLimiter(link, "test:")
    try:
        limit = SlotLimit(max_active=1, slot_ttl=120)
        held = await limiter.acquire("client", limit)
        assert held.acquired and held.shared and held.token is not None
        redis_server.pause()
        try:
            await limiter.release("client", held.token)
        finally:
            redis_server.resume()
        await asyncio.sleep(0.1)  # the link's backoff
        again = await limiter.acquire("client", limit)
        assert again.acquired and again.shared
    finally:
        await link.close()


def test_bad_limits_fail_when_built() -> None:
    with pytest.raises(ValueError, match="max_active"):
        SlotLimit(max_active=0)
    with pytest.raises(ValueError, match="min_interval"):
        SlotLimit(max_active=1, min_interval=-1)
    with pytest.raises(ValueError, match="slot_ttl"):
        SlotLimit(max_active=1, slot_ttl=0)


async def test_only_the_redis_backend_has_a_shared_store(redis_server: RedisServer) -> None:
    """With the memory backend the queues' own state is the limit; with Redis they share a store."""
    assert build_shared_limiter(CacheSettings(), None) is None
    link = RedisLink(connect(redis_server.url, 1.0), 1.0, 0.2)
    try:
        assert isinstance(build_shared_limiter(CacheSettings(backend="redis"), link), RedisLimiter)
    finally:
        await link.close()


async def test_idle_keys_are_swept_even_when_released_inside_their_interval() -> None:
    """Redis-down fallback: a key released before its spacing passed must not stay forever."""
    limiter = InMemoryLimiter()
    limit = SlotLimit(max_active=1, min_interval=0.05, slot_ttl=60)
    for n in range(1000):
        grant = limiter.acquire_now(f"client-{n}", limit)
        assert grant.acquired and grant.token is not None
        await limiter.release(f"client-{n}", grant.token)
    await asyncio.sleep(0.06)
    for n in range(1000, 1100):
        assert limiter.acquire_now(f"client-{n}", limit).acquired
    assert len(limiter._keys) <= 100
