"""Per-client fairness: each client key gets a queue with its tier's concurrency, interval and depth.

The pipeline only asks a `Limiter` for a slot (`acquire`) and gives it back (`release`); the
in-memory `MemoryLimiter` is the embedded default and a shared (e.g. Redis) limiter plugs in behind
the same protocol. Time comes from an injectable `Clock`, so tests drive intervals with
`ManualClock` instead of sleeping.

A client whose queue already holds `queue_depth` requests (running plus waiting) is refused at once
with `TooManyRequests` (429, `Retry-After`, `queueInfo`). A key's state is dropped as soon as it is
idle and its interval has passed, so memory follows the number of active clients, not the number
ever seen.
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

# Idle keys are swept at most this often (seconds), or sooner when the table has doubled.
SWEEP_PERIOD = 1.0
MIN_SWEEP_SIZE = 1024


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

    def idle(self, now: float) -> bool:
        return self.running == 0 and not self.waiters and now >= self.next_start


class MemoryLimiter:
    """Fair FIFO queues per key in this process."""

    def __init__(self, clock: Clock | None = None) -> None:
        self._clock: Clock = clock or MonotonicClock()
        self._states: dict[str, _KeyState] = {}
        self._last_sweep = self._clock.now()
        self._sweep_size = MIN_SWEEP_SIZE

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
        if not state.waiters and state.running < limits.concurrency and now >= state.next_start:
            self._start(state, limits)
            return
        turn = asyncio.Event()
        state.waiters.append(turn)
        try:
            while True:
                if state.waiters[0] is turn and state.running < limits.concurrency:
                    delay = state.next_start - self._clock.now()
                    if delay <= 0:
                        break
                    await self._clock.sleep(delay)
                    continue
                turn.clear()
                await turn.wait()
        except BaseException:
            state.waiters.remove(turn)
            self._wake(state)
            raise
        state.waiters.popleft()
        self._start(state, limits)
        self._wake(state)

    async def release(self, key: str) -> None:
        state = self._states.get(key)
        if state is None or state.running == 0:
            return
        state.running -= 1
        if state.idle(self._clock.now()):
            del self._states[key]
        else:
            self._wake(state)

    async def close(self) -> None:
        self._states.clear()

    def _start(self, state: _KeyState, limits: TierSettings) -> None:
        state.running += 1
        state.next_start = self._clock.now() + limits.interval

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
