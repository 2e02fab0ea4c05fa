"""The generation stage: route a model to its backends, in order, each behind a circuit breaker.

Backends implement `Backend` (base.py): `embedded` (built in), `openai` (openai_compat.py),
`workers` (workers.py) and `pollinations` (upstream.py). A model names a primary backend and an
ordered `fallback` list; `Generator` tries them in turn, skipping at once a backend whose breaker is
open, and counts every failure by reason. The whole attempt is bounded by `generation.timeout`, of
which `generation.fallback_reserve` (at most half) is kept for the fallbacks: a backend still silent by then has
timed out, and that counts towards its breaker. Each network backend also bounds its own calls
(connect and total timeouts). When every backend
fails, the last one tried decides the client's answer: 504 for a timeout, 503 when it had no
capacity (or no backend could be tried at all), 502 otherwise.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import Executor
from typing import Any

import structlog

from ..config import BackendSettings, Settings
from ..errors import BackendUnavailable, GenerationError, GenerationTimeout, ServiceError
from ..params import ImageParams
from .base import CALL_TIMING, Backend, BackendError, BackendTimeout, CallTiming, GeneratedImage, NoCapacity
from .breaker import CircuitBreaker, Clock
from .embedded import EmbeddedBackend
from .openai_compat import OpenAIBackend
from .references import ReferenceFetcher
from .upstream import PollinationsBackend
from .workers import WorkerBackend, WorkerRegistry

__all__ = ["Backend", "BackendError", "GeneratedImage", "Generator", "WorkerRegistry", "build_backends"]

log = structlog.get_logger("image_service.generation")

# Breaker settings for backends handed in without configuration (embedding code, tests).
UNCONFIGURED = BackendSettings(type="embedded")


def build_backends(
    settings: Settings, executor: Executor, registry: WorkerRegistry | None = None
) -> dict[str, Backend]:
    """Instantiate every configured backend that a model names as primary or fallback."""
    wanted = settings.backends_in_use()
    missing = wanted - settings.backends.keys()
    if missing:
        raise ValueError(f"models name unknown backends: {', '.join(sorted(missing))}")
    model_names = {model: spec.backend_model for model, spec in settings.models.items() if spec.backend_model}
    built: dict[str, Backend] = {}
    for name in sorted(wanted):
        spec = settings.backends[name]
        if spec.type == "embedded":
            built[name] = EmbeddedBackend(executor)
        elif spec.type == "openai":
            fetcher = ReferenceFetcher(settings.references, executor)
            built[name] = OpenAIBackend(name, spec, executor, fetcher, model_names)
        elif spec.type == "pollinations":
            built[name] = PollinationsBackend(name, spec, executor, model_names)
        else:
            if registry is None:
                raise ValueError(f"backend {name!r} uses workers but no worker registry was given")
            built[name] = WorkerBackend(name, spec, executor, registry)
    return built


def _client_error(exc: BackendError) -> GenerationError:
    if isinstance(exc, BackendTimeout):
        return GenerationTimeout(exc.message)
    if isinstance(exc, NoCapacity):
        return BackendUnavailable(exc.message)
    return GenerationError(exc.message)


class Generator:
    """Model → ordered backends, with a breaker and failure counters per backend and one deadline."""

    def __init__(self, settings: Settings, backends: Mapping[str, Backend], clock: Clock = time.monotonic) -> None:
        self._chains = {model: spec.chain for model, spec in settings.models.items()}
        self._costs = {model: spec.cost for model, spec in settings.models.items()}
        self._backends = dict(backends)
        self._timeout = settings.generation.timeout
        self._fallback_reserve = min(settings.generation.fallback_reserve, self._timeout / 2)
        self._breakers: dict[str, CircuitBreaker] = {}
        for name in self._backends:
            spec = settings.backends.get(name, UNCONFIGURED)
            self._breakers[name] = CircuitBreaker(spec.breaker_failures, spec.breaker_reset, clock)
        self._failures: dict[str, Counter[str]] = {name: Counter() for name in self._backends}

    def backend_for(self, model: str) -> Backend:
        """The model's primary backend."""
        for name in self._chains.get(model, ()):
            if name in self._backends:
                return self._backends[name]
        raise BackendUnavailable(f"no backend serves model {model!r}")

    def cost_of(self, model: str) -> float:
        """What one generated image of `model` costs, from `models.<name>.cost`."""
        return self._costs.get(model, 0.0)

    def breaker(self, backend: str) -> CircuitBreaker:
        return self._breakers[backend]

    def stats(self) -> dict[str, Any]:
        """Per backend: provider, breaker state and failures counted by reason (shown by /health)."""
        return {
            name: {
                "provider": backend.provider,
                "breaker": self._breakers[name].state.value,
                "failures": dict(self._failures[name]),
            }
            for name, backend in sorted(self._backends.items())
        }

    async def generate(self, params: ImageParams) -> GeneratedImage:
        chain = [name for name in self._chains.get(params.model, ()) if name in self._backends]
        if not chain:
            raise BackendUnavailable(f"no backend serves model {params.model!r}")
        return await self._first_success(chain, params, asyncio.get_running_loop().time() + self._timeout)

    def _cutoff(self, chain: list[str], index: int, deadline: float, now: float) -> float:
        """When backend `index` is given up on: the deadline, less the reserve while a later backend
        of the chain could still be tried (a hung primary otherwise took the fallback's time too).
        A backend reached with no more than the reserve left gets all of it."""
        later = any(self._breakers[name].could_allow() for name in chain[index + 1:])
        reserved = deadline - self._fallback_reserve
        return reserved if later and reserved > now else deadline

    async def _first_success(self, chain: list[str], params: ImageParams, deadline: float) -> GeneratedImage:
        failure: GenerationError | None = None
        loop = asyncio.get_running_loop()
        for index, name in enumerate(chain):
            now = loop.time()
            if now >= deadline:
                break
            cutoff = self._cutoff(chain, index, deadline, now)
            breaker = self._breakers[name]
            if not breaker.allow():
                self._failures[name]["breaker_open"] += 1
                continue
            timing = CallTiming(started=now, cutoff=cutoff, sent=now)  # sent at once unless it waits for room
            context = CALL_TIMING.set(timing)
            try:
                async with asyncio.timeout_at(cutoff):
                    generated = await self._backends[name].generate(params)
            except TimeoutError:
                failure = GenerationTimeout(f"no backend answered within {self._timeout:g} s")
                if timing.mostly_waited():  # every worker busy: a busy service, not a failing one
                    breaker.release()
                    self._failures[name]["busy"] += 1
                    continue
                # Out of time: the backend's failure, as much as a timeout of its own (which a
                # retry inside the backend would otherwise hide), and it counts towards its breaker.
                breaker.record_failure()
                self._failures[name]["timeout"] += 1
                log.warning("generation.backend_failed", backend=name, reason="timeout")
                continue
            except BackendError as exc:
                if exc.trips_breaker:
                    breaker.record_failure()
                else:
                    breaker.release()
                self._failures[name][exc.reason] += 1
                log.warning("generation.backend_failed", backend=name, reason=exc.reason)
                failure = _client_error(exc)
                continue
            except (ServiceError, asyncio.CancelledError):
                # The request's own fault (a refused reference), or it was cancelled: not the backend's.
                breaker.release()
                raise
            except Exception as exc:
                breaker.record_failure()
                self._failures[name]["crashed"] += 1
                log.warning("generation.backend_failed", backend=name, reason="crashed", error_type=type(exc).__name__)
                failure = GenerationError(f"the {name} backend failed ({type(exc).__name__})")
                continue
            finally:
                CALL_TIMING.reset(context)
            breaker.record_success()
            return generated
        if failure is None and loop.time() >= deadline:
            failure = GenerationTimeout(f"no backend answered within {self._timeout:g} s")
        if failure is None:
            raise BackendUnavailable(f"every backend for model {params.model!r} is failing; try again later")
        raise failure

    async def close(self) -> None:
        await asyncio.gather(*(backend.close() for backend in self._backends.values()))
