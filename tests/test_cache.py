"""The cache stage: byte bound, LRU order, TTL, and single-flight bookkeeping."""

from __future__ import annotations

import asyncio
import random

import pytest

from image_service.cache import ENTRY_OVERHEAD, BoundedMemoryCache, CachedImage, CacheStatus, ImageCache
from image_service.errors import TooManyRequests


def image(size: int) -> CachedImage:
    return CachedImage(body=b"x" * size, content_type="image/jpeg", backend="b", provider="p", generation_ms=1.0)


class TestBoundedMemoryCache:
    async def test_never_exceeds_its_byte_bound(self) -> None:
        """Whatever the sequence of sets, the bytes held stay within max_bytes."""
        cache = BoundedMemoryCache(max_bytes=50_000, timeout=0)
        rng = random.Random(1)
        for index in range(500):
            await cache.set(f"k{index}", image(rng.randint(0, 9000)))
            assert cache.used_bytes <= cache.max_bytes
        held = [await cache.get(f"k{i}") for i in range(500)]
        assert sum(v.nbytes for v in held if v is not None) == cache.used_bytes

    async def test_least_recently_used_entry_is_evicted_first(self) -> None:
        """A read refreshes an entry; the untouched one goes."""
        cache = BoundedMemoryCache(max_bytes=3 * (1000 + ENTRY_OVERHEAD), timeout=0)
        for key in "abc":
            await cache.set(key, image(1000))
        await cache.get("a")
        await cache.set("d", image(1000))
        assert await cache.get("b") is None
        assert all([await cache.get(k) for k in "acd"])

    async def test_entry_larger_than_the_bound_is_not_stored(self) -> None:
        """One huge image must not flush the whole cache."""
        cache = BoundedMemoryCache(max_bytes=10_000, timeout=0)
        await cache.set("small", image(100))
        await cache.set("huge", image(20_000))
        assert await cache.get("huge") is None and await cache.get("small") is not None

    async def test_replacing_an_entry_does_not_double_count(self) -> None:
        cache = BoundedMemoryCache(max_bytes=100_000, timeout=0)
        await cache.set("a", image(1000))
        await cache.set("a", image(2000))
        assert cache.used_bytes == 2000 + ENTRY_OVERHEAD

    async def test_entries_expire_after_their_ttl(self) -> None:
        cache = BoundedMemoryCache(max_bytes=100_000, timeout=0)
        await cache.set("a", image(10), ttl=0.05)
        await asyncio.sleep(0.1)
        assert await cache.get("a") is None and cache.used_bytes == 0

    async def test_clear_releases_everything(self) -> None:
        cache = BoundedMemoryCache(max_bytes=100_000, timeout=0)
        await cache.set("a", image(10), ttl=10)
        await cache.clear()
        assert cache.used_bytes == 0 and await cache.get("a") is None

    def test_non_positive_bound_is_refused(self) -> None:
        with pytest.raises(ValueError, match="max_bytes"):
            BoundedMemoryCache(max_bytes=0)


class TestProduceOnce:
    async def test_concurrent_callers_share_one_production(self) -> None:
        cache = ImageCache(BoundedMemoryCache(max_bytes=10**6, timeout=0), ttl=0)
        calls = 0

        async def produce() -> CachedImage:
            nonlocal calls
            calls += 1
            await asyncio.sleep(0.02)
            return image(10)

        results = await asyncio.gather(*(cache.produce_once("k", produce) for _ in range(10)))
        assert calls == 1
        assert [status for _, status in results].count(CacheStatus.MISS) == 1
        assert len({id(value) for value, _ in results}) == 1

    async def test_a_caller_going_away_does_not_cancel_the_production(self) -> None:
        """The first caller's cancellation leaves the shared production running for the others."""
        cache = ImageCache(BoundedMemoryCache(max_bytes=10**6, timeout=0), ttl=0)
        release = asyncio.Event()

        async def produce() -> CachedImage:
            await release.wait()
            return image(10)

        leader = asyncio.ensure_future(cache.produce_once("k", produce))
        await asyncio.sleep(0)
        follower = asyncio.ensure_future(cache.produce_once("k", produce))
        await asyncio.sleep(0)
        leader.cancel()
        release.set()
        value, status = await follower
        assert status is CacheStatus.SHARED_WAIT and value.body == b"x" * 10


async def test_a_refusal_that_belongs_to_the_leader_is_not_shared() -> None:
    """When the caller that started a production is refused for its own reasons (its queue is full),
    the callers that joined it produce for themselves instead of inheriting its 429."""
    cache = ImageCache(BoundedMemoryCache(max_bytes=10**6, timeout=0), ttl=0)
    started = asyncio.Event()

    async def refused() -> CachedImage:
        started.set()
        await asyncio.sleep(0.01)
        raise TooManyRequests("the leader's queue is full", retry_after=1)

    async def produce() -> CachedImage:
        return image(10)

    leader = asyncio.ensure_future(cache.produce_once("k", refused))
    await started.wait()
    follower = await cache.produce_once("k", produce)
    with pytest.raises(TooManyRequests):
        await leader
    assert follower[0].body == b"x" * 10 and follower[1] is CacheStatus.MISS
