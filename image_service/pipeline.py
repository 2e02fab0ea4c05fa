"""The pipeline: request → cache → generation → moderation → response, as explicit stages.

The request stage (params.py) and the response stage (app.py) sit at the HTTP edge; this module
runs the three in between. Each stage emits exactly one structlog event with its duration; the
request id and parameters are already bound to the context by the HTTP layer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Executor
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

import structlog

from .cache import CachedImage, CacheStatus, ImageCache
from .errors import ServiceError
from .generation import GeneratedImage, Generator
from .imaging import encode_jpeg
from .moderation import Moderator, Verdict
from .params import ImageParams
from .tracking import bind

log = structlog.get_logger("image_service.pipeline")


def _ms_since(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)


@dataclass(frozen=True, slots=True)
class Outcome:
    image: CachedImage
    cache_status: CacheStatus


# Wraps a production: may wait for a queue slot, and yields the params to generate with (e.g. an
# enhanced prompt). Runs only on a cache miss, once per single-flight production.
Prepare = Callable[[ImageParams], AbstractAsyncContextManager[ImageParams]]


class Pipeline:
    """Produces the served image for validated parameters; raises ServiceError subclasses."""

    def __init__(self, cache: ImageCache, generator: Generator, moderator: Moderator, executor: Executor) -> None:
        self._cache = cache
        self._generator = generator
        self._moderator = moderator
        self._executor = executor

    async def run(self, params: ImageParams, key: str | None = None, prepare: Prepare | None = None) -> Outcome:
        """`key` is `params.cache_key()`, passed in when the caller already has it."""
        key = key or params.cache_key()
        cached = await self._lookup(key)
        if cached is not None:
            self._bind_generation_facts(cached, cost=0.0)
            return Outcome(cached, CacheStatus.HIT)
        image, status = await self._cache.produce_once(key, lambda: self._prepared(params, key, prepare))
        # Only the request that caused the generation pays for it; hits and shared waits cost nothing.
        cost = self._generator.cost_of(params.model) if status is CacheStatus.MISS else 0.0
        self._bind_generation_facts(image, cost)
        return Outcome(image, status)

    @staticmethod
    def _bind_generation_facts(image: CachedImage, cost: float) -> None:
        """Bound here, in the request's context: the production runs in a task whose bindings stay there."""
        bind(
            backend=image.backend, provider=image.provider, cost=cost,
            is_mature=image.verdict.get("is_mature", False), is_child=image.verdict.get("is_child", False),
        )

    async def _lookup(self, key: str) -> CachedImage | None:
        start = time.perf_counter()
        cached = await self._cache.get(key)
        outcome = CacheStatus.HIT if cached is not None else CacheStatus.MISS
        log.info("cache.lookup", stage="cache", cache_status=outcome.value, duration_ms=_ms_since(start))
        return cached

    async def _prepared(self, params: ImageParams, key: str, prepare: Prepare | None) -> CachedImage:
        if prepare is None:
            return await self._produce(params, key)
        async with prepare(params) as generation_params:
            return await self._produce(params, key, generation_params)

    async def _produce(self, params: ImageParams, key: str, generation_params: ImageParams | None = None) -> CachedImage:
        start = time.perf_counter()
        generated = await self._generate(generation_params or params)
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
            cause = exc.__cause__
            log.warning(
                "generation.failed", stage="generation", error=exc.code, reason=exc.message,
                exception=f"{type(cause).__name__}: {cause}" if cause is not None else exc.message,
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
