"""Identity: token sources and precedence, the token file, the HTTP validator, referrers, client addresses."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from image_service.config import ConfigError
from image_service.errors import AuthUnavailable
from image_service.identity import (
    ClientAddress,
    FileTokenValidator,
    HttpTokenValidator,
    normalise_referrer,
    token_digest,
)
from image_service.queues import ManualClock

from .test_pipeline_events import capture_logs
from .conftest import ClientFactory, make_settings

GOOD = "tok-flower-0123456789"
OTHER = "tok-seed-9876543210"
FOX = "/prompt/fox?width=32&height=32"


def write_tokens(path: Path) -> Path:
    file = path / "tokens.toml"
    file.write_text(
        "[tokens]\n"
        f'"{token_digest(GOOD)}" = {{ user_id = "u-1", username = "alice", tier = "flower" }}\n'
        f'"{token_digest(OTHER)}" = {{ user_id = "u-2", username = "bob", tier = "seed" }}\n'
    )
    return file


@pytest.fixture
async def token_client(make_client: ClientFactory, tmp_path: Path) -> Any:
    settings = make_settings(access={
        "tokens_file": str(write_tokens(tmp_path)), "referrers": {"partner.example": "nectar"},
    })
    return await make_client(settings)


async def terminal_event(client: Any, url: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    with capture_logs() as logs:
        response = await client.get(url, **kwargs)
        await response.read()
    (event,) = [e for e in logs if e["event"] == "request.completed"]
    return response.status, event


class TestTokenSources:
    async def test_bearer_header_identifies_the_user(self, token_client: Any) -> None:
        """A valid Bearer token puts the account's user, name and tier on the request's row."""
        status, event = await terminal_event(token_client, FOX, headers={"Authorization": f"Bearer {GOOD}"})
        assert status == 200
        assert (event["user"], event["username"], event["tier"]) == ("u-1", "alice", "flower")

    async def test_a_bearer_token_after_a_tab_is_still_the_token(self, token_client: Any) -> None:
        status, event = await terminal_event(token_client, FOX, headers={"Authorization": f"Bearer\t{GOOD}"})
        assert status == 200 and event["user"] == "u-1"
        status, _ = await terminal_event(token_client, FOX, headers={"Authorization": "Bearer\tbogus"})
        assert status == 401

    async def test_query_token_identifies_the_user(self, token_client: Any) -> None:
        status, event = await terminal_event(token_client, f"{FOX}&token={OTHER}")
        assert status == 200 and (event["user"], event["tier"]) == ("u-2", "seed")

    async def test_header_wins_over_query(self, token_client: Any) -> None:
        """With both, the header decides: a bad query token is ignored, a bad header token is not."""
        status, event = await terminal_event(
            token_client, f"{FOX}&token=bogus", headers={"Authorization": f"Bearer {OTHER}"})
        assert status == 200 and event["user"] == "u-2"
        status, _ = await terminal_event(
            token_client, f"{FOX}&token={GOOD}", headers={"Authorization": "Bearer bogus"})
        assert status == 401

    async def test_no_credential_is_anonymous(self, token_client: Any) -> None:
        """No token, an empty token, or a non-Bearer Authorization header: anonymous."""
        for url, headers in ((FOX, {}), (f"{FOX}&token=", {}), (FOX, {"Authorization": "Basic dXNlcjpwdw=="})):
            status, event = await terminal_event(token_client, url, headers=headers)
            assert status == 200 and (event["tier"], event["user"]) == ("anonymous", "")

    async def test_invalid_token_is_401_json_and_never_echoed(self, token_client: Any) -> None:
        """Unlike the origin, a wrong token is refused rather than silently served as anonymous."""
        with capture_logs() as logs:
            response = await token_client.get(f"{FOX}&token=sk-wrong-secret&referrer=app.example")
            body = await response.json()
        assert response.status == 401 and body["error"] == "invalid_token"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert {"requestId", "requestParameters", "message"} <= body.keys()
        assert "sk-wrong-secret" not in str(body) and "sk-wrong-secret" not in repr(logs)
        (event,) = [e for e in logs if e["event"] == "request.completed"]
        assert (event["status"], event["error"], event["referrer"]) == (401, "invalid_token", "app.example")

    async def test_a_request_refused_for_its_parameters_still_counts_against_its_user_and_model(
        self, token_client: Any
    ) -> None:
        """The tier split and per-model figures include rejected requests: a 400 row is not anonymous."""
        status, event = await terminal_event(
            token_client, "/prompt/fox?width=wide&model=procedural", headers={"Authorization": f"Bearer {OTHER}"})
        assert status == 400 and (event["user"], event["tier"], event["model"]) == ("u-2", "seed", "procedural")
        status, event = await terminal_event(token_client, "/prompt/fox?model=nope", headers={"Authorization": f"Bearer {OTHER}"})
        assert status == 400 and (event["tier"], event["model"]) == ("seed", None)
        status, event = await terminal_event(token_client, "/prompt/fox?width=wide&token=bogus")
        assert status == 400 and event.get("tier", "anonymous") == "anonymous"  # the row's default

    async def test_a_token_with_a_byte_that_is_not_utf8_is_401(self, token_client: Any) -> None:
        reader, writer = await asyncio.open_connection(token_client.host, token_client.port)
        writer.write(f"GET {FOX} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".encode()
                     + b"Authorization: Bearer ab\xffcd\r\n\r\n")
        answer = await reader.read()
        writer.close()
        assert answer.split(b"\r\n", 1)[0].split()[1] == b"401" and b"invalid_token" in answer

    async def test_valid_token_never_reaches_the_logs(self, token_client: Any) -> None:
        with capture_logs() as logs:
            await token_client.get(FOX, headers={"Authorization": f"Bearer {GOOD}"})
            await token_client.get(f"{FOX}&token={GOOD}")
        assert logs and GOOD not in repr(logs)


class TestReferrers:
    async def test_allow_listed_referrer_gets_its_tier(self, token_client: Any) -> None:
        """The parameter, the Referer header and subdomains all count; only the host is recorded."""
        for kwargs in (
            {"url": f"{FOX}&referrer=partner.example"},
            {"url": FOX, "headers": {"Referer": "https://app.partner.example/page?secret=1"}},
            {"url": FOX, "headers": {"Origin": "https://partner.example"}},
        ):
            status, event = await terminal_event(token_client, kwargs.pop("url"), **kwargs)
            assert status == 200 and event["tier"] == "nectar"
            assert event["referrer"] in ("partner.example", "app.partner.example")

    async def test_other_referrer_is_anonymous_but_recorded(self, token_client: Any) -> None:
        status, event = await terminal_event(token_client, FOX, headers={"Referer": "https://notpartner.example/"})
        assert (event["tier"], event["referrer"]) == ("anonymous", "notpartner.example")

    async def test_token_decides_the_tier_over_a_referrer(self, token_client: Any) -> None:
        _, event = await terminal_event(token_client, f"{FOX}&referrer=partner.example&token={OTHER}")
        assert (event["tier"], event["referrer"]) == ("seed", "partner.example")

    @pytest.mark.parametrize(("raw", "host"), [
        ("https://Example.ORG/path?token=x", "example.org"), ("example.org", "example.org"),
        ("localhost:8080", "localhost"), ("", None), ("http://", None),
    ])
    def test_referrer_is_reduced_to_its_host(self, raw: str, host: str | None) -> None:
        assert normalise_referrer(raw) == host


class TestTokenFile:
    async def test_tokens_are_looked_up_by_digest(self, tmp_path: Path) -> None:
        validator = FileTokenValidator.from_file(write_tokens(tmp_path))
        assert (await validator.validate(GOOD)).username == "alice"
        assert await validator.validate(token_digest(GOOD)) is None

    def test_a_clear_text_token_in_the_file_is_rejected_at_start(self, tmp_path: Path) -> None:
        """Storing a token itself instead of its digest is a configuration error naming the setting."""
        file = tmp_path / "tokens.toml"
        file.write_text('[tokens]\n"my-token" = { user_id = "u", username = "x", tier = "seed" }\n')
        with pytest.raises(ConfigError, match="access.tokens_file"):
            FileTokenValidator.from_file(file)

    def test_a_tokens_file_without_its_table_is_refused_not_read_as_no_tokens(self, tmp_path: Path) -> None:
        """`[token]` for `[tokens]` started a service that knew no token, and said nothing."""
        file = tmp_path / "tokens.toml"
        file.write_text(f'[token]\n"{token_digest("t")}" = {{ user_id = "u", tier = "seed" }}\n')
        with pytest.raises(ConfigError, match=r"needs a \[tokens\] table .* \(found token\)"):
            FileTokenValidator.from_file(file)
        file.write_text("tokens = 5\n")
        with pytest.raises(ConfigError, match=r"needs a \[tokens\] table"):
            FileTokenValidator.from_file(file)

    def test_unknown_tier_is_rejected_at_start(self, tmp_path: Path) -> None:
        file = tmp_path / "tokens.toml"
        file.write_text(f'[tokens]\n"{token_digest("t")}" = {{ user_id = "u", tier = "gold" }}\n')
        with pytest.raises(ConfigError, match="tier"):
            FileTokenValidator.from_file(file)


class AuthService:
    """A local token service following the validator contract: GET with Bearer → {valid, userId, username, tier}."""

    def __init__(self) -> None:
        self.calls = 0
        self.delay = 0.0
        self.status = 200

    async def handle(self, request: web.Request) -> web.Response:
        self.calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.status != 200:
            return web.Response(status=self.status, text="down")
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if token == GOOD:
            return web.json_response({"valid": True, "userId": "u-9", "username": "carol", "tier": "nectar"})
        return web.json_response({"valid": False})


@pytest.fixture
async def auth_service(aiohttp_server: Any) -> tuple[AuthService, str]:
    service = AuthService()
    app = web.Application()
    app.router.add_get("/check", service.handle)
    server = await aiohttp_server(app)
    return service, str(server.make_url("/check"))


class TestHttpValidator:
    async def test_valid_and_invalid_answers(self, auth_service: tuple[AuthService, str]) -> None:
        service, url = auth_service
        validator = HttpTokenValidator(url, timeout=2, ttl=300, max_entries=100)
        try:
            account = await validator.validate(GOOD)
            assert account is not None and (account.user_id, account.tier) == ("u-9", "nectar")
            assert await validator.validate("nope") is None
        finally:
            await validator.close()

    async def test_answers_are_remembered_for_the_ttl(self, auth_service: tuple[AuthService, str]) -> None:
        """Within five minutes a token is not asked about again; after, it is."""
        service, url = auth_service
        clock = ManualClock()
        validator = HttpTokenValidator(url, timeout=2, ttl=300, max_entries=100, clock=clock)
        try:
            await asyncio.gather(*(validator.validate(GOOD) for _ in range(5)))
            await validator.validate("nope")
            await validator.validate("nope")
            assert service.calls == 2
            await clock.advance(299)
            await validator.validate(GOOD)
            assert service.calls == 2
            await clock.advance(2)
            await validator.validate(GOOD)
            assert service.calls == 3
        finally:
            await validator.close()

    async def test_timeout_is_503_and_not_remembered(self, auth_service: tuple[AuthService, str]) -> None:
        """A silent token service is 'unavailable', never 'invalid'; the next request asks again."""
        service, url = auth_service
        service.delay = 1.0
        validator = HttpTokenValidator(url, timeout=0.1, ttl=300, max_entries=100)
        try:
            with pytest.raises(AuthUnavailable):
                await validator.validate(GOOD)
            service.delay = 0
            assert (await validator.validate(GOOD)) is not None
            assert service.calls == 2
        finally:
            await validator.close()

    async def test_service_through_the_app(
        self, auth_service: tuple[AuthService, str], make_client: ClientFactory
    ) -> None:
        """Configured by URL: valid → the account's tier, invalid → 401, failing service → 503."""
        service, url = auth_service
        client = await make_client(make_settings(access={"validator_url": url, "validator_timeout": 0.5}))
        status, event = await terminal_event(client, FOX, headers={"Authorization": f"Bearer {GOOD}"})
        assert (status, event["tier"], event["username"]) == (200, "nectar", "carol")
        assert (await client.get(f"{FOX}&token=bad")).status == 401
        asked = service.calls
        for token in ("a%0D%0AX:1", "a%00b"):  # no token has these; no header could carry them
            assert (await client.get(f"{FOX}&token={token}")).status == 401
        assert service.calls == asked
        service.status = 500
        response = await client.get(f"{FOX}&token=another")
        assert response.status == 503 and (await response.json())["error"] == "auth_unavailable"


