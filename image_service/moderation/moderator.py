"""The classifier moderator: runs the models in the CPU pool and turns their findings into a verdict.

`judge` is where thresholds apply; it is pure, so the policy tests feed it detector results directly.
Models load once, at start-up, in the pool, followed by a warm-up pass (`load_moderator`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Protocol

from PIL import Image

from ..config import ModerationSettings
from ..generation import GeneratedImage
from ..generation.base import FLAG_CONCEPT_PREFIX, FLAG_NSFW
from ..params import ImageParams
from .classifiers import Classifiers, Findings
from .verdict import Moderator, PassThroughModerator, Verdict

CHILD_FACE = "child_face"
# The labels of an image the backend's own safety checker flagged: mature, child.
BACKEND_NSFW = "backend_nsfw"
BACKEND_CHILD = "backend_child"


class Analyser(Protocol):
    """Anything that reports detections and faces for an image; `Classifiers` is the real one."""

    def analyse(self, image: Image.Image) -> Findings: ...


@dataclass(frozen=True, slots=True)
class Thresholds:
    mature: Mapping[str, float]  # NudeNet label (upper case) → the score at which it makes an image mature
    minor_probability: float
    # A GPU worker's special-concept score above this flags the image as a child.
    backend_child_score: float = 0.0

    @classmethod
    def from_settings(cls, settings: ModerationSettings) -> Thresholds:
        return cls(
            mature={label.upper(): value for label, value in settings.thresholds.items()},
            minor_probability=settings.minor_probability,
            backend_child_score=settings.backend_child_score,
        )


def judge(findings: Findings, thresholds: Thresholds, backend_flags: Mapping[str, float] | None = None) -> Verdict:
    """Mature when any listed class reaches its threshold, or when the backend's own safety checker
    flagged the image (a GPU worker's `has_nsfw_concept`); child when any face is likely under 18,
    or when the worker's checker scores a special concept (its child concepts) above the threshold,
    as the origin reads it."""
    flags = backend_flags or {}
    mature = [d for d in findings.detections if d.label in thresholds.mature]
    fired = sorted({d.label for d in mature if d.score >= thresholds.mature[d.label]})
    if flags.get(FLAG_NSFW, 0.0) >= 1.0:
        fired.append(BACKEND_NSFW)
    minor_score = max((face.minor_probability for face in findings.faces), default=0.0)
    child = [CHILD_FACE] if minor_score >= thresholds.minor_probability else []
    if any(score > thresholds.backend_child_score for key, score in flags.items() if key.startswith(FLAG_CONCEPT_PREFIX)):
        child.append(BACKEND_CHILD)
    return Verdict.scored(
        sexual_score=max((d.score for d in mature), default=0.0),
        minor_score=minor_score,
        is_mature=bool(fired),
        is_child=bool(child),
        labels=(*fired, *child),
        models=dict(findings.models),
    )


class ClassifierModerator:
    """NudeNet and the age model on every generated image, off the event loop."""

    def __init__(self, analyser: Analyser, thresholds: Thresholds, executor: Executor) -> None:
        self._analyser = analyser
        self._thresholds = thresholds
        self._executor = executor

    async def check_image(self, generated: GeneratedImage, params: ImageParams) -> Verdict:
        start = time.perf_counter()
        findings = await asyncio.get_running_loop().run_in_executor(
            self._executor, self._analyser.analyse, generated.image
        )
        verdict = judge(findings, self._thresholds, generated.backend_flags)
        return verdict.timed((time.perf_counter() - start) * 1000)

    async def close(self) -> None:
        return None


def load_classifiers(settings: ModerationSettings) -> Classifiers:
    """Load both models and run them once; raises ModelFileMissing naming the setting."""
    classifiers = Classifiers(
        settings.nudenet_model,
        settings.age_model_dir,
        face_threshold=settings.face_threshold,
        min_face_side=settings.min_face_side,
    )
    classifiers.warm_up()
    return classifiers


async def load_moderator(settings: ModerationSettings, executor: Executor) -> Moderator:
    """The configured moderator, its models loaded in the pool so start-up never blocks the loop."""
    if settings.image == "none":
        return PassThroughModerator()
    classifiers = await asyncio.get_running_loop().run_in_executor(executor, load_classifiers, settings)
    return ClassifierModerator(classifiers, Thresholds.from_settings(settings), executor)
