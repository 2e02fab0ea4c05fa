"""The structlog processor that hands telemetry events to a forwarder without blocking.

It runs first in the chain, before the request context is merged in. It keeps the event's own
fields (a request's events as the dicts structlog made, their times beside them) and returns the
event unchanged; it never raises, never awaits and does no I/O.

A request's events wait in the request (`RequestEvents`) until its terminal event, then go, with a
reference to its context, onto the bounded queue of the forwarder serving it. The queue serialises
the groups of CHUNK_GROUPS requests at a time, each context once per request instead of once per
event, into one chunk that the garbage collector never scans and the forwarder hands on as it is.
Rows carry a request's context as it stands when its chunk is serialised: after its terminal
event, for all but requests that run long. Their events go sooner: the forwarder releases events
that have waited `max_wait / 2`. Text events, and events outside any request, are queued as they
come.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import time
from array import array
from bisect import bisect_right
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextvars import ContextVar
from itertools import accumulate
from threading import get_ident
from typing import Any

import orjson
from structlog.typing import EventDict, WrappedLogger

from .context import current as current_context
from .rows import TERMINAL_EVENT, TEXT_EVENT

Buffer = bytes | bytearray | memoryview
# Groups serialised in one orjson call. Counted, telemetry cost a cache hit ~16,000 fewer estimated
# cycles (of ~58,000) once groups were serialised 16 at a time and kept as chunks, instead of one
# call a group appended to one growing buffer; chunks of 8, 32 or 64 groups cost more than 16.
CHUNK_GROUPS = 16


def printable(value: Any) -> str:
    """`value` as text any encoder accepts: lone surrogates (the undecodable bytes of a header, kept
    by aiohttp's surrogateescape) become backslash escapes."""
    return str(value).encode("utf-8", "backslashreplace").decode("utf-8")


def lenient(fields: Mapping[str, Any]) -> dict[str, Any]:
    """`fields` with every key as text and every value orjson refuses (an integer past 64 bits, a
    cycle, a lone surrogate) as its printable text."""
    kept = {}
    for key, value in fields.items():
        try:
            orjson.dumps(value, default=str)
        except Exception:
            value = printable(value)
        kept[printable(key)] = value
    return kept


def unpack(chunks: Iterable[Buffer]) -> list[dict[str, Any]]:
    """The events of serialised chunks (`Groups.chunks`: each a JSON array of groups), each with
    its context under `_ctx` and an `event_id` that the group determines (32 hex digits): rows
    built again from the same group (after the encoder process died, say) carry the same ids, so
    the sink can drop the copies."""
    events: list[dict[str, Any]] = []
    for chunk in chunks:
        for context, members, *times in orjson.loads(chunk):
            if times:
                for event, moment in zip(members, times[0]):
                    event["_ts"] = moment
            request_id = context.get("request_id") if context is not None else None
            first = members[0].get("_ts") if members else None
            named = prefix = None
            for index, event in enumerate(members):
                if context is not None:
                    event["_ctx"] = context
                owner = request_id or event.get("request_id")
                if owner and "event_id" not in event:
                    if owner != named:
                        named, prefix = owner, _id_prefix(owner, first, members[0].get("event"))
                    event["event_id"] = f"{prefix}{index:04x}"
            events += members
    return events


def _id_prefix(owner: str, first: Any, name: Any) -> str:
    """28 hex digits naming one group of a request: its id, its first event's time and name (events
    queued one by one are groups of their own). The event's place in the group completes its id:
    one hash a group, not one an event (~2 µs each in the encoder process)."""
    return hashlib.blake2b(f"{owner}/{first!r}/{name}".encode(), digest_size=14).hexdigest()


def _fitting(totals: list[int], first: int, limit: int) -> int:
    """Where a run of chunks from `first` ends: `totals` are the chunks' running event counts, and
    the run stays within `limit` of them, but holds at least one chunk, whatever its size."""
    return max(bisect_right(totals, limit, first), first + 1)


class Groups:
    """Serialised groups, in order, in chunks: each chunk is a JSON array of groups (`[context,
    [event, ...], [time, ...]]`; without the times, each event carries its `_ts`), the form
    `unpack` reads and the encoder process is sent as it is. `counts` and `sinces` hold each
    chunk's events and its oldest event's time. Slices share the chunks they were cut from."""

    __slots__ = ("chunks", "counts", "events", "sinces")

    def __init__(self, chunks: list[bytes], counts: array[int], sinces: array[float]) -> None:
        self.chunks, self.counts, self.sinces = chunks, counts, sinces
        self.events = sum(counts)

    def __len__(self) -> int:
        return len(self.chunks)

    @property
    def since(self) -> float:
        """When the oldest event was emitted (a request that ran long comes after younger ones)."""
        return min(self.sinces)

    def slice(self, first: int, last: int) -> Groups:
        """Chunks `first` to `last - 1`."""
        return Groups(self.chunks[first:last], self.counts[first:last], self.sinces[first:last])

    def runs(self, events: int) -> list[tuple[int, int]]:
        """Consecutive runs (`first`, `last`) of up to `events` events each (a larger chunk on its own)."""
        totals = list(accumulate(self.counts))
        runs = []
        first = done = 0
        while first < len(totals):
            last = _fitting(totals, first, done + events)
            runs.append((first, last))
            first, done = last, totals[last - 1]
        return runs

    def without(self, runs: list[tuple[int, int]]) -> list[Groups]:
        """The chunks outside `runs` (ascending, not overlapping), as slices."""
        kept, first = [], 0
        for start, end in [*runs, (len(self), len(self))]:
            if start > first:
                kept.append(self.slice(first, start))
            first = end
        return kept

    @classmethod
    def join(cls, parts: Sequence[Groups]) -> Groups:
        chunks: list[bytes] = []
        counts, sinces = array("I"), array("d")
        for part in parts:
            chunks += part.chunks
            counts += part.counts
            sinces += part.sinces
        return cls(chunks, counts, sinces)


class EventQueue:
    """A bounded FIFO of groups of events, measured in events; the forwarder drains it.

    Groups wait unserialised until CHUNK_GROUPS of them are queued, then are serialised together
    into one chunk, which the garbage collector never scans: a request leaves no object of its own
    behind for long, and taking the queue moves chunks, not their bytes. Per-request bytes objects,
    kept until their frame was delivered, cost the loop more in allocation and cache misses than
    serialising them did; one buffer for the whole queue cost it as much again in copies as it grew."""

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"queue capacity must be positive, got {capacity}")
        self.capacity = capacity
        self._reset()
        # Groups not yet serialised, their events, and the oldest of their times.
        self._waiting: list[tuple[Any, ...]] = []
        self._waiting_events = 0
        self._waiting_since = math.inf
        self.events = 0
        self.enqueued = 0
        self.dropped_full = 0
        self.closed = False
        self.dropped_closed = 0
        self.unserialisable = 0
        # Requests with events waiting for their terminal event.
        self.open: set[RequestEvents] = set()
        # Set by an idle forwarder: called (once) with the next group.
        self.wake: Callable[[], object] | None = None
        # The loop that drains the queue, and its thread: groups from other threads are handed to it.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: int | None = None

    def serve_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Only `loop`'s thread touches the queue from now on: a group put from another thread (a
        text service's worker thread, say) is handed over with `call_soon_threadsafe`."""
        self._loop, self._thread = loop, get_ident()

    def _reset(self) -> None:
        self._chunks: list[bytes] = []
        self._counts: array[int] = array("I")
        self._sinces: array[float] = array("d")

    def __len__(self) -> int:
        return self.events

    def put(self, event: dict[str, Any]) -> None:
        """One event; its `_ctx`, if any, travels as its context."""
        event = dict(event)
        self.put_group(event.pop("_ctx", None), [event])

    def put_group(
        self, context: dict[str, Any] | None, events: Sequence[Mapping[str, Any]], times: list[float] | None = None
    ) -> None:
        """Events sharing one context, with their emission times (`times`, else each event's own
        `_ts`), serialised with the groups queued around them: the context as it stands then. On
        the loop's thread only (`put_group_from_any_thread` elsewhere)."""
        count = len(events)
        if self.closed:
            self.dropped_closed += count
            return
        if self.events + count > self.capacity:
            self.dropped_full += count
            return
        waiting = self._waiting
        if times is not None:
            since = times[0]
            waiting.append((context, events, times))
        else:
            stamp = events[0].get("_ts")
            since = stamp if isinstance(stamp, float) else time.time()
            waiting.append((context, events))
        if since < self._waiting_since:  # noqa: PLR1730 (min() parses keywords: ~900 cycles a request, counted)
            self._waiting_since = since
        self._waiting_events += count
        self.events += count
        self.enqueued += count
        if len(waiting) >= CHUNK_GROUPS:
            self._seal()
        wake = self.wake
        if wake is not None:
            self.wake = None
            wake()

    def put_group_from_any_thread(self, context: dict[str, Any] | None, events: Sequence[Mapping[str, Any]]) -> None:
        """`put_group`, handed to the loop's thread when called from another: the queue's lists are
        not safe to change from two threads (rows were lost, others sent twice). Text events and
        events outside requests come this way; a request's events are put on the loop, unchecked."""
        loop = self._loop
        if loop is None or get_ident() == self._thread:
            self.put_group(context, events)
            return
        try:
            loop.call_soon_threadsafe(self.put_group, context, events)
        except RuntimeError:  # the loop closed: so did the forwarder
            self.dropped_closed += len(events)

    def _seal(self, each: bool = False) -> None:
        """Serialise the waiting groups into one chunk (`each`: one chunk a group, so that taking
        stops on a group boundary). A value orjson refuses travels as its text (rows check every
        value's type anyway); a group that still fails is counted."""
        waiting, self._waiting = self._waiting, []
        count, self._waiting_events = self._waiting_events, 0
        since, self._waiting_since = self._waiting_since, math.inf
        if not waiting:
            return
        if not each:
            # A group orjson refuses fails the whole call: then the groups go one at a time.
            with contextlib.suppress(Exception):
                self._add(orjson.dumps(waiting, default=str), count, since)
                return
        for context, events, *times in waiting:
            size = len(events)
            first = times[0][0] if times else events[0].get("_ts")
            try:
                data = orjson.dumps([(context, events, *times)], default=str)
            except Exception:
                try:
                    kept = (None if context is None else lenient(context), [lenient(event) for event in events])
                    data = orjson.dumps([(*kept, *times)], default=str)
                except Exception:
                    self.unserialisable += size
                    self.events -= size
                    continue
            self._add(data, size, first if isinstance(first, float) else since)

    def _add(self, chunk: bytes, count: int, since: float) -> None:
        self._chunks.append(chunk)
        self._counts.append(count)
        self._sinces.append(since)

    def oldest_ts(self) -> float | None:
        sinces = [*self._sinces, self._waiting_since] if self._waiting else self._sinces
        return min(sinces) if sinces else None

    def take(self, limit: int) -> Groups:
        """The oldest chunks, up to `limit` events (at least one chunk, whatever its size); the
        groups still waiting are serialised one by one, so taking them stops on a group boundary."""
        self._seal(each=True)
        if self.events <= limit:
            taken = Groups(self._chunks, self._counts, self._sinces)
            self._reset()
        else:
            last = _fitting(list(accumulate(self._counts)), 0, limit)
            taken = Groups(self._chunks[:last], self._counts[:last], self._sinces[:last])
            del self._chunks[:last], self._counts[:last], self._sinces[:last]
        self.events -= taken.events
        return taken

    def give_back(self, parts: Sequence[Groups]) -> None:
        """Return taken groups to the front of the queue, in their order."""
        if not parts:
            return
        back = Groups.join([*parts, Groups(self._chunks, self._counts, self._sinces)])
        self._chunks, self._counts, self._sinces = back.chunks, back.counts, back.sinces
        self.events += sum(part.events for part in parts)

    def release_older_than(self, moment: float) -> None:
        """Queue the waiting events of requests whose first event was emitted before `moment`."""
        for request in [request for request in self.open if request.since < moment]:
            request.release()

    def release_all(self) -> None:
        for request in list(self.open):
            request.release()


