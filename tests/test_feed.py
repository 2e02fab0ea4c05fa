"""The live feed: what is published, replay, live delivery, heartbeats, and slow consumers."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote

import orjson
import pytest

from image_service.app import FEED
from image_service.config import FeedSettings, load_settings
from image_service.feed import Feed, feed_item
from image_service.identity import token_digest
from image_service.moderation import Verdict
from image_service.params import parse_params

from .conftest import ClientFactory, make_settings

SETTINGS = load_settings()
TOKEN = "tok-seed-feedtest"


def params(query: dict[str, str] | None = None, prompt: str = "a red fox") -> Any:
    return parse_params(prompt, query or {}, SETTINGS.models, "procedural", 2000)


class TestFeedItem:
    @pytest.mark.parametrize("query", [{"private": "true"}, {"nofeed": "true"}])
    def test_private_and_nofeed_are_never_published(self, query: dict[str, str]) -> None:
        assert feed_item(params(query), Verdict().to_dict()) is None

    @pytest.mark.parametrize("verdict", [Verdict(is_mature=True), Verdict(is_child=True)])
    def test_flagged_images_are_never_published(self, verdict: Verdict) -> None:
        assert feed_item(params(), verdict.to_dict()) is None

    @pytest.mark.parametrize("reference", [
        "https://alice:S3CRET@example.com/a.png", "https://example.com/a.png?X-Amz-Signature=SIG",
        "https://example.com/a.png#token=T",
    ])
    def test_a_reference_url_that_may_hold_a_secret_is_never_published(self, reference: str) -> None:
        """The item's imageURL would put the reference's credentials or signature in public."""
        assert feed_item(params({"image": f"https://example.com/plain.png|{reference}"}), {}) is None
        assert feed_item(params({"image": "https://example.com/plain.png"}), {}) is not None

    def test_public_item_links_to_the_same_image(self) -> None:
        item = feed_item(params({"width": "64", "height": "48", "seed": "9", "nologo": "true"}), {})
        assert item is not None and item["prompt"] == "a red fox"
        assert item["imageURL"] == "/prompt/a%20red%20fox?model=procedural&width=64&height=48&seed=9&nologo=true"


    @pytest.mark.parametrize("query", [
        {"seed": "5"}, {"seed": "5", "quality": "hd", "enhance": "true"},
        {"seed": "5", "negative_prompt": "cats&dogs", "image": "https://a.example/x.png|https://b.example/y.jpg"},
    ])
    def test_the_feed_link_asks_for_the_very_image_it_lists(self, query: dict[str, str]) -> None:
        """Following imageURL is a cache hit: every parameter that changes the bytes is in it."""
        original = params(query)
        item = feed_item(original, {})
        assert item is not None
        path, _, raw_query = item["imageURL"].partition("?")
        again = parse_params(unquote(path.removeprefix("/prompt/")), dict(parse_qsl(raw_query)), SETTINGS.models,
                             "procedural", 2000)
        assert again.cache_key() == original.cache_key()


class TestFeedBuffers:
    def test_slow_subscriber_is_dropped_with_bounded_buffers(self) -> None:
        """A subscriber that never reads holds at most its buffer; then it is dropped, not grown."""
        feed = Feed(FeedSettings(replay=5, subscriber_buffer=8))
        slow = feed.subscribe()
        for index in range(10_000):
            feed.publish({"prompt": f"p{index}" * 50})
            assert slow.buffered <= 8
        assert slow.dropped and feed.subscribers == 0 and feed.dropped == 1
        assert len(feed.recent) == 5 and feed.recent[-1]["prompt"].startswith("p9999")

    async def test_new_subscriber_gets_the_last_items_in_order(self) -> None:
        feed = Feed(FeedSettings(replay=3))
        for index in range(5):
            feed.publish({"n": index})
        subscription = feed.subscribe()
        assert [(await subscription.next(0.1) or {}).get("n") for _ in range(4)] == [2, 3, 4, None]

    def test_too_many_subscribers_is_refused(self) -> None:
        from image_service.errors import FeedFull

        feed = Feed(FeedSettings(max_subscribers=2))
        feed.subscribe(), feed.subscribe()
        with pytest.raises(FeedFull):
            feed.subscribe()


    def test_one_client_cannot_hold_every_place(self) -> None:
        """Past its share a client gets 429; others still get in, and a closed stream frees a place."""
        from image_service.errors import TooManyRequests

        feed = Feed(FeedSettings(max_subscribers=10, max_subscribers_per_client=2))
        first, _ = feed.subscribe("198.51.100.1"), feed.subscribe("198.51.100.1")
        with pytest.raises(TooManyRequests):
            feed.subscribe("198.51.100.1")
        feed.subscribe("198.51.100.2")
        first.close()
        first.close()  # a second close frees no second place
        feed.subscribe("198.51.100.1")
        with pytest.raises(TooManyRequests):
            feed.subscribe("198.51.100.1")


async def read_events(response: Any, count: int, timeout: float = 5) -> list[dict[str, Any]]:
    """The next `count` data events of an SSE stream (comment lines skipped)."""
    events: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while len(events) < count:
            line = (await response.content.readline()).decode()
            if line.startswith("data: "):
                events.append(orjson.loads(line[len("data: "):]))
    return events


async def assert_a_new_stream_is_served(client: Any) -> None:
    """Once the feed has let go of the client's closed streams, a new one gets in."""
    feed = client.server.app[FEED]
    async with asyncio.timeout(5):
        while feed.subscribers:
            await asyncio.sleep(0.02)
    again = await client.get("/feed")
    assert again.status == 200
    again.close()


