"""Self-hosted GPU workers: a registry they announce themselves to, and a backend that uses them.

Worker protocol (image.pollinations.ai's):

    POST {worker}/generate   {prompts: [p], width, height, seed, negative_prompt, steps}
    → [{image: base64, has_nsfw_concept: bool, concept: {special_scores: {...}}}]

Workers announce `POST /register {url, type[, concurrency]}` with `Authorization: Bearer SECRET`
(the shared secret from the variable `workers.secret_env` names) and repeat it as a heartbeat; a
worker not heard from for `workers.heartbeat_timeout` seconds gets no more requests. A request goes
to the least busy active worker of the backend's type (busy / concurrency, then least recently
used), waits while every worker is at its concurrency, and moves to another worker after a failure.
A worker that fails `workers.rest_after_failures` times in a row rests for `workers.rest_seconds`:
it gets requests only when every worker of its type rests, and one success ends its streak (a
broken worker that heartbeats fails fast, so it always looked the least busy).
The worker's safety flags travel in `GeneratedImage.backend_flags` (keys in base.py).
"""

from __future__ import annotations

import asyncio
import hmac
import os
import time
from collections.abc import Collection
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import structlog
from PIL import Image
from yarl import URL

from ..config import BackendSettings, WorkerSettings
from ..errors import BackendUnavailable, BadRequest, Forbidden, Unauthorized
from ..params import ImageParams
from .base import (
    CALL_TIMING, FLAG_CONCEPT_PREFIX, FLAG_NSFW, BackendError, GeneratedImage, NoCapacity, call_sent, waiting_for_room,
)
from .breaker import Clock
from .transport import (
    check_status, client_session, decode_base64, decode_image, mapped_errors, parse_json, read_limited,
)

log = structlog.get_logger("image_service.generation.workers")

MAX_TYPE_LENGTH = 100
MAX_URL_LENGTH = 2048
# How often a request waiting for a free worker re-checks, so expired heartbeats are noticed.
WAIT_RECHECK = 1.0


@dataclass(slots=True)
class Worker:
    url: str
    type: str
    concurrency: int
    last_seen: float
    busy: int = 0
    served: int = 0
    failures: int = 0
    last_pick: int = 0
    # Failures of the worker's own (not refusals, not cancellations) since its last success.
    streak: int = 0
    resting_until: float = 0.0


def _is_http_url(text: str) -> bool:
    """http(s) with a host and no credentials, query or fragment (a token hides there as well): the
    URL is logged and listed, and a worker authenticates to us, not we to it."""
    try:
        parsed = URL(text)
        host = parsed.host
        return (parsed.scheme in ("http", "https") and bool(host and host.isprintable())
                and parsed.port is not None and parsed.user is None and parsed.password is None
                and not parsed.raw_query_string and not parsed.raw_fragment)
    except ValueError:
        return False


class WorkerRegistry:
    """Known workers, their heartbeat and load; selection never waits on I/O."""

    def __init__(self, settings: WorkerSettings, clock: Clock = time.monotonic, secret: str | None = None) -> None:
        self._settings = settings
        self._clock = clock
        self._secret = secret if secret is not None else os.environ.get(settings.secret_env, "")
        self._workers: dict[str, Worker] = {}
        self._picks = 0
        self._freed = asyncio.Event()

    def authorize(self, header: str | None) -> None:
        """Raise 401 without credentials, 403 with wrong ones or when no secret is configured."""
        if not self._secret:
            raise Forbidden(f"worker registration is disabled: set {self._settings.secret_env} to enable it")
        if not header:
            raise Unauthorized("worker registration needs the header `Authorization: Bearer <secret>`")
        scheme, _, token = header.partition(" ")
        given = token.strip().encode("utf-8", "surrogateescape")  # undecodable bytes are simply wrong
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, self._secret.encode()):
            raise Forbidden("the worker secret is wrong")

    def register(self, body: Any) -> Worker:
        """Add or refresh a worker from a registration body; the heartbeat is the same call."""
        if not isinstance(body, dict):
            raise BadRequest("registration body must be a JSON object {url, type}")
        url, kind, concurrency = body.get("url"), body.get("type"), body.get("concurrency", self._settings.concurrency)
        if not isinstance(url, str) or len(url) > MAX_URL_LENGTH or not _is_http_url(url):
            raise BadRequest("registration `url` must be an http(s) URL without credentials")
        # Canonical (host case and trailing dot, default port, dot segments): `…:8000/.` was a second
        # worker at the same address, doubling what it was sent.
        canonical = URL(url)
        url = str(canonical.with_host(canonical.raw_host.rstrip(".")) if canonical.raw_host else canonical).rstrip("/")
        if len(url) > MAX_URL_LENGTH:
            raise BadRequest("registration `url` must be an http(s) URL without credentials")
        if not isinstance(kind, str) or not 0 < len(kind) <= MAX_TYPE_LENGTH:
            raise BadRequest(f"registration `type` must be a non-empty string of at most {MAX_TYPE_LENGTH} characters")
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or not 1 <= concurrency <= 256:
            raise BadRequest("registration `concurrency` must be an integer from 1 to 256")
        now = self._clock()
        worker = self._workers.get(url)
        if worker is None:
            self._forget_inactive(now)
            if len(self._workers) >= self._settings.max_workers:
                raise BackendUnavailable(f"the worker registry is full ({self._settings.max_workers} workers)")
            worker = self._workers[url] = Worker(url=url, type=kind, concurrency=concurrency, last_seen=now)
        worker.type, worker.concurrency, worker.last_seen = kind, concurrency, now
        self._freed.set()
        return worker

    def _is_active(self, worker: Worker, now: float) -> bool:
        return now - worker.last_seen <= self._settings.heartbeat_timeout

    def _forget_inactive(self, now: float) -> None:
        for url in [url for url, w in self._workers.items() if not self._is_active(w, now) and not w.busy]:
            del self._workers[url]

    def active(self, kind: str) -> list[Worker]:
        now = self._clock()
        return [w for w in self._workers.values() if w.type == kind and self._is_active(w, now)]

    async def acquire(self, kind: str, exclude: Collection[str] = ()) -> Worker:
        """The least busy active worker of `kind` not in `exclude`, resting ones only when all rest;
        waits while all are at capacity."""
        while True:
            candidates = [w for w in self.active(kind) if w.url not in exclude]
            if not candidates:
                raise NoCapacity(f"no active {kind!r} worker is registered", "no_workers")
            now = self._clock()
            candidates = [w for w in candidates if w.resting_until <= now] or candidates
            free = [w for w in candidates if w.busy < w.concurrency]
            if free:
                worker = min(free, key=lambda w: (w.busy / w.concurrency, w.last_pick))
                self._picks += 1
                worker.busy, worker.last_pick = worker.busy + 1, self._picks
                return worker
            self._freed.clear()
            try:
                async with asyncio.timeout(WAIT_RECHECK):
                    await self._freed.wait()
            except TimeoutError:
                pass

    def release(self, worker: Worker, ok: bool, fault: bool = False) -> None:
        """`fault`: the failure was the worker's own (counted towards a rest)."""
        worker.busy -= 1
        if ok:
            worker.served += 1
            worker.streak, worker.resting_until = 0, 0.0
        else:
            worker.failures += 1
        if fault:
            worker.streak += 1
            if worker.streak >= self._settings.rest_after_failures:
                worker.resting_until = self._clock() + self._settings.rest_seconds
                log.warning("worker.resting", worker=worker.url, failures=worker.streak, seconds=self._settings.rest_seconds)
        self._freed.set()

    def snapshot(self) -> list[dict[str, Any]]:
        now = self._clock()
        return [
            {
                "url": w.url, "type": w.type, "active": self._is_active(w, now), "busy": w.busy,
                "concurrency": w.concurrency, "served": w.served, "failures": w.failures,
                "restingSecondsLeft": round(max(w.resting_until - now, 0.0), 3),
                "lastSeenSecondsAgo": round(now - w.last_seen, 3),
            }
            for w in sorted(self._workers.values(), key=lambda w: (w.type, w.url))
        ]


