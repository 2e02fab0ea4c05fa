"""The one small interface every generation backend implements, and the failures backends raise.

Backends raise `BackendError` (never the HTTP-facing errors): the `Generator` counts it under its
`reason`, feeds the backend's circuit breaker, tries the next backend, and maps the last failure
to the client's 502/503/504.

    BackendError          502 failed or answered garbage (reason: http_status, connect, not_image, ...)
    ├── Refused           502 refused this request (400, 413, 414, 422, 451); never trips a breaker
    ├── BackendTimeout    504 did not answer within the backend's timeout
    └── NoCapacity        503 cannot take the request now (no worker registered); never trips a breaker

`GeneratedImage.backend_flags` carries the backend's own safety opinion for the moderation stage.
Keys in use (scores in 0..1 unless noted):

    nsfw                     1.0 when the GPU worker's safety checker set `has_nsfw_concept`, else 0.0
    concept.<name>           each numeric entry of the worker's `concept.special_scores` (raw score)
"""

from __future__ import annotations

import asyncio
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Protocol

from PIL import Image

from ..params import ImageParams

FLAG_NSFW = "nsfw"
FLAG_CONCEPT_PREFIX = "concept."


@dataclass(frozen=True, slots=True)
class GeneratedImage:
    """A decoded image plus what the backend said about it (safety flags feed moderation)."""

    image: Image.Image
    backend: str
    provider: str
    backend_flags: dict[str, float] = field(default_factory=dict)


class Backend(Protocol):
    """A generator of images for one or more models."""

    name: str
    provider: str

    async def generate(self, params: ImageParams) -> GeneratedImage: ...

    async def close(self) -> None: ...


@dataclass(slots=True)
class CallTiming:
    """One backend call under the generation's deadline: when it began, when it is cut off, how long
    it has waited for room (for a free worker, over all its attempts), and when its latest attempt
    left for the service."""

    started: float
    cutoff: float
    waited: float = 0.0
    waiting_since: float | None = None
    sent: float | None = None

    def mostly_waited(self) -> bool:
        """Cut off having spent most of its time waiting for room: the service was busy, not
        failing, and neither its breaker nor a worker should count it."""
        waited = self.waited + (self.cutoff - self.waiting_since if self.waiting_since is not None else 0.0)
        return waited > (self.cutoff - self.started) / 2

    def held_by_the_service(self, now: float) -> bool:
        """Cut off at the deadline (not cancelled otherwise) with the latest attempt in the
        service's hands for most of the time: that worker's fault."""
        return (now >= self.cutoff - DEADLINE_SLACK and self.sent is not None
                and self.cutoff - self.sent >= (self.cutoff - self.started) / 2)


# How early the event loop may run the deadline's timer (its clock resolution, with room to spare).
DEADLINE_SLACK = 0.01
# Set by the Generator around each backend call; a backend that waits for room marks it.
CALL_TIMING: ContextVar[CallTiming | None] = ContextVar("call_timing", default=None)


def waiting_for_room() -> None:
    timing = CALL_TIMING.get()
    if timing is not None:
        timing.waiting_since = asyncio.get_running_loop().time()


def call_sent() -> None:
    timing = CALL_TIMING.get()
    if timing is not None:
        now = asyncio.get_running_loop().time()
        if timing.waiting_since is not None:
            timing.waited += now - timing.waiting_since
            timing.waiting_since = None
        timing.sent = now


class BackendError(Exception):
    """A backend call failed. `reason` is a short counter label; the message is safe to show clients."""

    trips_breaker = True

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason


class Refused(BackendError):
    """The backend refused this one request (HTTP 400, 413, 414, 422, 451: its content policy, its
    input limits): a trait of the request, not of the backend's health. Counted against the breaker,
    one client's prompts would open it for everyone."""

    trips_breaker = False


class BackendTimeout(BackendError):
    """The backend did not answer within its own timeout."""


class NoCapacity(BackendError):
    """The backend is healthy but has nowhere to run the request (no active worker)."""

    trips_breaker = False
