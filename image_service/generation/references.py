"""Reference images (`image=` URLs), fetched only over http(s) from public addresses.

The address check runs inside the connector's resolver, so the address checked is the address
connected to (no DNS rebinding between check and connect). Literal IP hosts, which aiohttp does not
resolve, are checked before the request; redirects are followed by hand and every hop is checked
again. Refused: loopback, private, link-local, shared (CGNAT), multicast, reserved and unspecified
ranges, also when wrapped in IPv4-mapped, NAT64, 6to4 or Teredo IPv6 addresses — unless
`references.allow_private`. Bodies are bounded in bytes and the whole fetch in time.
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import socket
from collections.abc import Sequence
from concurrent.futures import Executor

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from PIL import Image, UnidentifiedImageError
from yarl import URL

from ..config import ReferenceSettings
from ..errors import ReferenceRejected
from .transport import ALLOWED_FORMATS, READ_CHUNK

REDIRECTS = frozenset({301, 302, 303, 307, 308})
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _embedded_v4(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address):
        if address in NAT64:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        for inner in (address.ipv4_mapped, address.sixtofour, address.teredo[1] if address.teredo else None):
            if inner is not None:
                return inner
    return address


def is_public(address: IPAddress) -> bool:
    """Globally routable unicast, judged on the IPv4 address an IPv6 form may carry."""
    inner = _embedded_v4(address)
    return all(a.is_global and not a.is_multicast for a in (address, inner))


class AddressPolicy:
    """Decides which addresses reference fetches may reach."""

    def __init__(self, allow_private: bool) -> None:
        self.allow_private = allow_private

    def check(self, address: str) -> None:
        try:
            parsed = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            raise ReferenceRejected("a reference image host resolved to something that is not an address") from None
        if not self.allow_private and not is_public(parsed):
            raise ReferenceRejected("reference image URLs must point to public addresses")


class GuardedResolver(AbstractResolver):
    """Resolves through `inner` and refuses the host if any of its addresses is not allowed."""

    def __init__(self, policy: AddressPolicy, inner: AbstractResolver) -> None:
        self._policy = policy
        self._inner = inner

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            self._policy.check(result["host"])
        return results

    async def close(self) -> None:
        await self._inner.close()


def check_reference_image(data: bytes) -> None:
    """Runs in the executor: the fetched body must be an image we accept, not just any bytes."""
    try:
        with Image.open(io.BytesIO(data)) as opened:
            if opened.format not in ALLOWED_FORMATS:
                raise ReferenceRejected(f"a reference image is {opened.format}; JPEG, PNG or WebP are accepted")
            opened.verify()
    except ReferenceRejected:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning,
            OSError, SyntaxError, ValueError):
        raise ReferenceRejected("a reference image URL did not answer a readable image") from None


class ReferenceFetcher:
    """Fetches reference images for the backends that send them on."""

    def __init__(
        self, settings: ReferenceSettings, executor: Executor, resolver: AbstractResolver | None = None
    ) -> None:
        self._settings = settings
        self._executor = executor
        self.policy = AddressPolicy(settings.allow_private)
        self._resolver = GuardedResolver(self.policy, resolver if resolver is not None else aiohttp.ThreadedResolver())
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(resolver=self._resolver, use_dns_cache=False)
            self._session = aiohttp.ClientSession(connector=connector, trust_env=False)
        return self._session

    def check_url(self, url: URL) -> None:
        """Scheme and, for literal IP hosts, the address; names are checked when resolved."""
        if url.scheme not in ("http", "https") or not url.host:
            raise ReferenceRejected("reference image URLs must be http(s) URLs with a host")
        try:
            ipaddress.ip_address(url.host.split("%", 1)[0])
        except ValueError:
            return
        self.policy.check(url.host)

    async def fetch(self, url: str) -> bytes:
        """The bytes of one reference image, or ReferenceRejected (400) saying why not."""
        try:
            async with asyncio.timeout(self._settings.timeout):
                body = await self._fetch(URL(url))
        except TimeoutError:
            raise ReferenceRejected(f"a reference image took longer than {self._settings.timeout:g} s") from None
        except aiohttp.ClientError as exc:
            raise ReferenceRejected(f"a reference image could not be fetched ({type(exc).__name__})") from None
        await asyncio.get_running_loop().run_in_executor(self._executor, check_reference_image, body)
        return body

    async def fetch_all(self, urls: Sequence[str]) -> list[bytes]:
        return list(await asyncio.gather(*(self.fetch(url) for url in urls)))

    async def _fetch(self, url: URL) -> bytes:
        for _ in range(self._settings.max_redirects + 1):
            self.check_url(url)
            async with self._client().get(url, allow_redirects=False) as response:
                if response.status in REDIRECTS and "Location" in response.headers:
                    url = url.join(URL(response.headers["Location"]))
                    continue
                if response.status != 200:
                    raise ReferenceRejected(f"a reference image URL answered HTTP {response.status}")
                return await self._read(response)
        raise ReferenceRejected(f"a reference image URL redirected more than {self._settings.max_redirects} times")

    async def _read(self, response: aiohttp.ClientResponse) -> bytes:
        limit = self._settings.max_bytes
        too_big = ReferenceRejected(f"a reference image is larger than {limit} bytes")
        if response.content_length is not None and response.content_length > limit:
            raise too_big
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_chunked(READ_CHUNK):
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
