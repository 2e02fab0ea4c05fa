"""Reference image fetching: only public addresses, bounded in size and time.

No test sends traffic to a non-loopback address: names are resolved by an injected resolver, and
addresses it returns that are not loopback are refused before any connection is attempted.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from image_service.config import ReferenceSettings
from image_service.errors import ReferenceRejected
from image_service.generation.references import AddressPolicy, ReferenceFetcher, is_public

from .conftest import Serve, base_url
from .servers import ImageHost, png


class FakeResolver(AbstractResolver):
    """Answers from a table, like DNS would; records the names it was asked for."""

    def __init__(self, table: dict[str, str]) -> None:
        self.table = table
        self.asked: list[str] = []

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        self.asked.append(host)
        address = self.table[host]
        return [{"hostname": host, "host": address, "port": port, "family": socket.AF_INET6 if ":" in address
                 else socket.AF_INET, "proto": 0, "flags": socket.AI_NUMERICHOST}]

    async def close(self) -> None:
        return None


@pytest.fixture
async def executor() -> AsyncIterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(max_workers=1)
    yield pool
    pool.shutdown()


def fetcher(executor: ThreadPoolExecutor, table: dict[str, str], **settings: Any) -> tuple[ReferenceFetcher, FakeResolver]:
    resolver = FakeResolver(table)
    return ReferenceFetcher(ReferenceSettings(**settings), executor, resolver=resolver), resolver


class TestAddressPolicy:
    @pytest.mark.parametrize("address", [
        "127.0.0.1", "127.8.9.10", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1",
        "0.0.0.0", "224.0.0.1", "255.255.255.255", "::1", "::", "fe80::1", "fc00::1", "ff02::1",
        "::ffff:127.0.0.1", "::ffff:10.0.0.1", "2002:a00:1::1", "64:ff9b::1:1",
    ])
    def test_non_public_addresses_are_refused(self, address: str) -> None:
        assert not is_public(ipaddress.ip_address(address))
        with pytest.raises(ReferenceRejected, match="public addresses"):
            AddressPolicy(allow_private=False).check(address)

    @pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111"])
    def test_public_addresses_pass_the_check(self, address: str) -> None:
        """Checked only; nothing connects to them."""
        AddressPolicy(allow_private=False).check(address)

    def test_allow_private_lets_private_ranges_through(self) -> None:
        AddressPolicy(allow_private=True).check("10.1.2.3")


class TestFetcher:
    @pytest.mark.parametrize("url", [
        "http://127.0.0.1:{port}/ref.png", "http://[::1]:{port}/ref.png", "http://0.0.0.0:{port}/ref.png",
        "http://[::ffff:127.0.0.1]:{port}/ref.png",
    ])
    async def test_literal_loopback_urls_are_refused_without_a_request(
        self, serve: Serve, executor: ThreadPoolExecutor, url: str
    ) -> None:
        host = ImageHost()
        server = await serve(host)
        refs, _ = fetcher(executor, {})
        try:
            with pytest.raises(ReferenceRejected, match="public addresses"):
                await refs.fetch(url.format(port=server.port))
        finally:
            await refs.close()
        assert host.requests == []

    @pytest.mark.parametrize("address", ["127.0.0.1", "10.0.0.7", "169.254.169.254", "fd00::5"])
    async def test_names_resolving_to_private_addresses_are_refused_before_connecting(
        self, serve: Serve, executor: ThreadPoolExecutor, address: str
    ) -> None:
        """The check sits in the resolver, so the refused address is never connected to."""
        host = ImageHost()
        server = await serve(host)
        refs, resolver = fetcher(executor, {"images.example": address})
        try:
            with pytest.raises(ReferenceRejected, match="public addresses"):
                await refs.fetch(f"http://images.example:{server.port}/ref.png")
        finally:
            await refs.close()
        assert resolver.asked == ["images.example"] and host.requests == []

    @pytest.mark.parametrize("url", ["ftp://images.example/ref.png", "file:///etc/passwd", "http:///nohost"])
    async def test_other_schemes_are_refused(self, executor: ThreadPoolExecutor, url: str) -> None:
        refs, resolver = fetcher(executor, {})
        try:
            with pytest.raises(ReferenceRejected, match="http"):
                await refs.fetch(url)
        finally:
            await refs.close()
        assert resolver.asked == []

    async def test_allowed_private_fetch_follows_redirects_and_returns_the_image(
        self, serve: Serve, executor: ThreadPoolExecutor
    ) -> None:
        host = ImageHost()
        server = await serve(host)
        refs, _ = fetcher(executor, {"images.example": "127.0.0.1"}, allow_private=True)
        try:
            assert await refs.fetch(f"http://images.example:{server.port}/redirect") == png(8, 8)
        finally:
            await refs.close()
        assert [r["path"] for r in host.requests] == ["/redirect", "/ref.png"]

    @pytest.mark.parametrize(("mode", "settings", "message"), [
        ("oversized", {"max_bytes": 100_000}, "larger than 100000 bytes"),
        ("not_image", {}, "readable image"),
        ("hang", {"timeout": 0.3}, "took longer than 0.3 s"),
    ])
    async def test_bad_references_are_refused_with_a_reason(
        self, serve: Serve, executor: ThreadPoolExecutor, mode: str, settings: dict[str, Any], message: str
    ) -> None:
        server = await serve(ImageHost(mode=mode))
        refs, _ = fetcher(executor, {}, allow_private=True, **settings)
        try:
            with pytest.raises(ReferenceRejected, match=message):
                await refs.fetch(f"{base_url(server)}/ref.png")
        finally:
            await refs.close()

    async def test_redirect_loops_are_bounded(self, aiohttp_server: Any, executor: ThreadPoolExecutor) -> None:
        from aiohttp import web

        async def loop(request: web.Request) -> web.Response:
            raise web.HTTPFound("/loop")

        app = web.Application()
        app.router.add_get("/loop", loop)
        server = await aiohttp_server(app)
        refs, _ = fetcher(executor, {}, allow_private=True, max_redirects=2)
        try:
            with pytest.raises(ReferenceRejected, match="redirected more than 2"):
                await refs.fetch(f"{base_url(server)}/loop")
        finally:
            await refs.close()
