"""Human output (tables for `stats`) and alert evaluation (the `anomalies` pipe, a webhook)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson

from .engine import AnalyticsError


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        # Four significant digits for rates and milliseconds, but never an exponent: "1.903e+04 ms"
        # in an alert is a latency an operator has to decode.
        if abs(value) >= 1000:
            return f"{value:.0f}"
        text = f"{value:.4g}"
        if "e" in text:
            text = f"{value:.8f}".rstrip("0").rstrip(".")
        return "0" if text in ("-0", "0", "") else text
    if isinstance(value, list):
        return ",".join(_cell(item) for item in value)
    return str(value)


def table(answer: Mapping[str, Any]) -> str:
    """A pipe's answer as an aligned text table (columns in the pipe's order)."""
    columns = [column["name"] for column in answer.get("meta", [])]
    if not columns and answer.get("data"):
        columns = list(answer["data"][0])
    rows = [[_cell(row.get(column)) for column in columns] for row in answer.get("data", [])]
    if not rows:
        return "(no rows)"
    widths = [max(len(column), *(len(row[i]) for row in rows)) for i, column in enumerate(columns)]
    lines = ["  ".join(column.ljust(width) for column, width in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * width for width in widths))
    lines += ["  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def alert_payload(fired: list[dict[str, Any]], params: Mapping[str, str], source: str) -> dict[str, Any]:
    """What the webhook receives: one entry per window that fired, with its reasons and figures."""
    return {
        "service": "image_service",
        "pipe": "anomalies",
        "source": source,
        "checked_at": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S"),
        "parameters": dict(params),
        "fired": len(fired),
        "anomalies": fired,
        "text": "; ".join(
            f"{row['t']} {row['service_type']}/{row['model']}: {', '.join(row['reasons'])} "
            f"(error rate {_cell(row['error_rate'])}, p95 {_cell(row['p95_ms'])} ms, {row['requests']} requests)"
            for row in fired
        ) or "no anomalies",
    }


async def post_webhook(url: str, payload: Mapping[str, Any], timeout: float = 10.0) -> None:
    """POST the payload as JSON; anything but 2xx is an error naming the status."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
            async with session.post(url, data=orjson.dumps(payload), headers={"Content-Type": "application/json"}) as reply:
                if not 200 <= reply.status < 300:
                    raise AnalyticsError(f"the webhook answered {reply.status}")
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        raise AnalyticsError(f"the webhook could not be reached ({type(exc).__name__})") from None
