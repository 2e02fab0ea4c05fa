"""The generation stage: route a model to its backend, bound the time it may take, map failures.

Backends implement `Backend` (base.py). `Generator` is what the pipeline calls; it turns timeouts
and backend exceptions into GenerationTimeout / GenerationError so the client gets 504 / 502 JSON.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from concurrent.futures import Executor

from ..config import Settings
from ..errors import BackendUnavailable, GenerationError, GenerationTimeout
from ..params import ImageParams
from .base import Backend, GeneratedImage
from .embedded import EmbeddedBackend

__all__ = ["Backend", "GeneratedImage", "Generator", "build_backends"]


def build_backends(settings: Settings, executor: Executor) -> dict[str, Backend]:
    """Instantiate every backend that a configured model names."""
    known: dict[str, Backend] = {"embedded": EmbeddedBackend(executor)}
    wanted = {spec.backend for spec in settings.models.values()}
    missing = wanted - known.keys()
    if missing:
        raise ValueError(f"models name unknown backends: {', '.join(sorted(missing))}")
    return {name: backend for name, backend in known.items() if name in wanted}


class Generator:
    """Model → backend routing with a per-request deadline."""

    def __init__(self, settings: Settings, backends: Mapping[str, Backend]) -> None:
        self._routes = {model: spec.backend for model, spec in settings.models.items()}
        self._backends = dict(backends)
        self._timeout = settings.generation.timeout

    def backend_for(self, model: str) -> Backend:
        backend = self._backends.get(self._routes.get(model, ""))
        if backend is None:
            raise BackendUnavailable(f"no backend serves model {model!r}")
        return backend

    async def generate(self, params: ImageParams) -> GeneratedImage:
        backend = self.backend_for(params.model)
        try:
            async with asyncio.timeout(self._timeout):
                return await backend.generate(params)
        except TimeoutError:
            raise GenerationTimeout(
                f"the {backend.name} backend did not answer within {self._timeout:g} s"
            ) from None
        except GenerationError:
            raise
        except Exception as exc:
            raise GenerationError(f"the {backend.name} backend failed ({type(exc).__name__})") from exc

    async def close(self) -> None:
        await asyncio.gather(*(backend.close() for backend in self._backends.values()))
