"""The /dashboard page (self-contained HTML, JS and inline SVG: no CDN) and the data it draws."""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from importlib.resources import files
from typing import Any

from .source import DASHBOARD_PIPES, PipeSource, run_pipes


@cache
def page() -> bytes:
    return files(__package__).joinpath("dashboard.html").read_bytes()


async def data(source: PipeSource, params: Mapping[str, str]) -> dict[str, Any]:
    """Every dashboard pipe's answer for the same parameters, and where they came from."""
    return {"source": source.name, "parameters": dict(params), "pipes": await run_pipes(source, DASHBOARD_PIPES, params)}
