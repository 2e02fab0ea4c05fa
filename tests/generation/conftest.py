"""Fixtures for the generation tests: fake services on loopback, settings naming them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from .servers import FakeService

Serve = Callable[[FakeService], Awaitable[TestServer]]


@pytest.fixture
def serve(aiohttp_server: Any) -> Serve:
    """Start a fake on a free 127.0.0.1 port (the test server cancels hung handlers when it stops)."""

    async def start(fake: FakeService) -> TestServer:
        return await aiohttp_server(fake.app())

    return start


def base_url(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


def fast(**spec: Any) -> dict[str, Any]:
    """A backend spec with timeouts short enough for tests."""
    return {"connect_timeout": 1.0, "timeout": 1.0, "max_body_bytes": 1024 * 1024, **spec}
