"""The forwarder: a background task that turns queued events into rows and ships them in batches.

Shaped like OpenTelemetry's batch worker, with a spool where it would drop:

- a batch leaves when it reaches `batch_rows`, or its oldest event is `max_wait` seconds old, or at
  shutdown; bodies stay under `batch_bytes` and sends under `max_requests_per_second`;
- retryable failures (429, 5xx, timeouts, connection errors) back off exponentially with full jitter,
  honouring `Retry-After`; 413 splits the batch; 400/422 are dropped, counted and logged once;
- consecutive failures open a circuit breaker: rows go straight to the disk spool, a half-open probe
  closes it again, and the spool drains in order once the sink is healthy (and on the next start);
- rows of large batches are built by an encoder process (`encoder.py`), off the event loop; a few
  fresh events wait for more, and small batches that have waited long enough, and whatever the
  helper cannot take, are built here. While the Tinybird sink is healthy the helper also makes the
  first delivery attempt itself (`courier.py`), and if it dies its undelivered events are encoded
  again. Rows it could not deliver it writes into the spool itself (`Spool.adopt`), as it does with
  all its rows while the breaker is open or probing, or the sink has failed since its last success:
  the forwarder's own calls (retries, backoff, the breaker) drain them from there, and a failing
  sink's rows never come back through the event loop. The helper's failed deliveries count toward
  the breaker like the forwarder's own calls;
- `close()` flushes within a deadline and spools whatever is left.

The worker never dies: an unexpected error is logged (once per kind) and the loop goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import itertools
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import structlog

from ..config import TrackingSettings
from ..priority import background_executor
from .batch import Rows, concat
from .courier import CourierSettings, Settlement
from .encoder import EncoderProcess, EncoderUnavailable, Reply
from .processor import TELEMETRY, EventQueue, Groups, unpack
from .rows import RowEncoder
from .sinks import Outcome, SendResult, Sink, TinybirdSink
from .spool import SUFFIX, Spool, SpoolUnwritable

log = structlog.get_logger("image_service.tracking")
T = TypeVar("T")

# Seconds between rounds of a forwarder with work in hand. An idle one (nothing in memory, nothing
# to fsync) naps max_wait * FRESH_FRACTION instead, and the queue wakes it with its first event:
# twenty wake-ups a second cost an idle server's loop ~2.5 ms a second here.
POLL_SECONDS = 0.05
# Seconds between asking the helper how its deliveries went, when no frame brought the news: every
# round trip costs the event loop ~0.25 ms whatever it carries.
COLLECT_SECONDS = 0.25
GUARD_SECONDS = 0.02
# Rows encoded between two yields to the event loop: about a third of a millisecond of work.
SERIALISE_SLICE = 32
# Single rows copied into one part of a request body between two yields: about 0.1 ms of copying
# (a frame from the encoder process is a part as it is).
JOIN_SLICE = 256
# Events per round trip to the encoder process: bounded frames keep a backlog moving in steps, and
# copying one frame's reply (~1.2 KB a row) out of the pipe's buffer stays near 0.1 ms.
FRAME_EVENTS = 1024
# Events per round trip when the helper keeps the rows (it delivers or spools them): the reply is
# a few bytes, and every round trip costs the event loop ~0.25 ms whatever its size.
KEPT_FRAME_EVENTS = 4096
# Seconds the encoder process may take on one round trip before new events are encoded in-process.
HELPER_PATIENCE = 0.5
# Fewer events than a helper frame wait in the queue until they are this fraction of max_wait old.
FRESH_FRACTION = 0.5
# Serialised rows kept in memory while a send is slow, in batches; beyond that they go to the spool.
HIGH_WATER_BATCHES = 2


class BreakerState(enum.IntEnum):
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class Breaker:
    """Opens after `failures` consecutive failures; after `cooldown` seconds lets one probe through."""

    def __init__(self, failures: int, cooldown: float, clock: Callable[[], float]) -> None:
        if failures < 1 or cooldown <= 0:
            raise ValueError("breaker needs failures >= 1 and cooldown > 0")
        self._failures, self._cooldown, self._clock = failures, cooldown, clock
        self._consecutive = 0
        self._opened_at: float | None = None

    @property
    def state(self) -> BreakerState:
        if self._opened_at is None:
            return BreakerState.CLOSED
        if self._clock() - self._opened_at >= self._cooldown:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    def success(self) -> None:
        self._consecutive = 0
        self._opened_at = None

    def failure(self) -> None:
        self._consecutive += 1
        if self._opened_at is not None or self._consecutive >= self._failures:
            self._opened_at = self._clock()

    def trip(self) -> None:
        self._opened_at = self._clock()


@dataclass
class ForwarderStats:
    sent: int = 0
    retried: int = 0
    spooled: int = 0
    replayed: int = 0
    quarantined: int = 0
    batches: int = 0
    encoded_elsewhere: int = 0
    delivered_elsewhere: int = 0
    spooled_elsewhere: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    last_success: float | None = None


def _settle(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class _Failed(Exception):
    """A batch could not be delivered now; its rows belong in the spool."""


class Forwarder:
    def __init__(
        self,
        settings: TrackingSettings,
        sink: Sink,
        spool: Spool,
        *,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.settings = settings
        self.sink = sink
        self.spool = spool
        self.queue = EventQueue(settings.queue_size)
        self.stats = ForwarderStats()
        self._encoder = RowEncoder(settings.environment)
        courier = None
        if settings.encoder_process_delivers and isinstance(sink, TinybirdSink):
            # The helper's calls and the forwarder's own share Tinybird's per-datasource limit.
            courier = CourierSettings(
                sink.endpoint, settings.max_requests_per_second / 2, settings.batch_rows, settings.batch_bytes
            )
        self._calls_per_second = settings.max_requests_per_second / (2 if courier else 1)
        self.encoder_process = EncoderProcess(settings.environment, courier) if settings.encoder_process else None
        # Frames the helper is delivering, by ticket: their events are encoded again if it dies.
        self._delivering: dict[int, Groups] = {}
        self._recovered: list[Groups] = []
        self._tickets = itertools.count(1)
        # The helper delivers only while the sink has been taking rows: after a failure, the
        # forwarder's own sends (with their retries) find out when it is healthy again.
        self._courier_trusted = True
        self._last_reply = clock()
        self.breaker = Breaker(settings.breaker_failures, settings.breaker_cooldown, clock)
        self._clock = clock
        self._rand = rand
        self._io = background_executor(1, "telemetry-io")
        self._task: asyncio.Task[None] | None = None
        self._guard: asyncio.Task[None] | None = None
        self._warm_up: asyncio.Task[None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        # Set while a batch from memory is being sent or encoded: the only times the guard has work.
        self._working = asyncio.Event()
        self._stopping = False
        self._closed = False
        self._started_at = clock()
        self._last_send = float("-inf")
        self._last_sync = clock()
        self._inflight = Rows()
        self._pending = Rows()
        self._pending_since = 0.0
        self._busy = False
        self._in_hand = 0
        self._flushing = False
        self._logged: set[str] = set()

    # lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        # A spool left by a run with a larger bound (or by several workers) may not fit this one.
        self._spooled(0, await self._in_io(self.spool.open))
        self._task = asyncio.create_task(self._run(), name="telemetry-forwarder")
        self._guard = asyncio.create_task(self._guard_queue(), name="telemetry-queue-guard")
        self.queue.serve_loop(asyncio.get_running_loop())
        TELEMETRY.default = self.queue

    def start_helper(self) -> None:
        """Start the encoder process now, in the background, instead of with the first batch: a
        cold start takes a second or more, and the batches of that time would be encoded on the
        event loop. Call it once the service is up: a start cancelled half-way (a service whose
        start-up failed) can leave asyncio waiting on the process's pipes."""
        if self.encoder_process is not None and self._warm_up is None:
            self._warm_up = asyncio.create_task(self._start_helper(), name="telemetry-encoder-start")

    async def _start_helper(self) -> None:
        assert self.encoder_process is not None
        try:
            await self.encoder_process.encode([], 0)
        except EncoderUnavailable as exc:
            self._helper_failed(exc)

    async def flush(self, timeout: float = 5.0) -> bool:
        """Send everything queued or spooled now; True when it all reached the sink in time."""
        deadline = self._clock() + timeout
        self._flushing = True
        self._wake_up()
        try:
            while self._holding() and self._clock() < deadline:
                await asyncio.sleep(0.01)
        finally:
            self._flushing = False
        return not self._holding() and not self.spool.has_data()

    def _holding(self) -> bool:
        """Whether any row still waits for the sink (the spool counts while the sink is taking rows)."""
        waiting = (
            self.queue or self.queue.open or self._pending or self._busy or self._in_hand or self._delivering
            or self._recovered
        )
        return bool(waiting) or (self.spool.has_data() and self.breaker.state is BreakerState.CLOSED)

    async def close(self, timeout: float = 10.0) -> None:
        """Flush within `timeout` seconds, spool the rest; idempotent."""
        if self._closed:
            return
        deadline = self._clock() + timeout
        self._closed = True
        self._stopping = True
        self._wake_up()
        self._working.set()
        workers = [task for task in (self._guard, self._task, self._warm_up) if task is not None]
        if workers:
            _, late = await asyncio.wait(workers, timeout=timeout)
            for task in late:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        try:
            # What is left is encoded here: shutdown must not wait on a helper that may be stuck.
            # Deliveries under way get the rest of the deadline; what they leave comes back as rows.
            if self.encoder_process is not None:
                if self._delivering:
                    await self._collect(max(0.0, deadline - self._clock()), abandon=True)
                await self.encoder_process.close()
            self._recover_deliveries()
            self.queue.release_all()
            self.queue.give_back(self._recovered)
            self._recovered = []
            self.queue.closed = True
            leftover = concat([self._inflight, self._pending, await self._serialise(self.queue.take(len(self.queue)))])
            self._inflight, self._pending = Rows(), Rows()
            await self._spill(leftover)
        finally:
            try:
                await self._in_io(self.spool.close)
            finally:
                try:
                    await self.sink.close()
                finally:
                    self._io.shutdown(wait=True)
            if TELEMETRY.default is self.queue:
                TELEMETRY.default = None

    # state for /health and /metrics ---------------------------------------------------------

    def seconds_since_success(self) -> float:
        return self._clock() - (self.stats.last_success if self.stats.last_success is not None else self._started_at)

    def health(self) -> dict[str, Any]:
        return {
            "sink": self.sink.name,
            "breaker": self.breaker.state.name.lower(),
            "queueDepth": len(self.queue) + len(self._pending),
            "spoolBytes": self.spool.total_bytes,
            "secondsSinceLastSuccess": round(self.seconds_since_success(), 3),
            "rowsSent": self.stats.sent,
            "rowsDropped": sum(self.stats.dropped.values()) + self.queue.dropped_full + self.queue.dropped_closed
            + self.spool.stats.rows_missing
            + self.queue.unserialisable,
        }

    # the worker -----------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                progressed = await self._round()
                await self._sync_spool()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._log_once(f"worker:{type(exc).__name__}", "telemetry.worker_error", error=type(exc).__name__)
                progressed = False
            if self._stopping and not self.queue and not self._pending:
                return
            if not progressed:
                await self._rest()

    async def _rest(self) -> None:
        """Nap until the next poll; idle, until the queue's first event or max_wait * FRESH_FRACTION,
        the most a long request's events may wait to be released."""
        queue = self.queue
        if self._holding() or self.spool.needs_sync:
            await self._nap(POLL_SECONDS)
            return
        # Thread-safe: a thread that logs a text event puts it on the queue itself.
        queue.wake = functools.partial(asyncio.get_running_loop().call_soon_threadsafe, self._wake_up)
        try:
            await self._nap(max(POLL_SECONDS, self.settings.max_wait * FRESH_FRACTION))
        finally:
            queue.wake = None

    async def _nap(self, seconds: float) -> None:
        """Sleep up to `seconds`, cut short by flush() and close(): as cheap as asyncio.sleep, where
        wait_for on an Event would start a task on every idle round."""
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(seconds, _settle, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def _wake_up(self) -> None:
        if self._waiter is not None:
            _settle(self._waiter)

    async def _round(self) -> bool:
        settings = self.settings
        await self._absorb()
        if self._delivering and (self._clock() - self._last_reply >= COLLECT_SECONDS or self._flushing or self._stopping):
            await self._collect(0.0)
        pending = self._pending
        if self.breaker.state is BreakerState.OPEN:
            if pending:
                await self._spill(self._take_pending(len(pending)))
            return False
        if pending and (
            len(pending) >= settings.batch_rows
            or time.time() - self._pending_since >= settings.max_wait
            or self._stopping
            or self._flushing
        ):
            # Every row of the batch stays in _inflight until its body is settled, so close() can
            # spool whatever a cancellation leaves undelivered.
            bodies = self._take_pending(settings.batch_rows).split_bytes(settings.batch_bytes)
            self._inflight = concat(bodies)
            with self._sending():
                for index, body in enumerate(bodies):
                    await self._deliver(body, from_spool=False)
                    self._inflight = concat(bodies[index + 1:])
            return True
        if self._stopping or not self.spool.has_data():
            return False
        missing = self.spool.stats.segments_missing
        lines = await self._in_io(self.spool.read_batch, settings.batch_rows, settings.batch_bytes)
        if self.spool.stats.segments_missing > missing:
            log.warning("telemetry.spool_segment_missing", directory=str(self.spool.directory),
                        segments=self.spool.stats.segments_missing, rows_lost=self.spool.stats.rows_missing)
        if not lines:
            return False
        with self._sending():
            await self._deliver(Rows.of_lines(lines), from_spool=True)
        return True

    @contextlib.contextmanager
    def _sending(self) -> Iterator[None]:
        """Mark a send under way: a slow sink holds it for its whole timeout (and retries), and
        meanwhile the guard keeps the queue moving."""
        self._busy = True
        self._working.set()
        try:
            yield
        finally:
            self._busy = False

    def _worth_absorbing(self) -> bool:
        """Whether to encode queued events now. With a helper, a few fresh events wait for more:
        they would be encoded on the event loop, and one encoding at a time keeps the helper's
        work from spilling onto the loop. A helper that lags or rests, shutdown and flush take
        them all (in-process while the helper is busy)."""
        queue = self.queue
        if not queue:
            return False
        helper = self.encoder_process
        if helper is None or not helper.available or self._stopping or self._flushing or self._helper_lagging():
            return True
        if self._in_hand:
            return False
        settings = self.settings
        # A frame's worth at a time (a larger one when the helper keeps the rows): under load, fewer
        # round trips to the helper (each costs the loop ~0.25 ms); a quieter server waits at most
        # max_wait / 2, as any batch does.
        frame = KEPT_FRAME_EVENTS if self._spooling() or self._courier_may_deliver() else FRAME_EVENTS
        enough = min(max(settings.encoder_process_min_events, frame), settings.batch_rows, queue.capacity)
        return len(queue) >= enough or time.time() - (queue.oldest_ts() or 0.0) >= settings.max_wait * FRESH_FRACTION

    async def _absorb(self) -> None:
        """Turn up to a batch of queued events into rows, after releasing the events of requests
        that have run for half of `max_wait`. A batch at a time lets the next one be encoded while
        the previous one is being sent."""
        queue = self.queue
        if self._recovered:
            queue.give_back(self._recovered)
            self._recovered = []
        if queue.open:
            if self._stopping or self._flushing:
                queue.release_all()
            else:
                queue.release_older_than(time.time() - self.settings.max_wait * FRESH_FRACTION)
        if not self._worth_absorbing():
            return
        groups = queue.take(self.settings.batch_rows)
        if not groups.chunks:
            return  # what waited could not be serialised: it is counted, and there is nothing to send
        oldest = groups.since
        # Another absorb may be encoding older events right now: the batch's age is the oldest's.
        self._pending_since = min(self._pending_since, oldest) if self._pending or self._in_hand else oldest
        count = groups.events
        self._in_hand += count
        self._working.set()
        handed: list[tuple[int, int]] = []
        try:
            rows = await self._serialise(groups, handed)
        except BaseException:
            # Shutdown gave up waiting, or encoding failed: the events go back to the front of the
            # queue, for the next round or for close() to spool; frames the helper took for delivery
            # are its (and, if it fails, _recovered's), however their delivery has gone since.
            queue.give_back(groups.without(handed))
            raise
        finally:
            self._in_hand -= count
        self._pending.extend(rows)

    def _take_pending(self, count: int) -> Rows:
        """The oldest `count` rows; what remains keeps the older timestamp, so it leaves no later."""
        return self._pending.take(count)

    async def _deliver(self, rows: Rows, from_spool: bool) -> None:
        try:
            outcome = await self._send(rows)
        except _Failed:
            if not from_spool:
                await self._spill(rows)
            return
        if outcome is Outcome.TOO_LARGE:
            # Each half is delivered from memory and re-spooled if it fails, so the spool segment
            # can be consumed either way.
            for part in rows.halves():
                await self._deliver(part, from_spool=False)
            if from_spool:
                await self._in_io(self.spool.commit, len(rows))
            return
        if outcome is Outcome.SENT:
            self.stats.sent += len(rows)
            self.stats.batches += 1
            if from_spool:
                self.stats.replayed += len(rows)
        if from_spool:
            await self._in_io(self.spool.commit, len(rows))

    async def _send(self, rows: Rows) -> Outcome:
        """One batch through the sink with retries; raises _Failed when it must be spooled."""
        parts = []
        for group in rows.parts(JOIN_SLICE):
            parts.append(b"".join(group))
            await asyncio.sleep(0)
        attempt = 0
        while True:
            await self._respect_rate_limit()
            result = await self.sink.send(parts, len(rows))
            if result.outcome is Outcome.SENT:
                self._succeeded(result)
                return Outcome.SENT
            if result.outcome is Outcome.TOO_LARGE:
                if len(rows) > 1:
                    return Outcome.TOO_LARGE
                self.stats.dropped["too_large"] += 1
                self._log_once("too_large", "telemetry.row_too_large", status=result.status)
                return Outcome.REJECTED
            if result.outcome is Outcome.REJECTED:
                self._rejected(result, len(rows))
                return Outcome.REJECTED
            if result.outcome is Outcome.MISCONFIGURED:
                self._misconfigured(result)
                raise _Failed
            self.breaker.failure()
            attempt += 1
            if self.breaker.state is not BreakerState.CLOSED or attempt > self.settings.max_retries or self._stopping:
                self._log_once(f"failing:{result.status}", "telemetry.sink_failing", status=result.status, detail=result.detail)
                raise _Failed
            self.stats.retried += len(rows)
            delay = result.retry_after
            if delay is None:
                delay = self._rand() * min(self.settings.backoff_cap, self.settings.backoff_base * 2**attempt)
            await self._pause(delay)

    async def _pause(self, seconds: float) -> None:
        """Back off, interruptible by shutdown."""
        end = self._clock() + seconds
        while not self._stopping and self._clock() < end:
            await asyncio.sleep(min(0.1, max(0.0, end - self._clock())))

    async def _guard_queue(self) -> None:
        """While a send is slow or backing off, or the encoder process is slow to answer, keep
        absorbing events (in-process while the helper is busy); spool what exceeds the high-water mark."""
        while not self._stopping:
            if not (self._busy or self._in_hand):
                self._working.clear()
                await self._working.wait()
                continue
            await asyncio.sleep(GUARD_SECONDS)
            try:
                if not (self._busy or self._helper_lagging()) or self._stopping:
                    continue
                await self._absorb()
                excess = len(self._pending) - self.settings.batch_rows * HIGH_WATER_BATCHES
                if excess > 0:
                    await self._spill(self._take_pending(excess))
            except Exception as exc:
                self._log_once(f"guard:{type(exc).__name__}", "telemetry.guard_error", error=type(exc).__name__)

    def _helper_lagging(self) -> bool:
        """Whether the encoder process has taken HELPER_PATIENCE on its current round trip."""
        helper = self.encoder_process
        return helper is not None and helper.busy_for() >= HELPER_PATIENCE

    async def _respect_rate_limit(self) -> None:
        wait = self._last_send + 1.0 / self._calls_per_second - self._clock()
        if wait > 0:
            await asyncio.sleep(wait)
        self._last_send = self._clock()

    # helpers ---------------------------------------------------------------------------------

    async def _serialise(self, groups: Groups, handed: list[tuple[int, int]] | None = None) -> Rows:
        """Rows of the groups' events, in order: from the encoder process when the batch is large
        enough, here for the rest (small batches, and whatever the helper could not take). The
        runs of groups the helper takes for delivery are added to `handed` as it takes them."""
        rows = Rows()
        failures: Counter[str] = Counter()
        elsewhere = done = 0
        helper = self.encoder_process
        # A helper still starting is worth waiting for, until it lags: then the guard encodes here.
        starting = self._warm_up is not None and not self._warm_up.done() and not self._helper_lagging()
        if (
            helper is not None and (not helper.busy or starting)
            and groups.events >= self.settings.encoder_process_min_events
        ):
            # With the breaker open, or probing the sink with one call, or the sink failing since its
            # last success, these rows are bound for the spool: the helper writes them there, and the
            # forwarder's own calls drain them in order once the sink takes rows again.
            spooling = self._spooling()
            kept = spooling or self._courier_may_deliver()
            for first, last in groups.runs(KEPT_FRAME_EVENTS if kept else FRAME_EVENTS):
                if not helper.available:
                    break
                reply = await self._serialise_elsewhere(helper, groups.slice(first, last), spooling)
                if reply is None:
                    break
                if not (reply.delivered or reply.spooled):
                    rows.add(reply.rows, reply.count)
                elif handed is not None:
                    handed.append((first, last))
                elsewhere += reply.count
                if reply.failed:
                    failures[reply.first_error] += reply.failed
                done = last
        if done < len(groups):
            rows.extend(Rows.of_lines(await self._serialise_here(groups.slice(done, len(groups)), failures)))
        # Counted once the whole batch is encoded: a cancelled batch returns to the queue uncounted.
        self.stats.encoded_elsewhere += elsewhere
        for name, count in failures.items():
            self.stats.dropped["unserialisable"] += count
            self._log_once(f"serialise:{name}", "telemetry.unserialisable", error=name)
        return rows

    async def _serialise_here(self, groups: Groups, failures: Counter[str]) -> list[bytes]:
        lines: list[bytes] = []
        try:
            for first, last in groups.runs(SERIALISE_SLICE):
                lines += self._encoder.encode_all(unpack(groups.slice(first, last).chunks), failures)
                await asyncio.sleep(0)
        finally:
            self._encoder.reset()
        return lines

    async def _serialise_elsewhere(self, helper: EncoderProcess, groups: Groups, spooling: bool) -> Reply | None:
        """The encoder process's reply for these groups (rows, a delivery under way, or rows it
        wrote for the spool, adopted here); None when they must be encoded here instead."""
        if self._delivering and not helper.running:
            self._recover_deliveries()
        ticket = next(self._tickets) if spooling or self._courier_may_deliver() else None
        # Where the helper writes the rows it keeps from the sink: all of them when spooling, else
        # those it cannot deliver (now, or when the call fails).
        spool_to = self._incoming(ticket) if ticket is not None else None
        try:
            reply = await helper.encode(groups.chunks, groups.events, None if spooling else ticket, spool_to)
        except Exception as exc:
            self._helper_failed(exc)
            return None
        if reply.delivered and ticket is not None:
            self._delivering[ticket] = groups
        await self._settle(reply.settlements)
        if reply.spooled and spool_to is not None and reply.count:
            await self._adopt(spool_to, reply.count)
        return reply

    async def _adopt(self, path: Path, rows: int) -> None:
        """Take a file of rows the helper wrote for the spool."""
        self._spooled(rows, await self._in_io(self.spool.adopt, path, rows))
        self.stats.spooled_elsewhere += rows

    def _incoming(self, ticket: int) -> Path:
        return self.spool.incoming / f"{os.getpid()}-{ticket}{SUFFIX}"

    def _spooling(self) -> bool:
        return not self._stopping and (self.breaker.state is not BreakerState.CLOSED or not self._courier_trusted)

    def _courier_may_deliver(self) -> bool:
        helper = self.encoder_process
        return (
            helper is not None and helper.courier is not None and self._courier_trusted and not self._stopping
            and self.breaker.state is BreakerState.CLOSED
        )

    async def _collect(self, wait: float, abandon: bool = False) -> None:
        """Hear how the helper's deliveries went (the worker asks when no frame carried the news)."""
        helper = self.encoder_process
        if helper is None or helper.busy:
            return
        if not helper.running:
            self._recover_deliveries()
            return
        try:
            await self._settle(await helper.collect(wait, abandon))
        except Exception as exc:
            self._helper_failed(exc)

    def _helper_failed(self, exc: Exception) -> None:
        # Only the helper's own failures are described: another error's text could quote an event.
        detail = str(exc) if isinstance(exc, EncoderUnavailable) else ""
        self._log_once(f"encoder:{type(exc).__name__}", "telemetry.encoder_unavailable", error=type(exc).__name__, detail=detail)
        self._recover_deliveries()

    def _recover_deliveries(self) -> None:
        """The helper is gone with the frames it was delivering: their events are encoded again
        (rows the sink did take may then arrive twice, under the same event ids)."""
        self._recovered += self._delivering.values()
        self._delivering.clear()

    async def _settle(self, settlements: list[Settlement]) -> None:
        self._last_reply = self._clock()
        for item in settlements:
            if self._delivering.pop(item.ticket, None) is None:
                continue
            result = item.result()
            if result.outcome is Outcome.SENT:
                self._succeeded(result)
                self.stats.sent += item.count
                self.stats.delivered_elsewhere += item.count
                self.stats.batches += 1
                continue
            if result.outcome is Outcome.REJECTED:
                # Never sent again: a 422 means partly written, so a retry would duplicate.
                self._rejected(result, item.count)
                continue
            # A failed call to the sink, whoever made it: a sink that fails the helper's calls opens
            # the breaker without the forwarder's own calls failing first, a timeout at a time.
            if result.outcome is Outcome.RETRY:
                self.breaker.failure()
            elif result.outcome is Outcome.MISCONFIGURED:
                self._misconfigured(result)
            self._courier_trusted = False
            if item.spooled:
                await self._adopt(self._incoming(item.ticket), item.count)
                continue
            # Rows the helper kept from the spool (a 413's, to be split) come back, due at once, as the
            # same bytes (same event ids).
            rows = Rows()
            rows.add(item.rows, item.count)
            due = time.time() - self.settings.max_wait
            self._pending_since = min(self._pending_since, due) if self._pending else due
            self._pending.extend(rows)

    def _misconfigured(self, result: SendResult) -> None:
        """A 401/403/404 will not heal by itself: open the breaker and say what to check, once."""
        self.breaker.trip()
        self._log_once(
            f"misconfigured:{result.status}", "telemetry.sink_misconfigured", status=result.status,
            detail=result.detail, hint="check TINYBIRD_API_KEY, its APPEND scope, and the region host",
        )

    def _rejected(self, result: SendResult, rows: int) -> None:
        self.stats.dropped[f"http_{result.status}"] += rows
        self._log_once(
            f"rejected:{result.status}", "telemetry.batch_rejected", status=result.status, detail=result.detail, rows=rows,
        )

    def _succeeded(self, result: SendResult) -> None:
        self.breaker.success()
        self._courier_trusted = True
        self.stats.last_success = self._clock()
        if result.quarantined:
            self.stats.quarantined += result.quarantined
            log.warning("telemetry.quarantined", rows=result.quarantined)

    async def _spill(self, rows: Rows) -> None:
        if not rows:
            return
        try:
            self._spooled(len(rows), await self._in_io(self.spool.append, rows))
        except SpoolUnwritable as exc:
            # A full or read-only disk: the rows have nowhere left to wait. Counted, and said loudly.
            self._spooled(len(rows) - exc.rows, 0)
            self.stats.dropped["spool_unwritable"] += exc.rows
            self._log_once(f"spool:{exc.error}", "telemetry.spool_unwritable", error=exc.error, rows=exc.rows,
                           directory=str(self.spool.directory))

    def _spooled(self, rows: int, evicted: int) -> None:
        self.stats.spooled += rows
        if evicted:
            self.stats.dropped["spool_full"] += evicted
            log.warning("telemetry.spool_evicted", rows=evicted, max_bytes=self.spool.max_bytes)

    async def _sync_spool(self) -> None:
        if self.spool.needs_sync and self._clock() - self._last_sync >= 1.0:
            self._last_sync = self._clock()
            await self._in_io(self.spool.sync)

    async def _in_io(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._io, function, *args)

    def _log_once(self, key: str, event: str, **fields: Any) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.error(event, **fields)