def request_from(peer: str, forwarded: str | None = None) -> web.Request:
    headers = {"X-Forwarded-For": forwarded} if forwarded else {}
    request = make_mocked_request("GET", "/", headers=headers)
    return request.clone(remote=peer)


class TestClientAddress:
    def test_forwarded_for_from_an_untrusted_peer_is_ignored(self) -> None:
        """A client cannot pick its own queue by sending a spoofed header."""
        address = ClientAddress(["10.0.0.0/8"])
        assert address(request_from("203.0.113.7", "1.2.3.4")) == "203.0.113.7"

    def test_trusted_proxy_reveals_the_client(self) -> None:
        """The right-most address that is not a trusted proxy is the client; spoofed left entries are skipped."""
        address = ClientAddress(["10.0.0.0/8", "192.168.1.1"])
        assert address(request_from("10.1.2.3", "1.2.3.4")) == "1.2.3.4"
        assert address(request_from("10.1.2.3", "6.6.6.6, 198.51.100.2, 192.168.1.1")) == "198.51.100.2"

    def test_trusted_proxy_without_header_is_the_peer(self) -> None:
        assert ClientAddress(["10.0.0.0/8"])(request_from("10.0.0.5")) == "10.0.0.5"

    def test_an_ipv6_client_is_its_network(self) -> None:
        """Limits and blocks follow the network a subscriber holds, not the address it picks in it."""
        assert ClientAddress([])(request_from("2001:db8:1:2:3:4:5:6")) == "2001:db8:1:2::/64"
        assert ClientAddress([], ipv6_prefix=48)(request_from("2001:db8:1:2::6")) == "2001:db8:1::/48"
        assert ClientAddress([], ipv6_prefix=128)(request_from("2001:db8::6")) == "2001:db8::6/128"
        assert ClientAddress([])(request_from("::ffff:198.51.100.7")) == "198.51.100.7"
        assert ClientAddress(["10.0.0.0/8"])(request_from("10.0.0.1", "2001:db8:9::1")) == "2001:db8:9::/64"

    async def test_a_forwarded_hop_with_a_byte_that_is_not_utf8_is_served(self, make_client: ClientFactory) -> None:
        """Through a trusted proxy the hop names the client's queue; what uses it must not break."""
        client = await make_client(make_settings(access={"trusted_proxies": ["127.0.0.1"]}))
        reader, writer = await asyncio.open_connection(client.host, client.port)
        writer.write(f"GET {FOX} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".encode()
                     + b"X-Forwarded-For: 1.2.3.4, ab\xffcd\r\n\r\n")
        answer = await reader.read()
        writer.close()
        assert answer.split(b"\r\n", 1)[0].split()[1] == b"200"
