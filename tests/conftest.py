"""Shared fixtures: real apps built from real configuration, on aiohttp's test server."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import signal
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.web_runner import BaseRunner

from image_service.app import EXECUTOR, create_app
from image_service.config import Settings, load_settings
from image_service.generation import GeneratedImage
from image_service.generation.embedded import render
from image_service.moderation import Classifiers, load_classifiers
from image_service.params import ImageParams
from image_service.testing import RedisServer
from image_service.tracking import flush_logs

from .events_api import EventsAPI

ClientFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


class CountingBackend:
    """The embedded renderer behind a gate: counts calls, can be held open, made to fail or hang."""

    name = "embedded"
    provider = "test"

    def __init__(self) -> None:
        self.calls = 0
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail_with: Exception | None = None
        self.delay = 0.0

    async def generate(self, params: ImageParams) -> GeneratedImage:
        self.calls += 1
        await self.gate.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail_with is not None:
            raise self.fail_with
        return GeneratedImage(image=render(params), backend=self.name, provider=self.provider)

    async def close(self) -> None:
        return None


# Tests of other features run with an unthrottled anonymous tier (the shipped one spaces an anonymous
# client's generations 5 s apart), the pass-through image moderator (prompt checks and policy still
# apply) and telemetry without its encoder process (one more process to start per app); the access
# tests pass their own `tiers`, the moderation tests inject the real models, the telemetry tests
# pass their own `tracking`.
UNTHROTTLED = {"concurrency": 64, "interval": 0.0, "queue_depth": 1024}
TEST_DEFAULTS: dict[str, Any] = {
    "moderation": {"image": "none"}, "tiers": {"anonymous": UNTHROTTLED}, "tracking": {"encoder_process": False},
}


def make_settings(**sections: Any) -> Settings:
    return load_settings(overrides={**TEST_DEFAULTS, **sections})


@pytest.fixture(autouse=True)
def _work_in_tmp(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Relative paths (var/events.ndjson, var/spool) land in the test's own directory; the test's log
    lines are flushed into its own captured output, not after the session's summary."""
    monkeypatch.chdir(tmp_path)
    for name in ("TINYBIRD_API_KEY", "TINYBIRD_API_URL"):
        monkeypatch.delenv(name, raising=False)
    yield
    flush_logs()


@pytest.fixture
async def events_api(aiohttp_server: Any) -> tuple[EventsAPI, str]:
    """A local Events API on a loopback port: (its state, its base URL)."""
    api = EventsAPI()
    server = await aiohttp_server(api.app())
    return api, str(server.make_url("")).rstrip("/")


def tracking_to(url: str, **tracking: Any) -> dict[str, Any]:
    """A tracking section that ships to `url` quickly, for tests."""
    return {"api_url": url, "api_key": "test-token", "max_wait": 0.05, "backoff_base": 0.01,
            "backoff_cap": 0.05, "breaker_cooldown": 0.2, "timeout": 0.5, **tracking}


@pytest.fixture
def settings() -> Settings:
    return make_settings()


class ServedAsInProduction(TestServer):
    """aiohttp's test server cancels a handler whose client has left; `image-service serve` does not
    (web.run_app's default), and the tests must see what production does: a feed stream whose
    client left, say, is not cancelled for it."""

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        return await super()._make_runner(**{**kwargs, "handler_cancellation": False})


@pytest.fixture
def make_client(aiohttp_client: Any) -> ClientFactory:
    async def factory(settings: Settings | None = None, **kwargs: Any) -> TestClient[web.Request, web.Application]:
        return await aiohttp_client(ServedAsInProduction(create_app(settings or make_settings(), **kwargs)))

    return factory


@pytest.fixture
async def client(make_client: ClientFactory) -> TestClient[web.Request, web.Application]:
    return await make_client()


@pytest.fixture
def backend() -> CountingBackend:
    return CountingBackend()


@pytest.fixture(scope="session")
def classifiers() -> Classifiers:
    """The real NudeNet and age models, loaded and warmed up once for the whole run."""
    return load_classifiers(load_settings().moderation)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port, empty, stopped after the test."""
    with RedisServer(tmp_path) as server:
        yield server


@contextlib.contextmanager
def disk_full_at(size: int) -> Iterator[None]:
    """Files of this process stop growing at `size` bytes, as on a full disk: the kernel cuts a write
    short, then refuses the next (root ignores permissions, so a read-only directory would not do)."""
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def redis_settings(server: RedisServer, tiers: dict[str, Any] | None = None, **cache: Any) -> Settings:
    """Settings for the Redis backend on `server`, with short timeouts so failures show quickly."""
    sections = {"tiers": tiers} if tiers is not None else {}
    cache = {"backend": "redis", "redis_url": server.url, "redis_timeout": 0.3, "redis_backoff_max": 0.2,
             **cache}
    return make_settings(cache=cache, **sections)


__all__ = ["EXECUTOR", "ClientFactory", "CountingBackend", "EventsAPI", "make_settings", "redis_settings", "tracking_to"]
