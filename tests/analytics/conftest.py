"""Fixtures for the Tinybird project: rows from the real server, chdb, and the official Tinybird CLI."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from image_service.analytics.engine import LocalEngine
from image_service.app import TRACKING, create_app
from image_service.errors import GenerationError
from image_service.generation import GeneratedImage
from image_service.moderation import Verdict
from image_service.params import ImageParams
from image_service.tracking import record_text_completion

from ..conftest import CountingBackend, make_settings

ROOT = Path(__file__).resolve().parents[2]
TB_BIN = ROOT / ".venv-tb" / "bin"
TB_RENDER = Path(__file__).with_name("tb_render.py")
MODELS = {"sketch": {"backend": "embedded", "max_side": 512, "default_side": 128}}


def tb_executable(name: str) -> Path:
    path = TB_BIN / name
    if not path.exists():
        pytest.fail(f"{path} is missing: `make tinybird-cli` installs the official Tinybird CLI there")
    return path


def official_render(jobs: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Render with tinybird.sql_template.render_sql_template (in its own venv), one process per batch."""
    done = subprocess.run(
        [str(tb_executable("python")), str(TB_RENDER)], input=json.dumps(jobs), capture_output=True,
        text=True, timeout=120, check=True,
    )
    return json.loads(done.stdout)


class FlaggingModerator:
    """A moderator with a fixed rule: prompts mentioning 'beach' are mature, 'playground' a child."""

    async def check_image(self, generated: GeneratedImage, params: ImageParams) -> Verdict:
        return Verdict(is_mature="beach" in params.prompt, is_child="playground" in params.prompt)

    async def close(self) -> None:
        return None


async def _traffic(directory: Path) -> list[dict[str, Any]]:
    """A mix of real requests: misses, hits, shared waits, 400s, 404s, 502s, private, two models; text rows."""
    events = directory / "events.ndjson"
    settings = make_settings(
        tracking={"max_wait": 0.02, "local_path": str(events), "spool_dir": str(directory / "spool")},
        models=MODELS,
    )
    backend = CountingBackend()
    client = TestClient(TestServer(create_app(settings, backends={"embedded": backend}, moderator=FlaggingModerator())))
    await client.start_server()
    try:
        for prompt in ("a red fox", "a beach at dusk", "a playground", "tea"):
            for model, size in (("procedural", 64), ("sketch", 48), ("sketch", 32)):
                url = f"/prompt/{prompt}?model={model}&width={size}&height={size}&seed=1"
                for _ in range(2 if prompt != "tea" else 4):
                    assert (await client.get(url)).status == 200
        assert (await client.get("/prompt/my%20secret?private=true&width=40&height=40")).status == 200
        for url in ("/prompt/x?model=nope", "/prompt/x?width=oops", "/prompt/x?seed=abc&model=sketch"):
            assert (await client.get(url)).status == 400
        for url in ("/nowhere", "/also/missing"):
            assert (await client.get(url)).status == 404
        backend.fail_with = GenerationError("the backend answered garbage")
        for seed in range(3):
            assert (await client.get(f"/prompt/broken?model=sketch&seed={seed}&width=32&height=32")).status == 502
        backend.fail_with = None
        backend.gate.clear()
        calls = backend.calls
        waiting = [asyncio.ensure_future(client.get("/prompt/together?width=32&height=32")) for _ in range(3)]
        while backend.calls == calls:
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)
        backend.gate.set()
        assert [(await w).status for w in waiting] == [200] * 3
        now = time.time()
        for i, (model, tier, status, http) in enumerate([
            ("openai", "seed", "success", 200), ("openai", "flower", "success", 200), ("openai", "seed", "error", 500),
            ("mistral", "anonymous", "success", 200), ("mistral", "nectar", "rejected", 400),
            ("openai-large", "flower", "success", 200),
        ]):
            record_text_completion(
                model=model, provider="azure", cost=0.001 * i, prompt_tokens=10 + i, completion_tokens=5 * i,
                duration_ms=100.0 + 37.5 * i, start_time=now - 1, user=f"user-{i % 3}", username=f"name-{i}",
                tier=tier, status=status, http_status=http,
            )
        assert await client.app[TRACKING].forwarder.flush(timeout=10)
    finally:
        await client.close()
    return [orjson.loads(line) for line in events.read_bytes().splitlines()]


@pytest.fixture(scope="session")
def traffic(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Every row the real server (and the text tracker) wrote to the local NDJSON sink."""
    return asyncio.run(_traffic(tmp_path_factory.mktemp("traffic")))


@pytest.fixture(scope="module")
def engine() -> Iterator[LocalEngine]:
    """One chdb database per test module, the table created from the datafile."""
    local = LocalEngine()
    yield local
    local.close()
