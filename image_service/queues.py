"""Per-client fairness: each client key gets a queue with its tier's concurrency, interval and depth.

The pipeline only asks a `Limiter` for a slot (`acquire`) and gives it back (`release`). The one
implementation, `MemoryLimiter`, keeps each key's FIFO queue in this process. Time comes from an
injectable `Clock`, so tests drive intervals with `ManualClock` instead of sleeping.

Alone, it enforces the tier's concurrency and interval per instance. Given a shared slot store
(`limits.RedisLimiter`, when `cache.backend = "redis"`), the request at the head of a local queue
also needs a start slot from the store — `SlotLimit(max_active=concurrency, min_interval=interval)`
— so a client's concurrency cap and spacing hold across every instance. When another instance holds
the slot, the head waits the store's `retry_after` (spacing) or polls with a backoff (a slot in use
elsewhere), on the clock, waking early when a local request finishes; the slot is released in the
store when the generation ends. While Redis is down the store answers from memory, so limits hold
per instance and the service keeps answering.

Queue depth stays per instance: a client whose queue here already holds `queue_depth` requests
(running plus waiting) is refused at once with `TooManyRequests` (429, `Retry-After`, `queueInfo`).
Behind N instances a client may hold up to N × `queue_depth` requests, but only `concurrency` of
them run at once. Sharing the waiting lists would need a crash-safe distributed queue for a limit
whose job — bounding the memory one client ties up — is per instance anyway.

A key's state is dropped as soon as it is idle and its interval has passed, so memory follows the
number of active clients, not the number ever seen.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol

from .config import TIER_ORDER, TierSettings
from .errors import TierRequired, TooManyRequests
from .limits import Grant, SlotLimit
from .limits import Limiter as SlotStore

# Idle keys are swept at most this often (seconds), or sooner when the table has doubled.
SWEEP_PERIOD = 1.0
MIN_SWEEP_SIZE = 1024
# A head waiting for a slot another instance holds polls the store from this interval, doubling up
# to the maximum (seconds).
POLL_FIRST = 0.01
POLL_MAX = 0.25
# A shared slot its instance never released (it crashed) frees itself after this many seconds.
DEFAULT_SLOT_TTL = 120.0


def require_tier(tier: str, model: str, required: str) -> None:
    """The per-model gate (403), applied to cache hits as well as to generations."""
    if TIER_ORDER.index(tier) < TIER_ORDER.index(required):
        raise TierRequired(
            f"model {model!r} needs the {required} tier or above; this request is {tier}",
            requiredTier=required, tier=tier,
        )


class Clock(Protocol):
    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class MonotonicClock:
    """The real clock: `time.monotonic` and `asyncio.sleep`."""

    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class ManualClock:
    """A clock that moves only when told to; sleepers wake when `advance` passes their deadline."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def now(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._order), future))
        await future

    async def advance(self, seconds: float) -> None:
        """Move time forward, wake every sleeper now due, and let them run."""
        self._now += seconds
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, future = heapq.heappop(self._sleepers)
            if not future.done():
                future.set_result(None)
        for _ in range(5):
            await asyncio.sleep(0)


class Limiter(Protocol):
    """A slot per generation, per client key, within the key's tier limits."""

    async def acquire(self, key: str, tier: str, limits: TierSettings) -> None:
        """Wait for a slot; raise TooManyRequests when the key's queue is full."""

    async def release(self, key: str) -> None:
        """Give back a slot obtained by `acquire`."""

    async def close(self) -> None: ...


@asynccontextmanager
async def slot(limiter: Limiter, key: str, tier: str, limits: TierSettings) -> AsyncIterator[None]:
    await limiter.acquire(key, tier, limits)
    try:
        yield
    finally:
        await limiter.release(key)


@dataclass(slots=True)
class _KeyState:
    running: int = 0
    next_start: float = 0.0
    waiters: deque[asyncio.Event] = field(default_factory=deque)
    tokens: deque[str] = field(default_factory=deque)  # shared slots held by the running requests

    def idle(self, now: float) -> bool:
        return self.running == 0 and not self.waiters and now >= self.next_start


