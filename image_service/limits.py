"""Limiter state: per-key concurrency slots and start spacing, atomic, in process or shared through Redis.

This is the storage layer that per-client queues and rate limits are built on; it holds no policy.
A key is whatever is limited (a client, a tier, a model). For each key the limiter keeps the slots in
use and the time of the last start, and `acquire` grants a slot only when both allow it:

    acquire(key, limit)  → Grant   a slot when fewer than `limit.max_active` are held on the key AND
                                   at least `limit.min_interval` seconds passed since the last start;
                                   otherwise acquired=False and, when spacing is what refused,
                                   `retry_after` says how long until it would allow a start.
    release(key, token)            frees the slot (idempotent; unknown tokens are ignored).

Each check-and-take is atomic: one Lua script in Redis, no await between check and take in memory.
A slot that is never released (its instance crashed) frees itself after `limit.slot_ttl` seconds,
so a dead instance cannot hold a client's slots forever. Waiting, queueing and fairness belong to the
caller: poll `acquire` after `retry_after`, or after another request's `release`.

`build_shared_limiter` returns a `RedisLimiter` for `cache.backend = "redis"` (None otherwise): the
app keeps it as `app[SLOTS]`, and the per-client queues (`queues.MemoryLimiter`, `app[LIMITER]`)
take each start slot from it, so a client's tier limits hold across instances. Without Redis the
queues' own state is the whole limit and no store is used. While Redis is unreachable `RedisLimiter`
falls back to its own `InMemoryLimiter`: limits then hold per instance (`Grant.shared` is False)
until Redis returns. Redis keys carry a digest of the limited key, never a client address or user.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from .config import CacheSettings
from .redis_state import RedisLink, RedisUnavailable

# KEYS: slots (sorted set token → expiry ms), last (string: last start ms).
# ARGV: max_active, min_interval ms, slot ttl ms, token. Times are Redis server time, the one clock
# every instance shares. Returns {acquired 0/1, active slots after the call, last start ms before
# the call or -1, retry_after ms}.
ACQUIRE_SCRIPT = """
local slots, last = KEYS[1], KEYS[2]
local max_active, interval, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', slots, '-inf', now)
local active = redis.call('ZCARD', slots)
local previous = tonumber(redis.call('GET', last) or '-1')
local wait = 0
if previous >= 0 and now - previous < interval then wait = interval - (now - previous) end
if active >= max_active or wait > 0 then return {0, active, previous, wait} end
redis.call('ZADD', slots, now + ttl, ARGV[4])
redis.call('PEXPIRE', slots, ttl)
redis.call('SET', last, now, 'PX', math.max(interval, ttl))
return {1, active + 1, previous, 0}
"""
RELEASE_SCRIPT = "return redis.call('ZREM', KEYS[1], ARGV[1])"


@dataclass(frozen=True, slots=True)
class SlotLimit:
    """How much of one key may run: concurrent slots, spacing between starts, lifetime of a lost slot."""

    max_active: int
    min_interval: float = 0.0
    slot_ttl: float = 300.0

    def __post_init__(self) -> None:
        if self.max_active < 1:
            raise ValueError(f"max_active must be at least 1, got {self.max_active}")
        if self.min_interval < 0:
            raise ValueError(f"min_interval must not be negative, got {self.min_interval}")
        if self.slot_ttl <= 0:
            raise ValueError(f"slot_ttl must be positive, got {self.slot_ttl}")


@dataclass(frozen=True, slots=True)
class Grant:
    """The answer to one `acquire`."""

    acquired: bool
    token: str | None  # pass to release(); None when refused
    active: int  # slots held on the key after this call
    last_start: float | None  # epoch seconds of the previous start on the key, None if none is known
    retry_after: float  # seconds until spacing allows a start; 0 when spacing did not refuse
    shared: bool  # True when decided by state every instance sees


class Limiter(Protocol):
    async def acquire(self, key: str, limit: SlotLimit) -> Grant: ...

    async def release(self, key: str, token: str) -> None: ...

    async def close(self) -> None: ...


@dataclass
class _KeyState:
    slots: dict[str, float] = field(default_factory=dict)  # token → expiry (epoch seconds)
    last_start: float | None = None
    min_interval: float = 0.0


# The in-memory table is swept of idle keys whenever it reaches this size (or twice its last size).
MIN_SWEEP_KEYS = 1024
# Releases kept for retry after Redis failed them; past this, the oldest wait out their slot_ttl.
UNRELEASED_SLOTS = 10_000


class InMemoryLimiter:
    """Limiter state in this process: limits hold per instance."""

    def __init__(self) -> None:
        self._keys: dict[str, _KeyState] = {}
        self._sweep_at = MIN_SWEEP_KEYS

    async def acquire(self, key: str, limit: SlotLimit) -> Grant:
        return self.acquire_now(key, limit)

    def acquire_now(self, key: str, limit: SlotLimit) -> Grant:
        """The synchronous core: nothing can interleave between the check and the take."""
        now = time.time()
        if len(self._keys) >= self._sweep_at:
            self._sweep(now)
        state = self._keys.setdefault(key, _KeyState())
        state.slots = {token: expiry for token, expiry in state.slots.items() if expiry > now}
        previous = state.last_start
        wait = 0.0
        if previous is not None and now - previous < limit.min_interval:
            wait = limit.min_interval - (now - previous)
        if len(state.slots) >= limit.max_active or wait > 0:
            return Grant(False, None, len(state.slots), previous, wait, shared=False)
        token = uuid.uuid4().hex
        state.slots[token] = now + limit.slot_ttl
        state.last_start = now
        state.min_interval = limit.min_interval
        return Grant(True, token, len(state.slots), previous, 0.0, shared=False)

    def _sweep(self, now: float) -> None:
        """Drop keys with no live slot whose spacing has passed (a release can come before that)."""
        self._keys = {
            key: state for key, state in self._keys.items()
            if any(expiry > now for expiry in state.slots.values())
            or (state.last_start is not None and now - state.last_start < state.min_interval)
        }
        self._sweep_at = max(MIN_SWEEP_KEYS, 2 * len(self._keys))

    def holds(self, key: str, token: str) -> bool:
        state = self._keys.get(key)
        return state is not None and token in state.slots

    async def release(self, key: str, token: str) -> None:
        state = self._keys.get(key)
        if state is None:
            return
        state.slots.pop(token, None)
        # Forget an idle key once its spacing can no longer refuse anything: memory stays bounded.
        if not state.slots and (state.last_start is None or time.time() - state.last_start >= state.min_interval):
            del self._keys[key]

    async def close(self) -> None:
        self._keys.clear()


class RedisLimiter:
    """Limiter state in Redis, so limits hold across instances; in-memory while Redis is down."""

    def __init__(self, link: RedisLink, key_prefix: str) -> None:
        self._link = link
        self._prefix = f"{key_prefix}limit:"
        self._acquire = link.client.register_script(ACQUIRE_SCRIPT)
        self._release = link.client.register_script(RELEASE_SCRIPT)
        self._fallback = InMemoryLimiter()
        # Slots whose release Redis did not take (a stall, an outage): released once it answers,
        # instead of blocking their client until slot_ttl (two minutes by default).
        self._unreleased: deque[tuple[str, str]] = deque(maxlen=UNRELEASED_SLOTS)

    def _keys(self, key: str) -> list[str]:
        # A digest, so Redis holds no client address; the hash tag keeps both keys in one Cluster slot.
        digest = hashlib.blake2b(key.encode(), digest_size=16).hexdigest()
        return [f"{self._prefix}{{{digest}}}:slots", f"{self._prefix}{{{digest}}}:last"]

    async def acquire(self, key: str, limit: SlotLimit) -> Grant:
        if self._unreleased:
            await self._release_pending()
        token = uuid.uuid4().hex
        args: list[int | str] = [
            limit.max_active, round(limit.min_interval * 1000), max(1, round(limit.slot_ttl * 1000)), token,
        ]
        try:
            acquired, active, previous, wait = await self._link.call(
                lambda: self._acquire(keys=self._keys(key), args=args)
            )
        except RedisUnavailable:
            return self._fallback.acquire_now(key, limit)
        return Grant(
            acquired=bool(acquired),
            token=token if acquired else None,
            active=int(active),
            last_start=int(previous) / 1000 if int(previous) >= 0 else None,
            retry_after=int(wait) / 1000,
            shared=True,
        )

    async def release(self, key: str, token: str) -> None:
        if self._fallback.holds(key, token):
            await self._fallback.release(key, token)
            return
        try:
            await self._release_in_redis(key, token)
        except RedisUnavailable:
            self._unreleased.append((key, token))

    async def _release_in_redis(self, key: str, token: str) -> None:
        await self._link.call(lambda: self._release(keys=self._keys(key)[:1], args=[token]))

    async def _release_pending(self) -> None:
        """Release what an earlier outage left held, oldest first, until Redis fails again."""
        while self._unreleased:
            key, token = self._unreleased[0]
            try:
                await self._release_in_redis(key, token)
            except RedisUnavailable:
                return
            if self._unreleased and self._unreleased[0] == (key, token):
                self._unreleased.popleft()

    async def close(self) -> None:
        """The link belongs to the cache, which closes it."""
        await self._fallback.close()


def build_shared_limiter(settings: CacheSettings, link: RedisLink | None) -> Limiter | None:
    """The slot store instances share, when there is one (the `redis` backend)."""
    if settings.backend == "redis" and link is not None:
        return RedisLimiter(link, settings.key_prefix)
    return None
