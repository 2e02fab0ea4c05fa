"""Local stand-ins for the services generation talks to, following each documented protocol.

Every fake serves on 127.0.0.1 (aiohttp's test server) and can be switched to a failure mode:
an HTTP 500, a hang past any timeout, malformed JSON, an oversized body, non-image content, or an
image of the wrong size.
"""

from __future__ import annotations

import asyncio
import base64
import io
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from PIL import Image

MODES = ("ok", "error500", "refused", "hang", "malformed", "oversized", "not_image", "wrong_size", "round16")


def png(width: int, height: int, colour: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(out, "PNG")
    return out.getvalue()


@dataclass
class FakeService:
    """Records what it received; `mode` decides how it answers."""

    mode: str = "ok"
    requests: list[dict[str, Any]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    hold: bool = False
    in_flight: int = 0

    async def _gate(self) -> None:
        if self.mode == "hang":
            await asyncio.sleep(30)
        if self.hold:
            self.in_flight += 1
            try:
                await self.release.wait()
            finally:
                self.in_flight -= 1

    def image_bytes(self, width: int, height: int) -> bytes:
        if self.mode == "wrong_size":
            return png(width + 100, height)
        if self.mode == "round16":  # as diffusion workers do
            return png(width // 16 * 16, height // 16 * 16)
        if self.mode == "not_image":
            return b"<html>definitely not an image</html>"
        return png(width, height)

    def failure(self) -> web.Response | None:
        if self.mode == "error500":
            return web.json_response({"error": "boom"}, status=500)
        if self.mode == "refused":  # OpenAI's answer to a prompt its content policy refuses
            error = {"code": "content_policy_violation", "message": "Your request was rejected", "type": "invalid_request_error"}
            return web.json_response({"error": error}, status=400)
        if self.mode == "malformed":
            return web.Response(body=b'{"data": [{"b64_json": ', content_type="application/json")
        if self.mode == "oversized":
            return web.Response(body=b"x" * (2 * 1024 * 1024), content_type="application/json")
        return None


class OpenAIImages(FakeService):
    """POST /v1/images/generations (JSON) and /v1/images/edits (multipart) → {data: [{b64_json}]}."""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/images/generations", self.generations)
        app.router.add_post("/v1/images/edits", self.edits)
        app.router.add_post("/deployments/dalle/images/generations", self.generations)
        return app

    def _answer(self, size: str) -> web.Response:
        width, height = (int(side) for side in size.split("x"))
        encoded = base64.b64encode(self.image_bytes(width, height)).decode()
        return web.json_response({"created": 1, "data": [{"b64_json": encoded}]})

    async def generations(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append({"path": request.path, "query": dict(request.query), "headers": dict(request.headers),
                              "json": body})
        await self._gate()
        return self.failure() or self._answer(body["size"])

    async def edits(self, request: web.Request) -> web.Response:
        form: dict[str, Any] = {}
        images: list[bytes] = []
        async for part in await request.multipart():
            if part.name == "image[]":
                images.append(await part.read())
            else:
                form[part.name] = await part.text()
        self.requests.append({"path": request.path, "form": form, "images": images, "headers": dict(request.headers)})
        await self._gate()
        return self.failure() or self._answer(form["size"])


class GPUWorker(FakeService):
    """POST /generate {prompts, width, height, seed, negative_prompt, steps} → [{image, has_nsfw_concept, concept}]."""

    nsfw: bool = False
    scores: dict[str, float] = {}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/generate", self.generate)
        return app

    async def generate(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        await self._gate()
        failure = self.failure()
        if failure is not None:
            return failure
        encoded = base64.b64encode(self.image_bytes(body["width"], body["height"])).decode()
        return web.Response(body=orjson.dumps([{
            "image": encoded, "has_nsfw_concept": self.nsfw, "concept": {"special_scores": self.scores},
        }]), content_type="application/json")


class ImageHost(FakeService):
    """Serves reference images: GET /ref.png, /redirect (to /ref.png), /big, /text."""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/ref.png", self.ref)
        app.router.add_get("/redirect", self.redirect)
        return app

    async def ref(self, request: web.Request) -> web.Response:
        self.requests.append({"path": request.path, "host": request.host})
        await self._gate()
        if self.mode == "not_image":
            return web.Response(text="hello", content_type="text/plain")
        if self.mode == "oversized":
            return web.Response(body=png(1500, 1500, (1, 2, 3)) + b"\0" * 200_000, content_type="image/png")
        return web.Response(body=png(8, 8), content_type="image/png")

    async def redirect(self, request: web.Request) -> web.Response:
        self.requests.append({"path": request.path})
        raise web.HTTPFound("/ref.png")