class RequestEvents:
    """One request's events until its terminal event (or until the forwarder releases them).

    It keeps the event dicts structlog made for each call, not copies, and their times beside
    them: the processors after this one either drop a stage event or merge it into a new dict."""

    __slots__ = ("queue", "events", "times", "context", "since")
    context: dict[str, Any] | None
    since: float

    def __init__(self, queue: EventQueue) -> None:
        # `context` and `since` are set with the first event; only then can release() run.
        self.queue = queue
        self.events: list[EventDict] = []
        self.times: list[float] = []

    def release(self) -> None:
        self.queue.open.discard(self)
        events, self.events = self.events, []
        times, self.times = self.times, []
        if events:
            self.queue.put_group(self.context, events, times)


_TARGET: ContextVar[RequestEvents | None] = ContextVar("image_service_telemetry_target", default=None)


class TelemetryProcessor:
    """Routes stage, terminal and text events to the current forwarder's queue."""

    def __init__(self) -> None:
        self.default: EventQueue | None = None
        self.errors = 0
        # Text completions recorded while no forwarder ran in the process (before Tracking.start).
        self.unrouted_text = 0

    def route_current_context(self, queue: EventQueue | None) -> None:
        """Send this task's events (one request) to `queue`."""
        _TARGET.set(RequestEvents(queue) if queue is not None else None)

    def __call__(self, logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
        try:
            if "stage" not in event_dict:
                return event_dict
            request = _TARGET.get()
            if request is None:
                queue = self.default
                text = event_dict.get("event") == TEXT_EVENT
                if queue is not None:
                    queue.put_group_from_any_thread(
                        None if text else current_context(), [{**event_dict, "_ts": time.time()}]
                    )
                elif text:
                    self.unrouted_text += 1
                return event_dict
            name = event_dict.get("event")
            if name == TEXT_EVENT:
                request.queue.put_group_from_any_thread(None, [{**event_dict, "_ts": time.time()}])
                return event_dict
            # The processor's hot path, once per stage event of every request: inline, not methods.
            now = time.time()
            events = request.events
            if not events:
                # A reference to the context, not a copy: rows carry the request's facts as they
                # stand when its events are serialised.
                request.context = current_context()
                request.since = now
                request.queue.open.add(request)
            events.append(event_dict)
            times = request.times
            times.append(now)
            if name == TERMINAL_EVENT:
                # release(), inline: one call fewer on every request.
                queue = request.queue
                queue.open.discard(request)
                request.events, request.times = [], []
                queue.put_group(request.context, events, times)
        except Exception:
            self.errors += 1
        return event_dict


TELEMETRY = TelemetryProcessor()