class MemoryLimiter:
    """Fair FIFO queues per key in this process; starts also taken from `slots` when it is given."""

    def __init__(
        self, clock: Clock | None = None, slots: SlotStore | None = None, slot_ttl: float = DEFAULT_SLOT_TTL
    ) -> None:
        if slot_ttl <= 0:
            raise ValueError(f"slot_ttl must be positive, got {slot_ttl}")
        self._clock: Clock = clock or MonotonicClock()
        self._slots = slots
        self._slot_ttl = slot_ttl
        self._states: dict[str, _KeyState] = {}
        self._last_sweep = self._clock.now()
        self._sweep_size = MIN_SWEEP_SIZE
        self._returns: set[asyncio.Future[None]] = set()

    @property
    def tracked_keys(self) -> int:
        return len(self._states)

    async def acquire(self, key: str, tier: str, limits: TierSettings) -> None:
        self._sweep()
        state = self._states.get(key)
        if state is None:
            state = self._states[key] = _KeyState()
        now = self._clock.now()
        held = state.running + len(state.waiters)
        if held >= limits.queue_depth:
            waiting = len(state.waiters)
            retry_after = max(state.next_start - now, 0.0) + (waiting + 1) * limits.interval / limits.concurrency
            raise TooManyRequests(
                f"the {tier} tier holds at most {limits.queue_depth} requests per client; retry later",
                retry_after=max(retry_after, 1.0),
                queueInfo={
                    "tier": tier, "running": state.running, "queued": waiting, "queueDepth": limits.queue_depth,
                    "concurrency": limits.concurrency, "interval": limits.interval,
                },
            )
        if (self._slots is None and not state.waiters and state.running < limits.concurrency
                and now >= state.next_start):
            self._start(state, limits, None)
            return
        turn = asyncio.Event()
        state.waiters.append(turn)
        try:
            token = await self._await_turn(key, state, turn, limits)
        except BaseException:
            state.waiters.remove(turn)
            self._wake(state)
            raise
        state.waiters.popleft()
        self._start(state, limits, token)
        self._wake(state)

    async def _await_turn(self, key: str, state: _KeyState, turn: asyncio.Event, limits: TierSettings) -> str | None:
        """Wait until `turn` heads the queue with a free local slot, then take the shared one if any."""
        backoff = POLL_FIRST
        while True:
            if state.waiters[0] is not turn or state.running >= limits.concurrency:
                turn.clear()
                await turn.wait()
                continue
            delay = state.next_start - self._clock.now()
            if delay > 0:
                await self._clock.sleep(delay)
                continue
            if self._slots is None:
                return None
            limit = SlotLimit(limits.concurrency, limits.interval, self._slot_ttl)
            grant = await self._take_shared(self._slots, key, limit)
            if grant.acquired:
                return grant.token
            if grant.retry_after > 0:
                await self._nap(turn, grant.retry_after)
            else:  # another instance holds the slot; its release is not announced, so look again
                await self._nap(turn, backoff)
                backoff = min(backoff * 2, POLL_MAX)

    async def _take_shared(self, slots: SlotStore, key: str, limit: SlotLimit) -> Grant:
        """Ask the store; a request cancelled meanwhile gives back the slot the store granted it."""
        attempt = asyncio.ensure_future(slots.acquire(key, limit))
        try:
            return await asyncio.shield(attempt)
        except asyncio.CancelledError:
            attempt.add_done_callback(lambda done: self._return_abandoned(slots, key, done))
            raise

    def _return_abandoned(self, slots: SlotStore, key: str, attempt: asyncio.Future[Grant]) -> None:
        if attempt.cancelled() or attempt.exception() is not None:
            return
        token = attempt.result().token
        if token is not None:
            giving_back = asyncio.ensure_future(slots.release(key, token))
            self._returns.add(giving_back)
            giving_back.add_done_callback(self._returns.discard)

    async def _nap(self, turn: asyncio.Event, seconds: float) -> None:
        """Sleep on the clock, or less when a local request finishes (it freed a shared slot too)."""
        turn.clear()
        sleeper = asyncio.ensure_future(self._clock.sleep(seconds))
        woken = asyncio.ensure_future(turn.wait())
        try:
            await asyncio.wait({sleeper, woken}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            woken.cancel()

    async def release(self, key: str) -> None:
        state = self._states.get(key)
        if state is None or state.running == 0:
            return
        # Slots of one key are interchangeable: give back the oldest, the nearest to its expiry.
        token = state.tokens.popleft() if state.tokens else None
        try:
            if token is not None and self._slots is not None:
                await asyncio.shield(self._slots.release(key, token))  # completes even if we are cancelled
        finally:
            state.running -= 1
            if state.idle(self._clock.now()) and self._states.get(key) is state:
                del self._states[key]
            else:
                self._wake(state)

    async def close(self) -> None:
        """Forget the queues; give back the slots of abandoned requests. The store is the cache's."""
        await asyncio.gather(*self._returns, return_exceptions=True)
        self._states.clear()

    def _start(self, state: _KeyState, limits: TierSettings, token: str | None) -> None:
        state.running += 1
        state.next_start = self._clock.now() + limits.interval
        if token is not None:
            state.tokens.append(token)

    def _wake(self, state: _KeyState) -> None:
        if state.waiters:
            state.waiters[0].set()

    def _sweep(self) -> None:
        """Forget idle keys, once per period or when the table doubled: amortised O(1) per acquisition."""
        now = self._clock.now()
        if now - self._last_sweep < SWEEP_PERIOD and len(self._states) < self._sweep_size:
            return
        self._last_sweep = now
        for key in [key for key, state in self._states.items() if state.idle(now)]:
            del self._states[key]
        self._sweep_size = max(MIN_SWEEP_SIZE, 2 * len(self._states))
