"""Redis as the state several instances share: one guarded connection and cross-instance generation locks.

Redis is an optimisation, never a dependency of answering: every operation goes through `RedisLink`,
which bounds it by `cache.redis_timeout` and, after a failure, stops calling Redis for a backoff that
doubles up to `cache.redis_backoff_max` (a small circuit breaker). Callers catch `RedisUnavailable`
and carry on without the shared state; the first call after the backoff is the one probe that closes
the breaker again when Redis is back (concurrent calls keep skipping meanwhile).

`SharedFlight` makes N instances that miss the same image cause one generation: the first takes a lock
(`SET NX PX`) and renews it while it generates; the others poll, with backoff, for the stored image.
A holder that dies stops renewing, so its lock expires after `cache.lock_ttl` and a waiter takes over.
A holder whose generation fails publishes the error (for `lock_ttl`) before releasing the lock, so its
waiters answer with it, as in-process waiters do, instead of retrying it one instance after another.
"""

from __future__ import annotations

import asyncio
import enum
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
import structlog

from .errors import ServiceError, SharedGenerationError

log = structlog.get_logger("image_service.redis")

T = TypeVar("T")

# The first backoff after a failure, in seconds; it doubles per failure up to redis_backoff_max.
BREAKER_FIRST_BACKOFF = 0.25
# Waiters poll for another instance's result starting at this interval, doubling up to the maximum.
POLL_FIRST = 0.01
POLL_MAX = 0.25

# Delete / extend the lock only while it is still ours: a lock that expired may be someone else's now.
RELEASE_LOCK = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"
RENEW_LOCK = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end"
)


class RedisUnavailable(Exception):
    """Redis failed, was too slow, or is being skipped while the breaker is open."""


class LockWaitExpired(Exception):
    """Another instance's production of the same image outlasted `cache.lock_wait`."""


class LinkState(enum.StrEnum):
    UP = "up"
    DOWN = "down"


class Breaker:
    """Closed until a failure; then open for a backoff that doubles per failure; a success closes it."""

    def __init__(self, max_backoff: float, clock: Callable[[], float] = time.monotonic) -> None:
        if max_backoff <= 0:
            raise ValueError(f"max_backoff must be positive, got {max_backoff}")
        self._max_backoff = max_backoff
        self._clock = clock
        self._backoff = 0.0
        self._retry_at = 0.0
        self.failures = 0

    @property
    def state(self) -> LinkState:
        return LinkState.DOWN if self._backoff else LinkState.UP

    def admit(self) -> bool:
        """May a call go to Redis now? While down, only one probe per backoff is let through."""
        if not self._backoff:
            return True
        now = self._clock()
        if now < self._retry_at:
            return False
        self._retry_at = now + self._backoff  # the others keep skipping while the probe runs
        return True

    def failed(self) -> bool:
        """Record a failure; True when it turned the link from up to down."""
        self.failures += 1
        opened = not self._backoff
        self._backoff = min(self._max_backoff, self._backoff * 2 or BREAKER_FIRST_BACKOFF)
        self._retry_at = self._clock() + self._backoff
        return opened

    def succeeded(self) -> bool:
        """Record a success; True when it brought the link back up."""
        recovered = bool(self._backoff)
        self._backoff = 0.0
        self._retry_at = 0.0
        return recovered


# Connections to Redis per process, as redis-py's default pool has.
MAX_CONNECTIONS = 100


def connect(url: str, timeout: float, max_connections: int = MAX_CONNECTIONS) -> aioredis.Redis:
    """A client for `url` whose connects and commands give up after `timeout` seconds. A call finding
    every connection busy waits for one (as long): redis-py's own pool refuses it at once, and under
    a burst of 200 connections that refusal opened the breaker and sent hits to generation."""
    parts = urlsplit(url)
    pool = aioredis.BlockingConnectionPool(
        max_connections=max_connections,
        timeout=timeout,
        connection_class=aioredis.SSLConnection if parts.scheme == "rediss" else aioredis.Connection,
        host=parts.hostname or "127.0.0.1",
        port=parts.port or 6379,
        db=int(parts.path.strip("/") or 0),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        decode_responses=False,
        # What redis-py gives a client it builds itself: a connection Redis closed (a restart, its
        # idle timeout) is retried on a fresh one instead of counting as Redis down.
        retry=Retry(ExponentialWithJitterBackoff(base=0.01, cap=1.0), 3),
    )
    return aioredis.Redis(connection_pool=pool)


