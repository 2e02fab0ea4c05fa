"""The pipeline: request → cache → generation → moderation → response, as explicit stages.

The request stage (params.py) and the response stage (app.py) sit at the HTTP edge; this module
runs the three in between. Each stage emits exactly one structlog event with its duration; the
request id and parameters are already bound to the context by the HTTP layer.

Moderation brackets generation: the prompt is checked first (a refused prompt costs no generation),
the image is classified after, and the policy is applied to the verdict on every request, hits
included, since `safe` is not part of the cache key.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Executor
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import NoReturn

import structlog

from .cache import CachedImage, CacheStatus, ImageCache
from .errors import BackendUnavailable, ContentBlocked, ServiceError
from .generation import GeneratedImage, Generator
from .imaging import encode_jpeg
from .moderation import ContentPolicy, Moderator, PromptFindings, Refusal, Verdict
from .params import ImageParams
from .tracking import bind

log = structlog.get_logger("image_service.pipeline")
# Statuses under which this request's own production made the image (Redis down is a bypass).
GENERATED = frozenset({CacheStatus.MISS, CacheStatus.BYPASS})


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

    def __init__(
        self,
        cache: ImageCache,
        generator: Generator,
        moderator: Moderator,
        executor: Executor,
        content_policy: ContentPolicy,
        max_concurrent: int,
        permit_wait: float,
    ) -> None:
        self._cache = cache
        self._generator = generator
        self._moderator = moderator
        self._executor = executor
        self._content = content_policy
        # Over every client: a burst of distinct clients each held a decoded image until its encode
        # came up in the shared executor, gigabytes for a few hundred 2048x2048 requests.
        self._producing = asyncio.Semaphore(max_concurrent)
        self._max_concurrent = max_concurrent
        # Bounded: the wait runs inside the client's start slot, whose lifetime allows for it.
        self._permit_wait = permit_wait

    async def run(
        self, params: ImageParams, key: str | None = None, prepare: Prepare | None = None, client: str | None = None
    ) -> Outcome:
        """`key` is `params.cache_key()` when the caller has it; `prepare` brackets a generation (queues,
        enhancement); `client` is the caller's address, of which only a keyed hash is kept."""
        client_id = self._content.violations.client_id(client)
        self._content.violations.admit(client_id)
        prompt = self._check_prompt(params, client_id)
        key = key or params.cache_key()
        cached = await self._lookup(key)
        if cached is not None:
            self._bind_generation_facts(cached, cost=0.0)
            return self._enforce(Outcome(cached, CacheStatus.HIT), params, client_id)
        image, status = await self._cache.produce_once(
            key, lambda: self._prepared(params, key, prompt, prepare, client_id)
        )
        # Only the request that caused the generation pays for it; hits and shared waits cost nothing.
        cost = self._generator.cost_of(params.model) if status in GENERATED else 0.0
        self._bind_generation_facts(image, cost)
        bind(cache_status=status.value)
        return self._enforce(Outcome(image, status), params, client_id)

    @staticmethod
    def _bind_generation_facts(image: CachedImage, cost: float) -> None:
        """Bound here, in the request's context: the production runs in a task whose bindings stay there."""
        bind(backend=image.backend, provider=image.provider, cost=cost)

    async def _lookup(self, key: str) -> CachedImage | None:
        start = time.perf_counter()
        cached, outcome = await self._cache.lookup(key)
        bind(cache_status=outcome.value, cache_backend=self._cache.backend)
        log.info("cache.lookup", stage="cache", cache_status=outcome.value, duration_ms=_ms_since(start))
        return cached

    async def _prepared(
        self, params: ImageParams, key: str, prompt: PromptFindings, prepare: Prepare | None, client_id: str | None
    ) -> CachedImage:
        if prepare is None:
            return await self._produce(params, key, prompt)
        async with prepare(params) as generation_params:
            if generation_params.prompt != params.prompt:
                # An enhanced prompt is checked like the client's own before it is generated.
                enhanced = self._check_prompt(generation_params, client_id)
                prompt = PromptFindings(minor=prompt.minor or enhanced.minor, sexual=prompt.sexual or enhanced.sexual)
            return await self._produce(params, key, prompt, generation_params)

    async def _produce(
        self, params: ImageParams, key: str, prompt: PromptFindings, generation_params: ImageParams | None = None
    ) -> CachedImage:
        try:
            async with asyncio.timeout(self._permit_wait):
                await self._producing.acquire()
        except TimeoutError:
            raise BackendUnavailable(
                f"the service is making {self._max_concurrent} images already and none finished in "
                f"{self._permit_wait:g} s; try again shortly"
            ) from None
        try:
            return await self._produce_now(params, key, prompt, generation_params)
        finally:
            self._producing.release()

    async def _produce_now(
        self, params: ImageParams, key: str, prompt: PromptFindings, generation_params: ImageParams | None
    ) -> CachedImage:
        start = time.perf_counter()
        generated = await self._generate(generation_params or params)
        generation_ms = _ms_since(start)
        verdict = await self._moderate(generated, params, prompt)
        if verdict.never_servable:
            body = b""  # cached as a refusal, so a repeat costs no generation and serves nothing
        else:
            body = await asyncio.get_running_loop().run_in_executor(
                self._executor, encode_jpeg, generated.image, params, self._content.policy.shows_logo(verdict, params)
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
                exception=exc.message, duration_ms=_ms_since(start),
            )
            raise
        log.info(
            "generation.completed", stage="generation", backend=generated.backend,
            provider=generated.provider, duration_ms=_ms_since(start),
        )
        return generated

    def _check_prompt(self, params: ImageParams, client_id: str | None) -> PromptFindings:
        """Refuse before generation; a prompt that passes is logged with the image's verdict."""
        start = time.perf_counter()
        findings = self._content.prompts.check(params.prompt)
        refusal = self._content.policy.for_prompt(findings, params)
        if refusal is not None:
            verdict = Verdict.scored(
                sexual_score=1.0 if findings.sexual else 0.0, minor_score=1.0 if findings.minor else 0.0,
                is_mature=findings.sexual, is_child=findings.minor, labels=findings.labels,
                models={"prompt": "word lists"},
            )
            self._log_verdict(verdict, _ms_since(start))
            self._refuse(refusal, verdict, client_id, cache_status=None)
        return findings

    async def _moderate(self, generated: GeneratedImage, params: ImageParams, prompt: PromptFindings) -> Verdict:
        start = time.perf_counter()
        verdict = (await self._moderator.check_image(generated, params)).with_prompt(prompt)
        self._log_verdict(verdict, _ms_since(start))
        return verdict

    def _log_verdict(self, verdict: Verdict, duration_ms: float) -> None:
        log.info(
            "moderation.verdict", stage="moderation", is_mature=verdict.is_mature, is_child=verdict.is_child,
            labels=list(verdict.labels), categories=verdict.categories, category_scores=verdict.category_scores,
            models=verdict.models, duration_ms=duration_ms,
        )

    def _enforce(self, outcome: Outcome, params: ImageParams, client_id: str | None) -> Outcome:
        """Apply the policy to this request: the verdict may be fresh or replayed from the cache."""
        if not outcome.image.verdict.get("is_mature") and not outcome.image.verdict.get("is_child"):
            bind(is_mature=False, is_child=False)  # nothing flagged: no rule can refuse or unlist it
            return outcome
        verdict = Verdict.from_dict(outcome.image.verdict)
        refusal = self._content.policy.for_image(verdict, params)
        if refusal is not None:
            self._refuse(refusal, verdict, client_id, cache_status=outcome.cache_status.value)
        bind(is_mature=verdict.is_mature, is_child=verdict.is_child)
        if not self._content.policy.listed(verdict, params):
            bind(nofeed=True)
        if verdict.flagged:
            log.info(
                "content.flagged", stage="moderation", action="served" if not verdict.is_mature else "served_unlisted",
                is_mature=verdict.is_mature, is_child=verdict.is_child, labels=list(verdict.labels),
                category_scores=verdict.category_scores, cache_status=outcome.cache_status.value,
            )
        return outcome

    def _refuse(self, refusal: Refusal, verdict: Verdict, client_id: str | None, cache_status: str | None) -> NoReturn:
        bind(is_mature=verdict.is_mature, is_child=verdict.is_child)
        log.warning(
            "content.flagged", stage="moderation", action="refused", reason=refusal.reason.value,
            is_mature=verdict.is_mature, is_child=verdict.is_child, labels=list(verdict.labels),
            category_scores=verdict.category_scores, cache_status=cache_status,
        )
        if refusal.is_violation and self._content.violations.record(client_id):
            log.warning("moderation.client_blocked", client=client_id)
        raise ContentBlocked(refusal.message, reason=refusal.reason.value)
