"""What moderation concluded about one image, and the interface every image moderator implements.

The default for tests of unrelated features, `PassThroughModerator`, flags nothing and says so in
its verdict (`models = {"none": ...}`); `ClassifierModerator` (moderator.py) runs the real models
behind the same `Moderator` interface.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Protocol

from ..generation import GeneratedImage
from ..params import ImageParams
from .prompts import PromptFindings

SEXUAL = "sexual"
SEXUAL_MINORS = "sexual/minors"


@dataclass(frozen=True, slots=True)
class Verdict:
    """What moderation concluded about one image, in the OpenAI moderation shape plus booleans.

    `category_scores["sexual"]` is the best score among the mature NudeNet classes;
    `minor_score` is the highest probability, over the faces found, of being under 18 (1.0 when the
    prompt names a minor); `sexual/minors` is the smaller of the two.
    """

    is_mature: bool = False
    is_child: bool = False
    categories: dict[str, bool] = field(default_factory=dict)
    category_scores: dict[str, float] = field(default_factory=dict)
    labels: tuple[str, ...] = ()
    models: dict[str, str] = field(default_factory=dict)
    minor_score: float = 0.0
    duration_ms: float = 0.0

    @property
    def flagged(self) -> bool:
        return self.is_mature or self.is_child

    @property
    def never_servable(self) -> bool:
        """Mature and child at once: refused whatever the request says, and cached only as a refusal."""
        return self.is_mature and self.is_child

    @classmethod
    def scored(
        cls, *, sexual_score: float, minor_score: float, is_mature: bool, is_child: bool, **rest: Any
    ) -> Verdict:
        return cls(
            is_mature=is_mature,
            is_child=is_child,
            categories={SEXUAL: is_mature, SEXUAL_MINORS: is_mature and is_child},
            category_scores={SEXUAL: round(sexual_score, 4), SEXUAL_MINORS: round(min(sexual_score, minor_score), 4)},
            minor_score=round(minor_score, 4),
            **rest,
        )

    def with_prompt(self, prompt: PromptFindings) -> Verdict:
        """Fold the prompt's signal in: a prompt naming a minor makes the image a child image.

        The age model has no signal on stylised faces or when no face is found; the prompt does.
        A sexual prompt alone does not make an image mature: only the image classifier does.
        """
        if not prompt.labels:
            return self
        return Verdict.scored(
            sexual_score=self.category_scores.get(SEXUAL, 0.0),
            minor_score=max(self.minor_score, 1.0 if prompt.minor else 0.0),
            is_mature=self.is_mature,
            is_child=self.is_child or prompt.minor,
            labels=self.labels + prompt.labels,
            models=self.models,
            duration_ms=self.duration_ms,
        )

    def timed(self, duration_ms: float) -> Verdict:
        return replace(self, duration_ms=round(duration_ms, 3))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["labels"] = list(self.labels)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Verdict:
        """Rebuild a cached verdict; keys this version does not know are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in data.items() if k in known}, "labels": tuple(data.get("labels", ()))})


class Moderator(Protocol):
    async def check_image(self, generated: GeneratedImage, params: ImageParams) -> Verdict: ...

    async def close(self) -> None: ...


class PassThroughModerator:
    """Flags nothing: for tests of unrelated features and for `moderation.image = "none"`."""

    VERDICT = Verdict.scored(
        sexual_score=0.0, minor_score=0.0, is_mature=False, is_child=False, models={"none": "pass-through"}
    )

    async def check_image(self, generated: GeneratedImage, params: ImageParams) -> Verdict:
        return self.VERDICT

    async def close(self) -> None:
        return None