class RedisLink:
    """Every Redis call of the service: bounded in time, counted when it fails, skipped while down."""

    def __init__(self, client: aioredis.Redis, timeout: float, max_backoff: float) -> None:
        self.client = client
        self._timeout = timeout
        self._breaker = Breaker(max_backoff)

    @property
    def state(self) -> LinkState:
        return self._breaker.state

    @property
    def failures(self) -> int:
        return self._breaker.failures

    async def call(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Run one Redis operation; raises RedisUnavailable instead of waiting on a sick Redis."""
        if not self._breaker.admit():
            raise RedisUnavailable("skipped while Redis is down")
        try:
            async with asyncio.timeout(self._timeout):
                result = await operation()
        except (aioredis.RedisError, OSError, TimeoutError) as exc:
            if self._breaker.failed():
                log.warning("redis.down", error=type(exc).__name__, failures=self._breaker.failures)
            raise RedisUnavailable(type(exc).__name__) from exc
        if self._breaker.succeeded():
            log.warning("redis.recovered", failures=self._breaker.failures)
        return result

    async def ping(self) -> LinkState:
        """Probe Redis (when the breaker allows a call) and report the resulting state."""
        try:
            await self.call(self.client.ping)
        except RedisUnavailable:
            pass
        return self.state

    async def close(self) -> None:
        await self.client.aclose(close_connection_pool=True)


class SharedFlight:
    """One generation per image across instances: a renewed lock for the producer, polling for the rest."""

    def __init__(self, link: RedisLink, key_prefix: str, lock_ttl: float, lock_wait: float) -> None:
        if lock_ttl <= 0 or lock_wait <= 0:
            raise ValueError("lock_ttl and lock_wait must be positive")
        self._link = link
        self._prefix = f"{key_prefix}lock:"
        self._failed_prefix = f"{key_prefix}failed:"
        self._ttl_ms = max(1, int(lock_ttl * 1000))
        self._wait = lock_wait
        self._release = link.client.register_script(RELEASE_LOCK)
        self._renew = link.client.register_script(RENEW_LOCK)

    def lock_key(self, key: str) -> str:
        return self._prefix + key

    async def run(
        self,
        key: str,
        produce: Callable[[], Awaitable[T]],
        lookup: Callable[[], Awaitable[T | None]],
    ) -> tuple[T, bool]:
        """Produce under the lock, or wait for whoever holds it; returns (value, waited for another).

        `lookup` reads the stored result (raising RedisUnavailable like every Redis call); `produce`
        must store its result before returning, so waiters find it. Raises RedisUnavailable when Redis
        fails before a producer is settled, and LockWaitExpired when another instance's production
        outlasts `lock_wait`; the caller then produces without the lock.
        """
        lock, failed = self.lock_key(key), self._failed_prefix + key
        deadline = time.monotonic() + self._wait
        while True:
            token = uuid.uuid4().hex
            if await self._link.call(lambda: self._link.client.set(lock, token, nx=True, px=self._ttl_ms)):
                return await self._hold(lock, failed, token, produce), False
            found = await self._await_holder(lock, failed, lookup, deadline)
            if found is not None:
                return found, True

    async def _await_holder(
        self, lock: str, failed: str, lookup: Callable[[], Awaitable[T | None]], deadline: float
    ) -> T | None:
        """Poll until the holder's result appears (returned), its failure is published (raised), or
        its lock is gone without either (None: the holder died; try to take the lock)."""
        delay = POLL_FIRST
        holder: bytes | str | None = None
        while True:
            if time.monotonic() + delay > deadline:
                raise LockWaitExpired("another instance's generation outlasted lock_wait")
            await asyncio.sleep(delay)
            delay = min(delay * 2, POLL_MAX)
            found = await lookup()
            if found is not None:
                return found
            current: bytes | str | None = await self._link.call(lambda: self._link.client.get(lock))
            if current is not None:
                holder = current
                continue
            # The holder stores (or publishes its failure) before it releases: look once more.
            found = await lookup()
            if found is None and holder is not None:
                await self._raise_published_failure(failed, holder.decode() if isinstance(holder, bytes) else holder)
            return found

    async def _raise_published_failure(self, failed: str, holder: str) -> None:
        raw = await self._link.call(lambda: self._link.client.get(failed))
        if raw is None:
            return
        try:
            data = orjson.loads(raw)
            if data["holder"] != holder:
                return  # an older failure, not the one of the holder we waited for
            status, code, message, details = data["status"], data["code"], data["message"], data["details"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return
        if (isinstance(status, int) and 400 <= status <= 599 and isinstance(code, str) and isinstance(message, str)
                and isinstance(details, dict)):
            raise SharedGenerationError(message, status=status, code=code, **details)

    async def _publish_failure(self, failed: str, token: str, exc: ServiceError) -> None:
        """Let the waiters answer with this failure instead of retrying it one instance at a time."""
        record = {"holder": token, "status": exc.status, "code": exc.code, "message": exc.message}
        try:
            payload = orjson.dumps({**record, "details": exc.details})
        except TypeError:
            payload = orjson.dumps({**record, "details": {}})
        try:
            await self._link.call(lambda: self._link.client.set(failed, payload, px=self._ttl_ms))
        except RedisUnavailable:
            pass  # the waiters see a vanished lock and try themselves

    async def _hold(self, lock: str, failed: str, token: str, produce: Callable[[], Awaitable[T]]) -> T:
        renewer = asyncio.ensure_future(self._keep_renewing(lock, token))
        try:
            return await produce()
        except ServiceError as exc:
            if not exc.caller_specific:
                await self._publish_failure(failed, token, exc)
            raise
        finally:
            renewer.cancel()
            await asyncio.gather(renewer, return_exceptions=True)
            try:
                await self._link.call(lambda: self._release(keys=[lock], args=[token]))
            except RedisUnavailable:
                pass  # the lock expires by itself after lock_ttl

    async def _keep_renewing(self, lock: str, token: str) -> None:
        while True:
            await asyncio.sleep(self._ttl_ms / 3000)
            try:
                renewed: Any = await self._link.call(lambda: self._renew(keys=[lock], args=[token, self._ttl_ms]))
            except RedisUnavailable:
                continue
            if not renewed:
                log.warning("cache.lock_lost")
                return
