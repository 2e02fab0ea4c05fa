"""Another image.pollinations.ai-compatible server as a backend, so instances can chain.

    GET {base_url}/prompt/{prompt}?model=&width=&height=&seed=&negative_prompt=&nologo=true&nofeed=true
        [&private=true][&image=a|b]   → image bytes (Content-Type image/*)

`nologo` is always sent: this service draws its own logo after moderation. Reference URLs are passed
on for the upstream to fetch under its own rules. An optional token (the variable named by
`api_key_env`) goes in `Authorization: Bearer`.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import Executor
from urllib.parse import quote

from yarl import URL

from ..config import BackendSettings
from ..params import ImageParams
from .base import BackendError, GeneratedImage
from .transport import check_status, client_session, decode_image, mapped_errors, read_limited


def prompt_url(base: URL, prompt: str) -> URL:
    """`{base}/prompt/{prompt}`, the prompt whole: '/' escaped, and '.' or '..' too, which a URL
    would otherwise resolve away (the upstream was asked for '/'). Built encoded, or yarl would
    normalise %2E back to a dot segment; the base is encoded first (an international host as IDNA)."""
    segment = quote(prompt, safe="")
    if not segment.strip("."):
        segment = segment.replace(".", "%2E")
    return URL(f"{str(base).rstrip('/')}/prompt/{segment}", encoded=True)


class PollinationsBackend:
    """One upstream server speaking the same `GET /prompt/{prompt}` API as this service."""

    def __init__(self, name: str, spec: BackendSettings, executor: Executor, model_names: dict[str, str]) -> None:
        self.name = name
        self.provider = spec.provider or "pollinations"
        self._spec = spec
        self._executor = executor
        self._model_names = model_names
        token = os.environ.get(spec.api_key_env, "") if spec.api_key_env else ""
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._session = client_session(spec)
        self._what = f"the {name} backend"
        self._base = URL(spec.base_url)

    def _query(self, params: ImageParams) -> dict[str, str]:
        query = {
            "model": self._model_names.get(params.model) or params.model,
            "width": str(params.width),
            "height": str(params.height),
            "seed": str(params.seed),
            "negative_prompt": params.negative_prompt,
            "quality": params.quality,
            "nologo": "true",
            "nofeed": "true",
        }
        if params.private:
            query["private"] = "true"
        if params.image:
            query["image"] = "|".join(params.image)
        return query

    async def generate(self, params: ImageParams) -> GeneratedImage:
        url = prompt_url(self._base, params.prompt)
        async with mapped_errors(self._what):
            async with self._session.get(url, params=self._query(params), headers=self._headers) as response:
                check_status(response, self._what)
                if not response.content_type.startswith("image/"):
                    raise BackendError(f"{self._what} answered {response.content_type}, not an image", "not_image")
                body = await read_limited(response, self._spec.max_body_bytes, self._what)
        image = await asyncio.get_running_loop().run_in_executor(
            self._executor, decode_image, body, params.width, params.height, self._what
        )
        return GeneratedImage(image=image, backend=self.name, provider=self.provider)

    async def close(self) -> None:
        await self._session.close()
