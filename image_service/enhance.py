"""Prompt rewriting: `enhance=true` through an OpenAI-compatible chat model, and the referrer rule.

`PromptEnhancer.enhance` asks `POST {base_url}/v1/chat/completions` for a richer prompt and falls
back to the original on any failure or after `timeout` seconds: enhancement may make an image
better, never make a request fail. With no `base_url` configured it is a no-op.

`ReferrerTransform` is the seed's "bad domain" rule: prompts from configured referrer domains are
rewritten with a template before the cache key is computed (the result is a different image), and
the request is recorded with `was_transformed`.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import aiohttp
import structlog

from .config import EnhanceSettings
from .identity import domain_matches
from .params import ImageParams, normalise_prompt

log = structlog.get_logger("image_service.enhance")

MAX_ENHANCED_LENGTH = 2000


class PromptEnhancer:
    def __init__(self, settings: EnhanceSettings) -> None:
        self._url = f"{settings.base_url.rstrip('/')}/v1/chat/completions" if settings.base_url else None
        self._model = settings.model
        self._api_key = settings.api_key.get_secret_value()
        self._system_prompt = settings.system_prompt
        self._timeout = aiohttp.ClientTimeout(total=settings.timeout)
        self._session: aiohttp.ClientSession | None = None

    @property
    def enabled(self) -> bool:
        return self._url is not None

    async def enhance(self, params: ImageParams) -> ImageParams:
        """The params to generate with: the prompt rewritten when asked and possible, else unchanged."""
        if not params.enhance or self._url is None:
            return params
        start = time.perf_counter()
        try:
            prompt = await self._ask(params.prompt)
        except Exception as exc:  # any failure falls back: enhancement is best effort by contract
            log.warning("prompt.enhance_failed", reason=type(exc).__name__,
                        duration_ms=round((time.perf_counter() - start) * 1000, 3))
            return params
        log.info("prompt.enhanced", duration_ms=round((time.perf_counter() - start) * 1000, 3))
        return replace(params, prompt=prompt)

    async def _ask(self, prompt: str) -> str:
        assert self._url is not None
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        body: dict[str, Any] = {
            "messages": [{"role": "system", "content": self._system_prompt}, {"role": "user", "content": prompt}],
        }
        if self._model:
            body["model"] = self._model
        async with self._session.post(self._url, json=body, headers=headers) as response:
            response.raise_for_status()
            data = await response.json(content_type=None)
        text = normalise_prompt(str(data["choices"][0]["message"]["content"]))
        if not text:
            raise ValueError("empty completion")
        return text[:MAX_ENHANCED_LENGTH]

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class ReferrerTransform:
    """Rewrites prompts of requests from configured referrer domains."""

    def __init__(self, settings: EnhanceSettings) -> None:
        self._domains = tuple(domain.lower().strip(".") for domain in settings.transform_referrers)
        self._template = settings.transform_template

    def applies(self, referrer: str | None) -> bool:
        return referrer is not None and domain_matches(referrer, self._domains) is not None

    def apply(self, params: ImageParams) -> ImageParams:
        return replace(params, prompt=self._template.replace("{prompt}", params.prompt))
