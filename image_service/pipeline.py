"""The pipeline: request → cache → generation → moderation → response, as explicit stages.

The request stage (params.py) and the response stage (app.py) sit at the HTTP edge; this module
runs the three in between. Each stage emits exactly one structlog event with its duration; the
request id and parameters are already bound to the context by the HTTP layer.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor
from dataclasses import dataclass

import structlog

from .cache import CachedImage, CacheStatus, ImageCache
from .errors import ServiceError
from .generation import GeneratedImage, Generator
from .imaging import encode_jpeg
from .moderation import Moderator, Verdict
from .params import ImageParams

log = structlog.get_logger("image_service.pipeline")


def _ms_since(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)


@dataclass(frozen=True, slots=True)
class Outcome:
    image: CachedImage
    cache_status: CacheStatus


class Pipeline:
    """Produces the served image for validated parameters; raises ServiceError subclasses."""

    def __init__(self, cache: ImageCache, generator: Generator, moderator: Moderator, executor: Executor) -> None:
        self._cache = cache
        self._generator = generator
        self._moderator = moderator
        self._executor = executor

    async def run(self, params: ImageParams) -> Outcome:
        key = params.cache_key()
        cached = await self._lookup(key)
        if cached is not None:
            return Outcome(cached, CacheStatus.HIT)
        image, status = await self._cache.produce_once(key, lambda: self._produce(params, key))
        structlog.contextvars.bind_contextvars(cache_status=status.value)
        return Outcome(image, status)

    async def _lookup(self, key: str) -> CachedImage | None:
        start = time.perf_counter()
        cached, outcome = await self._cache.lookup(key)
        structlog.contextvars.bind_contextvars(cache_status=outcome.value, cache_backend=self._cache.backend)
        log.info("cache.lookup", stage="cache", cache_status=outcome.value, duration_ms=_ms_since(start))
        return cached

    async def _produce(self, params: ImageParams, key: str) -> CachedImage:
        start = time.perf_counter()
        generated = await self._generate(params)
        generation_ms = _ms_since(start)
        verdict = await self._moderate(generated, params)
        body = await asyncio.get_running_loop().run_in_executor(
            self._executor, encode_jpeg, generated.image, params, params.shows_logo and not verdict.flagged
        )
        image = CachedImage(
            body=body,
            content_type="image/jpeg",
            backend=generated.backend,
            provider=generated.provider,
            generation_ms=generation_ms,
            verdict=verdict.to_dict(),
        )
        await self._cache.set(key, image)
        return image

    async def _generate(self, params: ImageParams) -> GeneratedImage:
        start = time.perf_counter()
        try:
            generated = await self._generator.generate(params)
        except ServiceError as exc:
            log.warning(
                "generation.failed", stage="generation", error=exc.code, reason=exc.message,
                duration_ms=_ms_since(start),
            )
            raise
        log.info(
            "generation.completed", stage="generation", backend=generated.backend,
            provider=generated.provider, duration_ms=_ms_since(start),
        )
        return generated

    async def _moderate(self, generated: GeneratedImage, params: ImageParams) -> Verdict:
        start = time.perf_counter()
        verdict = await self._moderator.check_image(generated, params)
        log.info(
            "moderation.verdict", stage="moderation", is_mature=verdict.is_mature, is_child=verdict.is_child,
            labels=list(verdict.labels), duration_ms=_ms_since(start),
        )
        return verdict
