"""The moderation stage: a verdict for every generated image, before it is served or cached.

This is the hook the pipeline calls. The default, `PassThroughModerator`, flags nothing and says so
in its verdict (`models = {"none": ...}`); real classifiers plug in behind the same `Moderator`
interface.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from .generation import GeneratedImage
from .params import ImageParams


@dataclass(frozen=True, slots=True)
class Verdict:
    """What moderation concluded about one image, in the OpenAI moderation shape plus booleans."""

    is_mature: bool = False
    is_child: bool = False
    categories: dict[str, bool] = field(default_factory=dict)
    category_scores: dict[str, float] = field(default_factory=dict)
    labels: tuple[str, ...] = ()
    models: dict[str, str] = field(default_factory=dict)

    @property
    def flagged(self) -> bool:
        return self.is_mature or self.is_child

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["labels"] = list(self.labels)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Verdict:
        return cls(**{**data, "labels": tuple(data.get("labels", ()))})


class Moderator(Protocol):
    async def check_image(self, generated: GeneratedImage, params: ImageParams) -> Verdict: ...

    async def close(self) -> None: ...


class PassThroughModerator:
    """Flags nothing; the embedded default until classifiers are configured."""

    VERDICT = Verdict(models={"none": "pass-through"})

    async def check_image(self, generated: GeneratedImage, params: ImageParams) -> Verdict:
        return self.VERDICT

    async def close(self) -> None:
        return None
