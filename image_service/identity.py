"""Who is asking: a token (validated), else an allow-listed referrer, else anonymous; and from where.

A token comes from `Authorization: Bearer` or, failing that, `?token=`. It is checked by a
`TokenValidator`: `FileTokenValidator` (the embedded default, tokens stored as SHA-256 digests in
`config/tokens.toml`) or `HttpTokenValidator` (an auth service answering `{valid, userId, username,
tier}`, memoised). Unlike the origin, an invalid token is refused (401) instead of silently becoming
anonymous. The token itself is never logged, stored in clear or echoed.

The client address used for queueing is the peer, or — only when the peer is a trusted proxy —
the right-most address of `X-Forwarded-For` that is not itself a trusted proxy. An IPv6 address
stands for its network (`access.ipv6_prefix`, /64 by default): one subscriber holds a whole /64, so
per-address limits counted per address would let it step from one to the next.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import re
import tomllib
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp
import structlog
from aiohttp import web

from .config import TIER_ORDER, ConfigError
from .errors import AuthUnavailable, InvalidToken
from .tracking import bind
from .tracking.processor import printable
from .queues import Clock, MonotonicClock

log = structlog.get_logger("image_service.identity")

MAX_TOKEN_LENGTH = 4096
MAX_HOST_LENGTH = 253
_DIGEST = re.compile(r"[0-9a-f]{64}")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _plausible(token: str) -> bool:
    """Tokens are short printable ASCII: anything else (a control character, a byte that is not
    UTF-8) cannot be one, and would break a header to the token service or the digest."""
    return len(token) <= MAX_TOKEN_LENGTH and token.isascii() and token.isprintable()


def token_digest(token: str) -> str:
    """How tokens are stored and remembered: tokens are random secrets, so a plain SHA-256 suffices."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Account:
    user_id: str
    username: str
    tier: str


@dataclass(frozen=True, slots=True)
class Identity:
    tier: str = "anonymous"
    user: str | None = None
    username: str | None = None
    referrer: str | None = None

    def bindings(self) -> dict[str, str]:
        """The telemetry columns (`user`, `username`, `tier`, `referrer`); never the token."""
        return {"user": self.user or "", "username": self.username or "", "tier": self.tier,
                "referrer": self.referrer or ""}


class TokenValidator(Protocol):
    async def validate(self, token: str) -> Account | None:
        """The account of a valid token, None for an invalid one; AuthUnavailable when unsure."""

    async def close(self) -> None: ...


def _tier(value: object) -> str:
    return value if isinstance(value, str) and value in TIER_ORDER else "anonymous"


