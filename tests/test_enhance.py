"""Prompt enhancement against a local OpenAI-compatible chat server, and the referrer transform rule."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web

from image_service.config import EnhanceSettings, load_settings
from image_service.enhance import PromptEnhancer
from image_service.params import parse_params

from .conftest import ClientFactory, CountingBackend, make_settings
from .test_pipeline_events import capture_logs

SETTINGS = load_settings()


class ChatServer:
    """Follows the OpenAI chat completions contract: POST /v1/chat/completions → choices[0].message.content."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.authorization: list[str | None] = []
        self.delay = 0.0
        self.status = 200
        self.reply: str | None = None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        self.authorization.append(request.headers.get("Authorization"))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.status != 200:
            return web.json_response({"error": {"message": "overloaded"}}, status=self.status)
        user = body["messages"][-1]["content"]
        content = self.reply if self.reply is not None else f"  A luminous painting of {user}, golden hour\n"
        return web.json_response({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]})


@pytest.fixture
async def chat(aiohttp_server: Any) -> tuple[ChatServer, str]:
    server = ChatServer()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", server.handle)
    running = await aiohttp_server(app)
    return server, str(running.make_url("/")).rstrip("/")


def params(enhance: bool = True) -> Any:
    return parse_params("a fox", {"enhance": "true" if enhance else "false"}, SETTINGS.models, "procedural", 2000)


class TestPromptEnhancer:
    async def test_rewrites_the_prompt(self, chat: tuple[ChatServer, str]) -> None:
        server, url = chat
        enhancer = PromptEnhancer(EnhanceSettings(base_url=url, model="tiny", api_key="sk-chat-secret"))
        try:
            result = await enhancer.enhance(params())
        finally:
            await enhancer.close()
        assert result.prompt == "A luminous painting of a fox, golden hour"
        assert server.requests[0]["model"] == "tiny" and server.authorization == ["Bearer sk-chat-secret"]

    async def test_timeout_falls_back_to_the_original(self, chat: tuple[ChatServer, str]) -> None:
        server, url = chat
        server.delay = 2.0
        enhancer = PromptEnhancer(EnhanceSettings(base_url=url, timeout=0.2))
        try:
            assert (await enhancer.enhance(params())).prompt == "a fox"
        finally:
            await enhancer.close()

    async def test_server_error_falls_back_to_the_original(self, chat: tuple[ChatServer, str]) -> None:
        server, url = chat
        server.status = 503
        enhancer = PromptEnhancer(EnhanceSettings(base_url=url))
        try:
            assert (await enhancer.enhance(params())).prompt == "a fox"
        finally:
            await enhancer.close()

    async def test_not_asked_or_not_configured_is_a_no_op(self, chat: tuple[ChatServer, str]) -> None:
        server, url = chat
        configured = PromptEnhancer(EnhanceSettings(base_url=url))
        try:
            assert (await configured.enhance(params(enhance=False))).prompt == "a fox"
            assert (await PromptEnhancer(EnhanceSettings()).enhance(params())).prompt == "a fox"
        finally:
            await configured.close()
        assert server.requests == []


class RecordingBackend(CountingBackend):
    def __init__(self) -> None:
        super().__init__()
        self.prompts: list[str] = []

    async def generate(self, params: Any) -> Any:
        self.prompts.append(params.prompt)
        return await super().generate(params)


class TestThroughTheService:
    async def test_enhanced_prompt_reaches_the_backend_once(
        self, chat: tuple[ChatServer, str], make_client: ClientFactory
    ) -> None:
        """The backend paints the rewritten prompt; a cache hit does not ask the text model again."""
        server, url = chat
        backend = RecordingBackend()
        client = await make_client(make_settings(enhance={"base_url": url}), backends={"embedded": backend})
        for _ in range(2):
            assert (await client.get("/prompt/a%20fox?enhance=true&width=32&height=32")).status == 200
        assert backend.prompts == ["A luminous painting of a fox, golden hour"] and len(server.requests) == 1

    async def test_an_enhanced_prompt_is_checked_before_it_is_generated(
        self, chat: tuple[ChatServer, str], make_client: ClientFactory
    ) -> None:
        """A text model that turns a harmless prompt into a sexual one involving a minor is refused (451)
        before generation, exactly as if the client had sent it."""
        server, url = chat
        server.reply = "a nude teenager on a beach"
        backend = RecordingBackend()
        client = await make_client(make_settings(enhance={"base_url": url}), backends={"embedded": backend})
        response = await client.get("/prompt/a%20day%20at%20the%20beach?enhance=true&width=32&height=32")
        assert response.status == 451 and (await response.json())["error"] == "content_blocked"
        assert backend.prompts == []

    async def test_about_says_whether_enhancement_is_available(
        self, chat: tuple[ChatServer, str], make_client: ClientFactory
    ) -> None:
        off = await make_client()
        on = await make_client(make_settings(enhance={"base_url": chat[1]}))
        assert [m["enhanceAvailable"] for m in await (await off.get("/about")).json()] == [False]
        assert [m["enhanceAvailable"] for m in await (await on.get("/about")).json()] == [True]

    async def test_referrer_rule_transforms_and_is_recorded(self, make_client: ClientFactory) -> None:
        """Prompts from a configured referrer are rewritten by the template and rows say was_transformed."""
        backend = RecordingBackend()
        settings = make_settings(enhance={
            "transform_referrers": ["bad.example"], "transform_template": "{prompt}, watercolour"})
        client = await make_client(settings, backends={"embedded": backend})
        with capture_logs() as logs:
            await client.get("/prompt/a%20fox?width=32&height=32", headers={"Referer": "https://www.bad.example/x"})
            await client.get("/prompt/a%20fox?width=32&height=32&referrer=good.example")
        assert backend.prompts == ["a fox, watercolour", "a fox"]
        flags = [e["was_transformed"] for e in logs if e["event"] == "request.completed"]
        assert flags == [True, False]
