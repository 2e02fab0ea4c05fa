"""The moderation policy: what is refused, what is served unlisted, and which clients are held back.

    minor + sexual prompt            → refused before generation (451), a violation
    sexual prompt with safe=true     → refused before generation (451), if configured
    image mature and child           → refused (451), never served, cached only as a refusal; a violation
    image mature with safe=true      → refused (451)
    image mature otherwise           → served without logo, kept out of the public feed
    anything else                    → served

A client whose violations pile up is refused with 429 until its decaying score has halved. Clients
are known only by a keyed hash of their address: the key is random per process, so the hashes
cannot be reversed or linked across restarts, and the address itself is never stored or logged.
"""

from __future__ import annotations

import enum
import hashlib
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from ..config import ModerationSettings
from ..errors import ClientBlocked
from ..params import ImageParams
from .prompts import PromptChecker, PromptFindings
from .verdict import Verdict


class Reason(enum.StrEnum):
    SEXUAL_MINOR_PROMPT = "sexual_minor_prompt"
    SEXUAL_PROMPT_SAFE = "sexual_prompt_safe"
    SEXUAL_MINOR_IMAGE = "sexual_minor_image"
    MATURE_IMAGE_SAFE = "mature_image_safe"


MESSAGES = {
    Reason.SEXUAL_MINOR_PROMPT: "the prompt asks for sexual content involving minors",
    Reason.SEXUAL_PROMPT_SAFE: "the prompt asks for sexual content and safe=true was requested",
    Reason.SEXUAL_MINOR_IMAGE: "the generated image was classified as sexual content involving a minor",
    Reason.MATURE_IMAGE_SAFE: "the generated image was classified as mature and safe=true was requested",
}
VIOLATIONS = frozenset({Reason.SEXUAL_MINOR_PROMPT, Reason.SEXUAL_MINOR_IMAGE})


@dataclass(frozen=True, slots=True)
class Refusal:
    reason: Reason

    @property
    def message(self) -> str:
        return MESSAGES[self.reason]

    @property
    def is_violation(self) -> bool:
        """Counts towards the client's block: the client asked for it, not merely got unlucky."""
        return self.reason in VIOLATIONS


class Policy:
    """Pure decisions from findings, verdicts and the request's own flags."""

    def __init__(self, safe_refuses_sexual_prompt: bool = True) -> None:
        self._safe_refuses_sexual_prompt = safe_refuses_sexual_prompt

    def for_prompt(self, findings: PromptFindings, params: ImageParams) -> Refusal | None:
        if findings.sexual_minor:
            return Refusal(Reason.SEXUAL_MINOR_PROMPT)
        if findings.sexual and params.safe and self._safe_refuses_sexual_prompt:
            return Refusal(Reason.SEXUAL_PROMPT_SAFE)
        return None

    def for_image(self, verdict: Verdict, params: ImageParams) -> Refusal | None:
        if verdict.never_servable:
            return Refusal(Reason.SEXUAL_MINOR_IMAGE)
        if verdict.is_mature and params.safe:
            return Refusal(Reason.MATURE_IMAGE_SAFE)
        return None

    @staticmethod
    def shows_logo(verdict: Verdict, params: ImageParams) -> bool:
        return params.shows_logo and not verdict.is_mature

    @staticmethod
    def listed(verdict: Verdict, params: ImageParams) -> bool:
        """Whether the image may appear in the public feed."""
        return not (params.nofeed or params.private or verdict.is_mature)


class ViolationTracker:
    """Per-client violation scores that halve every `half_life` seconds; a high score blocks for a while."""

    def __init__(
        self,
        threshold: float,
        half_life: float,
        max_clients: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if threshold <= 0 or half_life <= 0 or max_clients < 1:
            raise ValueError("threshold and half_life must be positive, max_clients at least 1")
        self._threshold = threshold
        self._half_life = half_life
        self._max_clients = max_clients
        self._clock = clock
        self._key = secrets.token_bytes(32)
        # client hash → (score, when the score was computed, blocked until)
        self._clients: OrderedDict[str, tuple[float, float, float]] = OrderedDict()

    @classmethod
    def from_settings(cls, settings: ModerationSettings) -> ViolationTracker:
        return cls(settings.violation_threshold, settings.violation_half_life, settings.violation_max_clients)

    def client_id(self, address: str | None) -> str | None:
        if not address:
            return None
        return hashlib.blake2b(address.encode(), key=self._key, digest_size=16).hexdigest()

    def admit(self, client: str | None) -> None:
        """Raise ClientBlocked while the client's block lasts."""
        entry = self._clients.get(client) if client else None
        if entry is None:
            return
        remaining = entry[2] - self._clock()
        if remaining > 0:
            raise ClientBlocked(
                "too many refused requests from this client; try again later", retry_after=math.ceil(remaining)
            )

    def score(self, client: str) -> float:
        entry = self._clients.get(client)
        return 0.0 if entry is None else self._decayed(entry[0], entry[1], self._clock())

    def record(self, client: str | None) -> bool:
        """Add one violation; True when this one starts a block."""
        if not client:
            return False
        now = self._clock()
        score, updated, blocked_until = self._clients.pop(client, (0.0, now, 0.0))
        score = self._decayed(score, updated, now) + 1.0
        # Within 1%: violations in quick succession have decayed a hair and must still add up.
        starts = (score >= self._threshold or math.isclose(score, self._threshold, rel_tol=0.01)) and blocked_until <= now
        if starts:
            # Blocked until the score has decayed to half the threshold.
            blocked_until = now + self._half_life * math.log2(max(score, self._threshold) / (self._threshold / 2))
        self._clients[client] = (score, now, blocked_until)
        while len(self._clients) > self._max_clients:
            self._clients.popitem(last=False)
        return starts

    def _decayed(self, score: float, updated: float, now: float) -> float:
        return score * 0.5 ** ((now - updated) / self._half_life)


@dataclass(frozen=True, slots=True)
class ContentPolicy:
    """Everything the pipeline consults besides the image moderator, built once from settings."""

    prompts: PromptChecker
    policy: Policy
    violations: ViolationTracker

    @classmethod
    def from_settings(cls, settings: ModerationSettings) -> ContentPolicy:
        terms = settings.terms
        return cls(
            prompts=PromptChecker(terms.minor, terms.sexual, terms.minor_sexual),
            policy=Policy(settings.safe_refuses_sexual_prompt),
            violations=ViolationTracker.from_settings(settings),
        )
