"""The live feed: public generations, replayed to new subscribers and pushed to connected ones.

`Feed.publish` never blocks: it appends to a bounded replay buffer and offers the item to every
subscriber's bounded queue. A subscriber whose queue is full is dropped (its stream ends) instead
of buffering without bound. Items are built from an explicit allow-list of fields, so a token, a
client address or a private prompt cannot reach the feed; private, nofeed, mature and child images
are never published.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import orjson

from .config import FeedSettings
from .errors import FeedFull, TooManyRequests
from .params import DEFAULT_NEGATIVE_PROMPT, DEFAULT_QUALITY, ImageParams

HEARTBEAT = b": heartbeat\n\n"
# How often an idle stream checks that its client is still there.
LEFT_CHECK_SECONDS = 1.0


def image_url(params: ImageParams) -> str:
    """A relative URL that serves this very image (from the cache while it is there)."""
    query: dict[str, str] = {
        "model": params.model, "width": str(params.width), "height": str(params.height), "seed": str(params.seed),
    }
    if params.nologo:
        query["nologo"] = "true"
    if params.enhance:
        query["enhance"] = "true"
    if params.quality != DEFAULT_QUALITY:
        query["quality"] = params.quality
    if params.negative_prompt != DEFAULT_NEGATIVE_PROMPT:
        query["negative_prompt"] = params.negative_prompt
    if params.image:
        query["image"] = "|".join(params.image)
    return f"/prompt/{quote(params.prompt, safe='')}?{urlencode(query)}"


def _may_carry_a_secret(url: str) -> bool:
    """Credentials (`user:pw@`), a query (a signed URL's signature, a token) or a fragment."""
    parts = urlsplit(url)
    return bool(parts.username or parts.password or parts.query or parts.fragment)


def feed_item(params: ImageParams, verdict: Mapping[str, Any]) -> dict[str, Any] | None:
    """The public record of a generation, or None when it must stay out of the feed: private,
    nofeed or flagged, or made from a reference URL that may hold a secret (its `imageURL` would
    publish it)."""
    if params.private or params.nofeed or verdict.get("is_mature") or verdict.get("is_child"):
        return None
    if any(_may_carry_a_secret(url) for url in params.image):
        return None
    return {
        "prompt": params.prompt,
        "model": params.model,
        "width": params.width,
        "height": params.height,
        "seed": params.seed,
        "nologo": params.nologo,
        "enhance": params.enhance,
        "imageURL": image_url(params),
        "createdAt": round(time.time(), 3),
    }


def sse_event(item: Mapping[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(item) + b"\n\n"


class Subscription:
    """One subscriber's bounded queue; iteration ends when the feed drops or closes it."""

    _END: Any = object()

    def __init__(self, feed: Feed, size: int, replay: list[dict[str, Any]], client: str | None = None) -> None:
        self._feed = feed
        # Whose stream this is, until it is closed (then None: it counts for nobody).
        self.client = client
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=size)
        self.dropped = False
        for item in replay[-size:]:
            self._queue.put_nowait(item)

    @property
    def buffered(self) -> int:
        return self._queue.qsize()

    def offer(self, item: dict[str, Any]) -> bool:
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            self.end(dropped=True)
            return False
        return True

    def end(self, dropped: bool = False) -> None:
        """Stop the stream: discard what is buffered and leave only the end marker."""
        self.dropped = self.dropped or dropped
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(self._END)

    async def next(self, timeout: float) -> dict[str, Any] | None:
        """The next item; None after `timeout` s without one; StopAsyncIteration once ended."""
        try:
            item = await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return None
        if item is self._END:
            raise StopAsyncIteration
        return item

    def close(self) -> None:
        self._feed._unsubscribe(self)


class Feed:
    def __init__(self, settings: FeedSettings) -> None:
        self._settings = settings
        self._recent: deque[dict[str, Any]] = deque(maxlen=settings.replay)
        self._subscribers: set[Subscription] = set()
        # Open streams by client, while their handlers run (a dropped subscriber's until it closes).
        self._streams: Counter[str] = Counter()
        self._closed = False
        self.dropped = 0

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    @property
    def recent(self) -> list[dict[str, Any]]:
        return list(self._recent)

    def publish(self, item: dict[str, Any] | None) -> None:
        if item is None or self._closed:
            return
        self._recent.append(item)
        for subscription in list(self._subscribers):
            if not subscription.offer(item):
                self._subscribers.discard(subscription)
                self.dropped += 1

    def subscribe(self, client: str | None = None) -> Subscription:
        """A stream for `client` (its address), within the feed's room and the client's share of it:
        one client could otherwise hold every place."""
        if self._closed or len(self._subscribers) >= self._settings.max_subscribers:
            raise FeedFull("the live feed has no room for another subscriber; retry later")
        held = self._streams[client] if client is not None else 0
        if held >= self._settings.max_subscribers_per_client:
            raise TooManyRequests(
                f"this client already has {held} live feed streams open; close one first",
                retry_after=self._settings.heartbeat,
            )
        subscription = Subscription(self, self._settings.subscriber_buffer, list(self._recent), client)
        self._subscribers.add(subscription)
        if client is not None:
            self._streams[client] += 1
        return subscription

    def _unsubscribe(self, subscription: Subscription) -> None:
        self._subscribers.discard(subscription)
        client, subscription.client = subscription.client, None
        if client is not None:
            self._streams[client] -= 1
            if not self._streams[client]:
                del self._streams[client]

    def close(self) -> None:
        """End every stream (at shutdown, so open feeds do not hold it up)."""
        self._closed = True
        for subscription in self._subscribers:
            subscription.end()
        self._subscribers.clear()

    async def stream(self, subscription: Subscription, gone: Callable[[], bool]) -> AsyncIterator[bytes]:
        """SSE chunks: items as `data:` events, and a comment line after each idle heartbeat period.
        It ends within a second of `gone()` (the client left): a closed stream would otherwise hold
        its place, and its client's share, until the next heartbeat failed to write."""
        heartbeat = self._settings.heartbeat
        idle = 0.0
        while True:
            wait = min(LEFT_CHECK_SECONDS, heartbeat - idle)
            try:
                item = await subscription.next(wait)
            except StopAsyncIteration:
                return
            if item is not None:
                idle = 0.0
                yield sse_event(item)
                continue
            if gone():
                return
            idle += wait
            if idle >= heartbeat:
                idle = 0.0
                yield HEARTBEAT
