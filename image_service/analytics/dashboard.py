"""The /dashboard page (self-contained HTML, JS and inline SVG: no CDN) and the data it draws."""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from importlib.resources import files
from typing import Any

from .source import DASHBOARD_PIPES, PipeSource


@cache
def page() -> bytes:
    return files(__package__).joinpath("dashboard.html").read_bytes()


async def data(source: PipeSource, params: Mapping[str, str]) -> dict[str, Any]:
    """Every dashboard pipe's answer for the same parameters, and where they came from. Anomalies
    are in minute windows whatever the charts' bucket: what `alerts check` fires on, so the page
    never says "none fired" while the alert job does."""
    queries = [(pipe, {**params, "bucket": "minute"} if pipe == "anomalies" else params) for pipe in DASHBOARD_PIPES]
    return {"source": source.name, "parameters": dict(params), "pipes": await source.run_many(queries)}
