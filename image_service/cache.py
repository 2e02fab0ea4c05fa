"""The cache stage: finished images by a hash of their parameters, with single-flight generation.

Storage is an aiocache backend. aiocache's memory backend is unbounded, so `BoundedMemoryCache`
keeps its API and adds an LRU bound in bytes. `ImageCache` adds single-flight: concurrent identical
misses share one production; a failure reaches every waiter and is never stored.

With `cache.backend = "redis"` images also live in Redis (`RedisImageStore`, a compact binary entry:
never pickle, since whatever can write to Redis could otherwise run code here), optionally behind the
in-process memory level, and `SharedFlight` (redis_state.py) extends single-flight across instances.
When Redis fails the cache is bypassed, never the request: the image is generated and served anyway.
"""

from __future__ import annotations

import asyncio
import enum
import struct
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog
from aiocache import RedisCache, SimpleMemoryCache
from aiocache.base import BaseCache
from aiocache.serializers import BaseSerializer
from redis.asyncio import Redis

from .config import CacheSettings
from .errors import ServiceError
from .redis_state import LockWaitExpired, RedisLink, RedisUnavailable, SharedFlight, connect

log = structlog.get_logger("image_service.cache")

# Bookkeeping bytes charged per entry on top of the image, so many tiny entries stay bounded too.
ENTRY_OVERHEAD = 512
# A stored entry: magic and format version, header length, orjson header, then the image bytes.
ENTRY_MAGIC = b"ISC1"
_HEADER_LENGTH = struct.Struct(">I")
_HEADER_TYPES: dict[str, type | tuple[type, ...]] = {
    "content_type": str, "backend": str, "provider": str, "generation_ms": (int, float), "verdict": dict,
}


class CacheStatus(enum.StrEnum):
    HIT = "hit"
    MISS = "miss"
    SHARED_WAIT = "shared-wait"
    BYPASS = "bypass"


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

    def to_bytes(self) -> bytes:
        header = orjson.dumps({name: getattr(self, name) for name in _HEADER_TYPES})
        return b"".join((ENTRY_MAGIC, _HEADER_LENGTH.pack(len(header)), header, self.body))

    @classmethod
    def from_bytes(cls, data: bytes) -> CachedImage:
        """Parse an entry written by `to_bytes`; ValueError for anything else."""
        start = len(ENTRY_MAGIC) + _HEADER_LENGTH.size
        if len(data) < start or not data.startswith(ENTRY_MAGIC):
            raise ValueError("not an image cache entry")
        (length,) = _HEADER_LENGTH.unpack_from(data, len(ENTRY_MAGIC))
        if start + length > len(data):
            raise ValueError("truncated image cache entry")
        header = orjson.loads(data[start:start + length])
        if not isinstance(header, dict) or any(
            not isinstance(header.get(name), kind) for name, kind in _HEADER_TYPES.items()
        ):
            raise ValueError("malformed image cache entry header")
        return cls(body=data[start + length:], **{name: header[name] for name in _HEADER_TYPES})


class ImageSerializer(BaseSerializer):
    """aiocache serializer for `CachedImage`; an unreadable entry reads as a miss, never an error."""

    DEFAULT_ENCODING = None

    def dumps(self, value: CachedImage) -> bytes:  # type: ignore[override]
        return value.to_bytes()

    def loads(self, value: bytes | None) -> CachedImage | None:  # type: ignore[override]
        if value is None:
            return None
        try:
            return CachedImage.from_bytes(value)
        except ValueError as exc:
            log.warning("cache.entry_unreadable", reason=str(exc))
            return None


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

    def peek(self, key: str) -> Any:
        """A synchronous `get` for the hot path: a memory lookup needs no await, no plugins, no timeout."""
        return self._cache.touch(self.build_key(key))

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


class RedisImageStore(RedisCache):
    """aiocache's Redis cache on the service's guarded client, keys as `<key_prefix><hash>`."""

    def __init__(self, client: Redis, key_prefix: str) -> None:
        # timeout=0: RedisLink bounds every call itself. The pool RedisCache builds is never connected.
        super().__init__(serializer=ImageSerializer(), namespace=key_prefix, timeout=0)
        self.client = client

    def _build_key(self, key: str, namespace: str | None = None) -> str:
        return f"{self.namespace if namespace is None else namespace}{key}"

    async def _set(self, key: str, value: Any, ttl: Any = None, _cas_token: Any = None, _conn: Any = None) -> bool:
        # SET EX/PX: aiocache's SETEX / PSETEX are deprecated by redis-py.
        if isinstance(ttl, float):
            return bool(await self.client.set(key, value, px=int(ttl * 1000)))
        return bool(await self.client.set(key, value, ex=ttl))

    async def _close(self, *args: Any, _conn: Any = None, **kwargs: Any) -> None:
        """The client belongs to the RedisLink, which closes it."""


def build_store(settings: CacheSettings) -> BaseCache:
    # timeout=0: a memory lookup needs no asyncio.wait_for, which would cost a task per call.
    return BoundedMemoryCache(max_bytes=settings.max_bytes, namespace=settings.key_prefix, timeout=0)


@dataclass(frozen=True, slots=True)
class SharedLevel:
    """The Redis level of the cache: images, the guarded connection, cross-instance single-flight."""

    store: RedisImageStore
    link: RedisLink
    flight: SharedFlight


