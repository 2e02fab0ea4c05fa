"""The cache stage: finished images by a hash of their parameters, with single-flight generation.

Storage is an aiocache backend. aiocache's memory backend is unbounded, so `BoundedMemoryCache`
keeps its API and adds an LRU bound in bytes. `ImageCache` adds single-flight: concurrent identical
misses share one production; a failure reaches every waiter and is never stored.
"""

from __future__ import annotations

import asyncio
import enum
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiocache import SimpleMemoryCache
from aiocache.base import BaseCache

from .config import CacheSettings

# Bookkeeping bytes charged per entry on top of the image, so many tiny entries stay bounded too.
ENTRY_OVERHEAD = 512


class CacheStatus(enum.StrEnum):
    HIT = "hit"
    MISS = "miss"
    SHARED_WAIT = "shared-wait"


@dataclass(frozen=True, slots=True)
class CachedImage:
    """A servable image and what was learnt producing it, replayed on every hit."""

    body: bytes
    content_type: str
    backend: str
    provider: str
    generation_ms: float
    verdict: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return len(self.body) + ENTRY_OVERHEAD


def _sizeof(value: object) -> int:
    return getattr(value, "nbytes", ENTRY_OVERHEAD)


class _ByteBoundedStore(OrderedDict[str, Any]):
    """An ordered dict that evicts least-recently-used entries beyond `max_bytes`."""

    def __init__(self, max_bytes: int, on_evict: Callable[[str], None]) -> None:
        super().__init__()
        self.max_bytes = max_bytes
        self.used_bytes = 0
        self._on_evict = on_evict

    def __setitem__(self, key: str, value: Any) -> None:
        if key in self:
            self.used_bytes -= _sizeof(super().__getitem__(key))
        super().__setitem__(key, value)
        self.move_to_end(key)
        self.used_bytes += _sizeof(value)
        while self.used_bytes > self.max_bytes and self:
            evicted, old = self.popitem(last=False)
            self.used_bytes -= _sizeof(old)
            self._on_evict(evicted)

    def pop(self, key: str, default: Any = None) -> Any:
        if key not in self:
            return default
        value = super().pop(key)
        self.used_bytes -= _sizeof(value)
        return value

    def touch(self, key: str) -> Any:
        if key not in self:
            return None
        self.move_to_end(key)
        return super().__getitem__(key)

    def clear(self) -> None:
        super().clear()
        self.used_bytes = 0


class BoundedMemoryCache(SimpleMemoryCache):
    """aiocache's memory cache with least-recently-used eviction beyond a byte bound."""

    NAME = "bounded-memory"

    def __init__(self, max_bytes: int, **kwargs: Any) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        super().__init__(**kwargs)
        self._cache: _ByteBoundedStore = _ByteBoundedStore(max_bytes, self._forget_timer)

    @property
    def used_bytes(self) -> int:
        return self._cache.used_bytes

    @property
    def max_bytes(self) -> int:
        return self._cache.max_bytes

    def _forget_timer(self, key: str) -> None:
        handle = self._handlers.pop(key, None)
        if handle is not None:
            handle.cancel()

    async def _get(self, key: str, encoding: str = "utf-8", _conn: Any = None) -> Any:
        return self._cache.touch(key)

    async def _set(self, key: str, value: Any, ttl: Any = None, _cas_token: Any = None, _conn: Any = None) -> bool:
        if _sizeof(value) > self._cache.max_bytes:
            return False
        return await super()._set(key, value, ttl=ttl, _cas_token=_cas_token, _conn=_conn)

    async def _clear(self, namespace: str | None = None, _conn: Any = None) -> bool:
        if namespace:
            return await super()._clear(namespace)
        for handle in self._handlers.values():
            handle.cancel()
        self._handlers.clear()
        self._cache.clear()
        return True


def build_store(settings: CacheSettings) -> BaseCache:
    # timeout=0: a memory lookup needs no asyncio.wait_for, which would cost a task per call.
    return BoundedMemoryCache(max_bytes=settings.max_bytes, namespace=settings.key_prefix, timeout=0)


class ImageCache:
    """Lookup, store, and single-flight production of finished images."""

    def __init__(self, store: BaseCache, ttl: int) -> None:
        self._store = store
        self._ttl = ttl or None
        self._inflight: dict[str, asyncio.Task[CachedImage]] = {}

    @property
    def store(self) -> BaseCache:
        return self._store

    async def get(self, key: str) -> CachedImage | None:
        return await self._store.get(key)

    async def set(self, key: str, value: CachedImage) -> None:
        await self._store.set(key, value, ttl=self._ttl)

    async def produce_once(
        self, key: str, produce: Callable[[], Awaitable[CachedImage]]
    ) -> tuple[CachedImage, CacheStatus]:
        """Run `produce` once for all concurrent callers of `key`; every caller gets its outcome.

        The production is shielded: a caller that goes away does not cancel it for the others.
        `produce` decides itself whether its result is stored.
        """
        task = self._inflight.get(key)
        if task is not None:
            return await asyncio.shield(task), CacheStatus.SHARED_WAIT
        task = asyncio.ensure_future(self._produce(key, produce))
        self._inflight[key] = task
        task.add_done_callback(lambda done: self._finished(key, done))
        return await asyncio.shield(task), CacheStatus.MISS

    async def _produce(self, key: str, produce: Callable[[], Awaitable[CachedImage]]) -> CachedImage:
        # A production that finished between our lookup and now has already stored the image.
        stored = await self.get(key)
        return stored if stored is not None else await produce()

    def _finished(self, key: str, task: asyncio.Task[CachedImage]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # mark retrieved: waiters that went away must not leave a warning

    async def close(self) -> None:
        await self._store.close()
