"""The one small interface every generation backend implements."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from PIL import Image

from ..params import ImageParams


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