def build_cache(settings: CacheSettings) -> ImageCache:
    """The configured cache: memory alone, or Redis with (optionally) the memory level in front."""
    if settings.backend == "memory":
        return ImageCache(build_store(settings), settings.ttl)
    client = connect(settings.redis_url, settings.redis_timeout)
    link = RedisLink(client, settings.redis_timeout, settings.redis_backoff_max)
    shared = SharedLevel(
        store=RedisImageStore(link.client, settings.key_prefix),
        link=link,
        flight=SharedFlight(link, settings.key_prefix, settings.lock_ttl, settings.lock_wait),
    )
    local = build_store(settings) if settings.local_cache else None
    return ImageCache(local, settings.ttl, shared=shared)


class ImageCache:
    """Lookup, store, and single-flight production of finished images, on one or two levels."""

    def __init__(self, store: BaseCache | None, ttl: int, *, shared: SharedLevel | None = None) -> None:
        if store is None and shared is None:
            raise ValueError("a cache needs a memory level, a Redis level, or both")
        self._store = store
        self._shared = shared
        self._ttl = ttl or None
        self._inflight: dict[str, asyncio.Task[tuple[CachedImage, CacheStatus]]] = {}

    @property
    def store(self) -> BaseCache | None:
        """The in-process level, if any."""
        return self._store

    @property
    def backend(self) -> str:
        return "memory" if self._shared is None else "redis"

    @property
    def link(self) -> RedisLink | None:
        """The guarded Redis connection, shared with whatever else keeps state in Redis."""
        return self._shared.link if self._shared is not None else None

    async def lookup(self, key: str) -> tuple[CachedImage | None, CacheStatus]:
        """The image if cached (HIT); MISS; or BYPASS when the Redis level cannot answer."""
        store = self._store
        if store is not None:
            found = store.peek(key) if isinstance(store, BoundedMemoryCache) else await store.get(key)
            if found is not None:
                return found, CacheStatus.HIT
        if self._shared is None:
            return None, CacheStatus.MISS
        try:
            found = await self._shared_get(key)
        except RedisUnavailable:
            return None, CacheStatus.BYPASS
        return found, CacheStatus.HIT if found is not None else CacheStatus.MISS

    async def get(self, key: str) -> CachedImage | None:
        return (await self.lookup(key))[0]

    async def set(self, key: str, value: CachedImage) -> None:
        if self._store is not None:
            await self._store.set(key, value, ttl=self._ttl)
        if self._shared is not None:
            store = self._shared.store
            try:
                await self._shared.link.call(lambda: store.set(key, value, ttl=self._ttl))
            except RedisUnavailable:
                pass  # served anyway; counted and logged by the link

    async def _shared_get(self, key: str) -> CachedImage | None:
        assert self._shared is not None
        store = self._shared.store
        found: CachedImage | None = await self._shared.link.call(lambda: store.get(key))
        if found is not None and self._store is not None:
            await self._store.set(key, found, ttl=self._ttl)
        return found

    async def produce_once(
        self, key: str, produce: Callable[[], Awaitable[CachedImage]]
    ) -> tuple[CachedImage, CacheStatus]:
        """Run `produce` once for all concurrent callers of `key`; every caller gets its outcome.

        The production is shielded: a caller that goes away does not cancel it for the others.
        `produce` decides itself whether its result is stored. With a Redis level, the production
        is also shared with other instances (SharedFlight); the status says who produced.
        """
        task = self._inflight.get(key)
        if task is not None:
            try:
                image, _ = await asyncio.shield(task)
            except ServiceError as exc:
                if not exc.caller_specific:
                    raise
                # The leader was refused for its own reasons (its queue was full): produce for ourselves.
                return await self.produce_once(key, produce)
            return image, CacheStatus.SHARED_WAIT
        task = asyncio.ensure_future(self._produce(key, produce))
        self._inflight[key] = task
        task.add_done_callback(lambda done: self._finished(key, done))
        return await asyncio.shield(task)

    async def _produce(
        self, key: str, produce: Callable[[], Awaitable[CachedImage]]
    ) -> tuple[CachedImage, CacheStatus]:
        # A production that finished between our lookup and now has already stored the image.
        stored, status = await self.lookup(key)
        if stored is not None:
            return stored, CacheStatus.SHARED_WAIT
        if self._shared is None:
            return await produce(), CacheStatus.MISS
        if status is CacheStatus.BYPASS:
            return await produce(), CacheStatus.BYPASS
        try:
            image, waited = await self._shared.flight.run(key, produce, lambda: self._shared_get(key))
        except RedisUnavailable:
            return await produce(), CacheStatus.BYPASS
        except LockWaitExpired:
            log.warning("cache.lock_wait_expired", stage="cache")
            return await produce(), CacheStatus.MISS
        return image, CacheStatus.SHARED_WAIT if waited else CacheStatus.MISS

    def _finished(self, key: str, task: asyncio.Task[tuple[CachedImage, CacheStatus]]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # mark retrieved: waiters that went away must not leave a warning

    async def health(self) -> dict[str, Any]:
        """What /health shows: the backend, whether it answers, the memory level's bytes."""
        info: dict[str, Any] = {
            "backend": self.backend,
            "state": "up",
            "usedBytes": getattr(self._store, "used_bytes", None),
        }
        if self._shared is not None:
            info["state"] = (await self._shared.link.ping()).value
            info["redisFailures"] = self._shared.link.failures
        return info

    async def close(self) -> None:
        if self._store is not None:
            await self._store.close()
        if self._shared is not None:
            await self._shared.store.close()
            await self._shared.link.close()