@pytest.fixture
async def feed_client(make_client: ClientFactory, tmp_path: Path) -> Any:
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(f'[tokens]\n"{token_digest(TOKEN)}" = {{ user_id = "u-7", username = "zoe", tier = "seed" }}\n')
    return await make_client(make_settings(feed={"replay": 2}, access={"tokens_file": str(tokens)}))


class TestFeedStream:
    async def test_replays_the_last_items_then_streams_live_ones(self, feed_client: Any) -> None:
        for index in range(3):
            assert (await feed_client.get(f"/prompt/old{index}?width=32&height=32")).status == 200
        trace = "4bf92f3577b34da6a3ce929d0e0e4736"
        response = await feed_client.get("/feed", headers={"traceparent": f"00-{trace}-00f067aa0ba902b7-01"})
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert response.headers["traceparent"].startswith(f"00-{trace}-") and response.headers["X-Request-Id"]
        assert [e["prompt"] for e in await read_events(response, 2)] == ["old1", "old2"]
        await feed_client.get("/prompt/fresh?width=32&height=32")
        (live,) = await read_events(response, 1)
        assert live["prompt"] == "fresh" and (live["width"], live["height"]) == (32, 32)
        response.close()

    async def test_only_public_generations_reach_the_feed(self, feed_client: Any) -> None:
        """Private, nofeed and cache hits publish nothing; no token, address or referrer leaks."""
        response = await feed_client.get("/feed")
        await feed_client.get("/prompt/secret%20plan?width=32&height=32&private=true")
        await feed_client.get("/prompt/quiet?width=32&height=32&nofeed=true")
        await feed_client.get(
            f"/prompt/public?width=32&height=32&token={TOKEN}&referrer=site.example",
            headers={"X-Forwarded-For": "198.51.100.77"})
        await feed_client.get(f"/prompt/public?width=32&height=32&token={TOKEN}")  # a hit: not again
        await feed_client.get("/prompt/last?width=32&height=32")
        events = await read_events(response, 2)
        assert [e["prompt"] for e in events] == ["public", "last"]
        text = repr(events)
        for secret in (TOKEN, "127.0.0.1", "198.51.100.77", "site.example", "u-7", "zoe", "secret", "quiet"):
            assert secret not in text
        response.close()

    async def test_a_client_past_its_share_of_streams_gets_429(self, make_client: ClientFactory) -> None:
        client = await make_client(make_settings(feed={"max_subscribers_per_client": 1}))
        first = await client.get("/feed")
        refused = await client.get("/feed")
        assert refused.status == 429 and (await refused.json())["error"] == "too_many_requests"
        assert int(refused.headers["Retry-After"]) > 0
        first.close()
        await assert_a_new_stream_is_served(client)

    async def test_a_client_that_leaves_frees_its_place_at_once(self, make_client: ClientFactory) -> None:
        """A page reload reconnects at once; the closed stream used to hold the client's place (and
        one of the feed's) until its next heartbeat failed to write."""
        client = await make_client(make_settings(feed={"heartbeat": 60.0, "max_subscribers_per_client": 1}))
        feed = client.server.app[FEED]
        reader, writer = await asyncio.open_connection(client.host, client.port)
        writer.write(b"GET /feed HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b" 200 " in await reader.readline()
        assert feed.subscribers == 1
        writer.close()
        await assert_a_new_stream_is_served(client)

    async def test_idle_stream_carries_heartbeats(self, make_client: ClientFactory) -> None:
        client = await make_client(make_settings(feed={"heartbeat": 0.05}))
        response = await client.get("/feed")
        async with asyncio.timeout(5):
            assert (await response.content.readline()).startswith(b":")
        response.close()

    async def test_slow_reader_is_disconnected_and_memory_stays_bounded(self, make_client: ClientFactory) -> None:
        """A client that stops reading is dropped once its buffer fills; the feed keeps no backlog for it."""
        client = await make_client(make_settings(feed={"subscriber_buffer": 16, "write_timeout": 0.5}))
        feed = client.app[FEED]
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, (client.host, client.port))
        await loop.sock_sendall(sock, b"GET /feed HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            async with asyncio.timeout(10):
                while feed.subscribers == 0:
                    await asyncio.sleep(0.01)
                big = "x" * 1500
                index = 0
                while feed.subscribers:
                    feed.publish({"prompt": big, "n": index})
                    index += 1
                    if index % 50 == 0:
                        await asyncio.sleep(0.01)
        finally:
            sock.close()
        assert feed.dropped == 1 and len(feed.recent) <= 20

    async def test_shutdown_ends_open_streams(self, make_client: ClientFactory) -> None:
        """An open feed does not hold graceful shutdown for its whole timeout."""
        client = await make_client()
        response = await client.get("/feed")
        client.app[FEED].close()
        async with asyncio.timeout(5):
            assert await response.content.read() == b""
