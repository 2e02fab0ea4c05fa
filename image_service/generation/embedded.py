"""The embedded backend: a deterministic procedural renderer, so the service works with no GPU or key.

It is not a diffusion model. The prompt and seed pick a palette, a smooth colour field and a set of
translucent shapes; equal inputs give equal pixels. Rendering is Pillow-only and runs in the CPU
executor, never on the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from concurrent.futures import Executor

from PIL import Image, ImageDraw

from ..params import ImageParams
from .base import GeneratedImage

FIELD_CELLS = 5
SHAPES = (4, 9)


def _rng(params: ImageParams) -> random.Random:
    material = f"{params.prompt}\x00{params.negative_prompt}\x00{params.seed}".encode()
    return random.Random(hashlib.sha256(material).digest())


def _palette(rng: random.Random, size: int) -> list[tuple[int, int, int]]:
    base_hue = rng.random()
    colours: list[tuple[int, int, int]] = []
    for index in range(size):
        hue = (base_hue + index * rng.uniform(0.05, 0.22)) % 1.0
        swatch = Image.new("HSV", (1, 1), (int(hue * 255), rng.randint(90, 230), rng.randint(70, 245)))
        red, green, blue = swatch.convert("RGB").tobytes()
        colours.append((red, green, blue))
    return colours


def render(params: ImageParams) -> Image.Image:
    """Render the image for `params`; pure and deterministic."""
    rng = _rng(params)
    palette = _palette(rng, 6)
    cells = Image.new("RGB", (FIELD_CELLS, FIELD_CELLS))
    cells.putdata([rng.choice(palette) for _ in range(FIELD_CELLS * FIELD_CELLS)])
    image = cells.resize((params.width, params.height), Image.Resampling.BICUBIC)

    draw = ImageDraw.Draw(image, "RGBA")
    width, height = params.width, params.height
    for _ in range(rng.randint(*SHAPES)):
        colour = (*rng.choice(palette), rng.randint(60, 170))
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        radius = rng.uniform(0.05, 0.35) * min(width, height)
        if rng.random() < 0.5:
            draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)
        else:
            sides = rng.randint(3, 6)
            draw.regular_polygon((cx, cy, radius), sides, rotation=rng.uniform(0, 360), fill=colour)
    return image


class EmbeddedBackend:
    """Backend wrapper that runs `render` in the shared CPU executor."""

    name = "embedded"
    provider = "image_service"

    def __init__(self, executor: Executor) -> None:
        self._executor = executor

    async def generate(self, params: ImageParams) -> GeneratedImage:
        image = await asyncio.get_running_loop().run_in_executor(self._executor, render, params)
        return GeneratedImage(image=image, backend=self.name, provider=self.provider)

    async def close(self) -> None:
        return None