def _flags(item: dict[str, Any]) -> dict[str, float]:
    nsfw = item.get("has_nsfw_concept")
    flagged = any(x is True for x in nsfw) if isinstance(nsfw, list) else nsfw is True
    flags = {FLAG_NSFW: 1.0 if flagged else 0.0}
    concept = item.get("concept")
    scores = concept.get("special_scores") if isinstance(concept, dict) else None
    if isinstance(scores, list):
        scores = dict(enumerate(scores))
    if isinstance(scores, dict):
        for key, value in scores.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                flags[f"{FLAG_CONCEPT_PREFIX}{key}"] = float(value)
    return flags


def parse_worker_response(body: bytes, width: int, height: int, what: str) -> tuple[Image.Image, dict[str, float]]:
    """Runs in the executor: the first image of a worker's answer and its safety flags."""
    document = parse_json(body, what)
    if not isinstance(document, list) or not document or not isinstance(document[0], dict):
        raise BackendError(f"{what} answered JSON that is not a list of images", "malformed_json")
    item = document[0]
    return decode_image(decode_base64(item.get("image"), what), width, height, what), _flags(item)


class WorkerBackend:
    """Sends requests to registered workers of one type."""

    def __init__(self, name: str, spec: BackendSettings, executor: Executor, registry: WorkerRegistry) -> None:
        self.name = name
        self.provider = spec.provider or "self-hosted"
        self.worker_type = spec.worker_type or name
        self._spec = spec
        self._executor = executor
        self._registry = registry
        self._session = client_session(spec)

    async def generate(self, params: ImageParams) -> GeneratedImage:
        tried: set[str] = set()
        last: BackendError | None = None
        for _ in range(self._spec.max_attempts):
            waiting_for_room()
            try:
                worker = await self._registry.acquire(self.worker_type, tried)
            except NoCapacity:
                if last is not None:
                    raise last from None
                raise
            call_sent()
            ok = fault = False
            try:
                image, flags = await self._call(worker, params)
                ok = True
                return GeneratedImage(image=image, backend=self.name, provider=self.provider, backend_flags=flags)
            except BackendError as exc:
                log.warning("worker.failed", backend=self.name, worker=worker.url, reason=exc.reason)
                tried.add(worker.url)
                last, fault = exc, exc.trips_breaker
            except asyncio.CancelledError:
                # The generation's deadline (productions are shielded from their clients): a worker
                # that held the request for most of the time counts it like a timeout of its own.
                timing = CALL_TIMING.get()
                fault = timing is not None and timing.held_by_the_service(asyncio.get_running_loop().time())
                raise
            finally:
                self._registry.release(worker, ok, fault)
        assert last is not None
        raise last

    async def _call(self, worker: Worker, params: ImageParams) -> tuple[Image.Image, dict[str, float]]:
        what = f"a {self.worker_type} worker"
        payload = {
            "prompts": [params.prompt], "width": params.width, "height": params.height, "seed": params.seed,
            "negative_prompt": params.negative_prompt, "steps": self._spec.steps,
        }
        async with mapped_errors(what):
            async with self._session.post(f"{worker.url}/generate", json=payload) as response:
                check_status(response, what)
                body = await read_limited(response, self._spec.max_body_bytes, what)
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, parse_worker_response, body, params.width, params.height, what
        )

    async def close(self) -> None:
        await self._session.close()
