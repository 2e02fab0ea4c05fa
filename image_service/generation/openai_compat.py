"""OpenAI-compatible images API: OpenAI itself, Azure OpenAI and self-hosted servers speaking it.

    POST {base_url}{path}            JSON {model, prompt, size: "WxH", n: 1, response_format: "b64_json"}
    POST {base_url}{edits_path}      multipart, the same fields plus `image[]` files (reference images)
    → {"data": [{"b64_json": "..."}]}

Authentication is `Authorization: Bearer KEY` (OpenAI) or `api-key: KEY` (Azure, which also wants
`?api-version=`). The key comes from the environment variable named by `api_key_env` and is never
logged. The answer is parsed and decoded in the CPU executor.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import Executor
from typing import Any

import aiohttp
from PIL import Image

from ..config import BackendSettings
from ..params import ImageParams
from .base import BackendError, GeneratedImage
from .references import ReferenceFetcher
from .transport import (
    check_status, client_session, decode_base64, decode_image, mapped_errors, parse_json, read_limited,
)


def parse_images_response(body: bytes, width: int, height: int, what: str) -> Image.Image:
    """Runs in the executor: the first `b64_json` of an images API answer, checked and decoded."""
    document = parse_json(body, what)
    data = document.get("data") if isinstance(document, dict) else None
    if not isinstance(data, list) or not data or not isinstance(data[0], dict):
        raise BackendError(f"{what} answered JSON without a `data` list of images", "malformed_json")
    return decode_image(decode_base64(data[0].get("b64_json"), what), width, height, what)


class OpenAIBackend:
    """One OpenAI-compatible endpoint."""

    def __init__(
        self,
        name: str,
        spec: BackendSettings,
        executor: Executor,
        references: ReferenceFetcher,
        model_names: dict[str, str],
    ) -> None:
        self.name = name
        self.provider = spec.provider or "openai"
        self._spec = spec
        self._executor = executor
        self._references = references
        self._model_names = model_names
        self._api_key = os.environ.get(spec.api_key_env, "") if spec.api_key_env else ""
        self._session = client_session(spec)
        self._what = f"the {name} backend"

    def _headers(self) -> dict[str, str]:
        if not self._api_key:
            return {}
        if self._spec.auth_header == "api-key":
            return {"api-key": self._api_key}
        return {"Authorization": f"Bearer {self._api_key}"}

    def _url(self, path: str) -> str:
        url = self._spec.base_url.rstrip("/") + path
        return f"{url}?api-version={self._spec.api_version}" if self._spec.api_version else url

    def _fields(self, params: ImageParams) -> dict[str, Any]:
        return {
            "model": self._model_names.get(params.model) or params.model,
            "prompt": params.prompt,
            "size": f"{params.width}x{params.height}",
            "n": 1,
            "response_format": "b64_json",
        }

    async def generate(self, params: ImageParams) -> GeneratedImage:
        fields = self._fields(params)
        if params.image:
            references = await self._references.fetch_all(params.image)
            form = aiohttp.FormData()
            for key, value in fields.items():
                form.add_field(key, str(value))
            for index, data in enumerate(references):
                form.add_field("image[]", data, filename=f"reference-{index}", content_type="application/octet-stream")
            request = self._session.post(self._url(self._spec.edits_path), data=form, headers=self._headers())
        else:
            request = self._session.post(self._url(self._spec.path), json=fields, headers=self._headers())
        async with mapped_errors(self._what):
            async with request as response:
                check_status(response, self._what)
                body = await read_limited(response, self._spec.max_body_bytes, self._what)
        image = await asyncio.get_running_loop().run_in_executor(
            self._executor, parse_images_response, body, params.width, params.height, self._what
        )
        return GeneratedImage(image=image, backend=self.name, provider=self.provider)

    async def close(self) -> None:
        await self._session.close()
        await self._references.close()