class FileTokenValidator:
    """Tokens from a TOML table `[tokens]` of SHA-256 digest → {user_id, username, tier}."""

    def __init__(self, accounts: Mapping[str, Account]) -> None:
        self._accounts = dict(accounts)

    @classmethod
    def from_file(cls, path: Path) -> FileTokenValidator:
        try:
            with path.open("rb") as handle:
                document = tomllib.load(handle)
        except FileNotFoundError:
            raise ConfigError(f"access.tokens_file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"access.tokens_file {path} is not valid TOML: {exc}") from None
        table = document.get("tokens")
        if not isinstance(table, dict):
            # Without the table (a `[token]` typo) the service started knowing no token at all.
            found = ", ".join(sorted(document)) or "nothing"
            raise ConfigError(f"access.tokens_file {path} needs a [tokens] table of digest = {{user_id, tier}} (found {found})")
        accounts = {}
        for digest, entry in table.items():
            if not _DIGEST.fullmatch(digest):
                raise ConfigError(f"access.tokens_file: key {digest[:12]!r}... is not a SHA-256 hex digest")
            if not isinstance(entry, dict) or entry.get("tier") not in TIER_ORDER or not entry.get("user_id"):
                raise ConfigError(
                    f"access.tokens_file: entry {digest[:12]}... needs user_id and a tier in {', '.join(TIER_ORDER)}"
                )
            accounts[digest] = Account(str(entry["user_id"]), str(entry.get("username", "")), entry["tier"])
        return cls(accounts)

    async def validate(self, token: str) -> Account | None:
        return self._accounts.get(token_digest(token))

    async def close(self) -> None:
        return None


class HttpTokenValidator:
    """Asks an auth service (`GET url` with `Authorization: Bearer`), remembering answers for `ttl` s.

    Concurrent checks of one token share one call. A timeout or an unusable answer is
    AuthUnavailable (503), not remembered, so the next request asks again.
    """

    def __init__(self, url: str, *, timeout: float, ttl: float, max_entries: int, clock: Clock | None = None) -> None:
        if not url.lower().startswith(("http://", "https://")):
            raise ValueError(f"validator url must be http(s), got {url[:40]!r}")
        self._url = url
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._ttl = ttl
        self._max_entries = max_entries
        self._clock: Clock = clock or MonotonicClock()
        self._memo: OrderedDict[str, tuple[float, asyncio.Task[Account | None]]] = OrderedDict()
        self._session: aiohttp.ClientSession | None = None
        self.calls = 0

    async def validate(self, token: str) -> Account | None:
        key = token_digest(token)
        now = self._clock.now()
        entry = self._memo.get(key)
        if entry is not None and entry[0] > now:
            self._memo.move_to_end(key)
            task = entry[1]
        else:
            task = asyncio.ensure_future(self._ask(token))
            self._memo[key] = (now + self._ttl, task)
            while len(self._memo) > self._max_entries:
                self._memo.popitem(last=False)
        try:
            return await asyncio.shield(task)
        except AuthUnavailable:
            if self._memo.get(key, (0, None))[1] is task:
                del self._memo[key]
            raise

    async def _ask(self, token: str) -> Account | None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        self.calls += 1
        try:
            async with self._session.get(self._url, headers={"Authorization": f"Bearer {token}"}) as response:
                if response.status in (401, 403):
                    return None
                if response.status != 200:
                    raise AuthUnavailable(f"the token service answered {response.status}")
                data: Any = await response.json(content_type=None)
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            log.warning("auth.unavailable", reason=type(exc).__name__)
            raise AuthUnavailable("the token service did not answer in time; retry later") from None
        if not isinstance(data, dict):
            raise AuthUnavailable("the token service answered garbage")
        if data.get("valid") is not True:
            return None
        return Account(str(data.get("userId") or ""), str(data.get("username") or ""), _tier(data.get("tier")))

    async def close(self) -> None:
        for _, task in self._memo.values():
            task.cancel()
        self._memo.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None


def request_token(request: web.BaseRequest) -> str | None:
    """The bearer header wins over `?token=`: it is the deliberate choice and stays out of URLs."""
    parts = request.headers.get("Authorization", "").split(maxsplit=1)  # any whitespace: "Bearer\tx" too
    if len(parts) == 2 and parts[0].lower() == "bearer":
        return parts[1].strip()
    return request.query.get("token", "").strip() or None


def normalise_referrer(value: str | None) -> str | None:
    """The host of a referrer URL or bare domain; paths and queries are dropped (they can carry secrets)."""
    if not value or not value.strip():
        return None
    text = value.strip()
    try:
        host = urlsplit(text if "://" in text else f"//{text}").hostname
    except ValueError:
        return None
    if not host or len(host) > MAX_HOST_LENGTH or not host.isprintable():
        return None  # isprintable: a byte that is not UTF-8 arrives as a lone surrogate
    return host.lower().rstrip(".")


def request_referrer(request: web.BaseRequest) -> str | None:
    for value in (request.query.get("referrer"), request.headers.get("Referer"), request.headers.get("Origin")):
        host = normalise_referrer(value)
        if host is not None:
            return host
    return None


def domain_matches(host: str, domains: Iterable[str]) -> str | None:
    """The listed domain `host` is or belongs to, if any."""
    for domain in domains:
        if host == domain or host.endswith("." + domain):
            return domain
    return None


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None


@lru_cache(maxsize=4096)
def _network_of(text: str, ipv6_prefix: int) -> str:
    """An IPv6 address's network of `ipv6_prefix` bits (an IPv4-mapped one's IPv4 address); else `text`."""
    address = _address(text)
    if not isinstance(address, ipaddress.IPv6Address):
        return text
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(ipaddress.IPv6Network((address, ipv6_prefix), strict=False))


class ClientAddress:
    """The client's address (an IPv6 one as its network), believing X-Forwarded-For only when the
    peer is a trusted proxy."""

    def __init__(self, trusted_proxies: Iterable[str], ipv6_prefix: int = 64) -> None:
        self._trusted: tuple[Network, ...] = tuple(ipaddress.ip_network(n, strict=False) for n in trusted_proxies)
        self._ipv6_prefix = ipv6_prefix

    def _is_trusted(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> bool:
        return address is not None and any(address in network for network in self._trusted)

    def __call__(self, request: web.BaseRequest) -> str:
        address = self._address(request)
        # Only an IPv6 address holds a colon: an IPv4 peer, the common case, is not parsed again.
        return _network_of(address, self._ipv6_prefix) if ":" in address else address

    def _address(self, request: web.BaseRequest) -> str:
        peer = request.remote or "unknown"
        if not self._trusted or not self._is_trusted(_address(peer)):
            return peer
        hops = [hop.strip() for header in request.headers.getall("X-Forwarded-For", ()) for hop in header.split(",")]
        for hop in reversed([hop for hop in hops if hop]):
            address = _address(hop)
            if not self._is_trusted(address):
                return str(address) if address is not None else printable(hop[:64])
        return peer


class Authenticator:
    """Turns a request into an Identity; raises Unauthorized for a token that does not validate."""

    def __init__(self, validator: TokenValidator, referrers: Mapping[str, str]) -> None:
        self._validator = validator
        self._referrers = dict(referrers)

    async def identify(self, request: web.BaseRequest) -> Identity:
        referrer = request_referrer(request)
        # Bound before validation so that a refused request's row still says where it came from.
        bind(referrer=referrer or "")
        token = request_token(request)
        if token is not None:
            account = await self._validator.validate(token) if _plausible(token) else None
            if account is None:
                raise InvalidToken("the token is not valid; omit it to be served as anonymous")
            return Identity(account.tier, account.user_id, account.username, referrer)
        domain = domain_matches(referrer, self._referrers) if referrer else None
        return Identity(self._referrers[domain] if domain else "anonymous", referrer=referrer)

    async def close(self) -> None:
        await self._validator.close()
