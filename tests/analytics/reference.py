"""Ground truth for every pipe, computed in plain Python from the rows, independently of the SQL."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

Row = dict[str, Any]
TERMINAL = ("request.completed", "text.completion")


def quantile(values: list[float], level: float) -> float:
    """Linear interpolation between closest ranks (R-7), what ClickHouse's quantiles() does exactly up to 8192 values."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * level
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


def bucket_of(start_time: str, bucket: str) -> str:
    moment = datetime.strptime(start_time[:19], "%Y-%m-%d %H:%M:%S")
    if bucket == "minute":
        moment = moment.replace(second=0)
    elif bucket == "hour":
        moment = moment.replace(minute=0, second=0)
    else:
        moment = moment.replace(hour=0, minute=0, second=0)
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def answered(row: Row) -> bool:
    """A request the service answered (latency counts): not rejected, not refused as content, not cancelled."""
    return row["status"] in ("success", "error") and row.get("error") != "cancelled"


def requests(rows: Iterable[Row], params: dict[str, str], time: str = "start_time") -> list[Row]:
    """One row per request (first copy of each event_id), within the parameters' filters (on `time`)."""
    seen: set[str] = set()
    chosen = []
    for row in rows:
        if row["event_id"] in seen or row["event"] not in TERMINAL:
            continue
        seen.add(row["event_id"])
        if params.get("start") and row[time] < params["start"]:
            continue
        if params.get("end") and row[time] >= params["end"]:
            continue
        if any(params.get(key) and row[key] != params[key] for key in ("service_type", "model")):
            continue
        chosen.append(row)
    return chosen


def grouped(
    rows: list[Row], params: dict[str, str], keys: tuple[str, ...], default_bucket: str, time: str = "start_time"
) -> dict[tuple[Any, ...], list[Row]]:
    bucket = params.get("bucket", default_bucket)
    groups: dict[tuple[Any, ...], list[Row]] = defaultdict(list)
    for row in rows:
        groups[(bucket_of(row[time], bucket), *(row[key] for key in keys))].append(row)
    return groups


def count(rows: list[Row], test: Callable[[Row], bool]) -> int:
    return sum(1 for row in rows if test(row))


def request_volume(rows: list[Row], params: dict[str, str]) -> dict[tuple[Any, ...], dict[str, Any]]:
    return {
        key: {"requests": len(g), "succeeded": count(g, lambda r: r["status"] == "success"),
              "users": len({r["user"] for r in g})}
        for key, g in grouped(requests(rows, params), params, ("service_type",), "hour").items()
    }


def error_rates(rows: list[Row], params: dict[str, str]) -> dict[tuple[Any, ...], dict[str, Any]]:
    out = {}
    for key, g in grouped(requests(rows, params), params, ("service_type", "model"), "hour").items():
        errors, rejected = count(g, lambda r: r["status"] == "error"), count(g, lambda r: r["status"] == "rejected")
        out[key] = {"requests": len(g), "errors": errors, "rejected": rejected,
                    "error_rate": errors / len(g), "rejected_rate": rejected / len(g)}
    return out


def cache_hit_rate(rows: list[Row], params: dict[str, str]) -> dict[tuple[Any, ...], dict[str, Any]]:
    looked_up = [r for r in requests(rows, params) if r["service_type"] == "image" and r["cache_status"] is not None]
    out = {}
    for key, g in grouped(looked_up, params, ("model",), "hour").items():
        hits = count(g, lambda r: r["cache_status"] == "hit")
        bypasses = count(g, lambda r: r["cache_status"] == "bypass")
        lookups = len(g) - bypasses
        out[key] = {"lookups": lookups, "hits": hits, "misses": count(g, lambda r: r["cache_status"] == "miss"),
                    "shared_waits": count(g, lambda r: r["cache_status"] == "shared-wait"), "bypasses": bypasses,
                    "hit_rate": hits / lookups if lookups else None}
    return out


def tier_distribution(rows: list[Row], params: dict[str, str]) -> dict[tuple[Any, ...], dict[str, Any]]:
    return {
        key: {"requests": len(g), "users": len({r["user"] for r in g})}
        for key, g in grouped(requests(rows, params), params, ("service_type", "tier"), "hour").items()
    }


def content_violations(rows: list[Row], params: dict[str, str]) -> dict[tuple[Any, ...], dict[str, Any]]:
    images = [r for r in requests(rows, params) if r["service_type"] == "image"]
    out = {}
    for key, g in grouped(images, params, ("model",), "hour").items():
        flagged = count(g, lambda r: bool(r["is_mature"] or r["is_child"]))
        blocked = count(g, lambda r: r["status"] == "content_violation")
        out[key] = {"requests": len(g), "flagged": flagged, "mature": count(g, lambda r: bool(r["is_mature"])),
                    "child": count(g, lambda r: bool(r["is_child"])), "blocked": blocked,
                    "flagged_rate": flagged / len(g), "blocked_rate": blocked / len(g)}
    return out


def latency_percentiles(rows: list[Row], params: dict[str, str]) -> dict[tuple[Any, ...], dict[str, Any]]:
    out = {}
    for key, g in grouped([r for r in requests(rows, params) if answered(r)], params, ("service_type", "model"), "hour").items():
        values = [r["duration_ms"] for r in g]
        out[key] = {"requests": len(g), "p50_ms": quantile(values, 0.5), "p95_ms": quantile(values, 0.95),
                    "p99_ms": quantile(values, 0.99), "avg_ms": sum(values) / len(values)}
    return out


def anomalies(rows: list[Row], params: dict[str, str]) -> dict[tuple[Any, ...], dict[str, Any]]:
    max_error_rate = float(params.get("max_error_rate", 0.05))
    max_p95 = float(params.get("max_p95_ms", 10000))
    factor = float(params.get("factor", 3))
    min_error_rate = float(params.get("min_error_rate", 0.01))
    min_rise = float(params.get("min_p95_rise_ms", 500))
    min_requests = int(params.get("min_requests", 10))
    series: dict[tuple[str, str], list[tuple[str, int, int, int, float | None]]] = defaultdict(list)
    groups = grouped(requests(rows, params, "end_time"), params, ("service_type", "model"), "minute", "end_time")
    for (t, service, model), g in sorted(groups.items()):
        errors = count(g, lambda r: r["status"] == "error")
        durations = [r["duration_ms"] for r in g if answered(r)]
        series[(service, model)].append((t, len(g), errors, len(durations), quantile(durations, 0.95) if durations else None))
    out = {}
    for (service, model), windows in series.items():
        for index, (t, total, errors, served, p95) in enumerate(windows):
            previous = windows[max(0, index - 12):index]
            rate = errors / total
            base_rate = sum(w[2] / w[1] for w in previous) / len(previous) if previous else None
            p95s = [w[4] for w in previous if w[4] is not None]
            base_p95 = sum(p95s) / len(p95s) if p95s else None
            reasons = []
            if rate > max_error_rate:
                reasons.append("error_rate_above_threshold")
            if served >= min_requests and p95 is not None and p95 > max_p95:
                reasons.append("p95_above_threshold")
            if (len(previous) >= 3 and errors > 0 and rate > min_error_rate and base_rate is not None
                    and rate > factor * base_rate):
                reasons.append("error_rate_above_baseline")
            if (served >= min_requests and len(p95s) >= 3 and p95 is not None and base_p95 is not None and p95 > factor * base_p95
                    and p95 - base_p95 > min_rise):
                reasons.append("p95_above_baseline")
            if total >= min_requests and reasons and t >= params.get("since", ""):
                out[(t, service, model)] = {"requests": total, "errors": errors, "error_rate": rate, "p95_ms": p95,
                                            "baseline_error_rate": base_rate, "baseline_p95_ms": base_p95,
                                            "reasons": reasons}
    return out


PIPES: dict[str, tuple[tuple[str, ...], Callable[[list[Row], dict[str, str]], dict[tuple[Any, ...], dict[str, Any]]]]] = {
    "request_volume": (("t", "service_type"), request_volume),
    "error_rates": (("t", "service_type", "model"), error_rates),
    "cache_hit_rate": (("t", "model"), cache_hit_rate),
    "tier_distribution": (("t", "service_type", "tier"), tier_distribution),
    "content_violations": (("t", "model"), content_violations),
    "latency_percentiles": (("t", "service_type", "model"), latency_percentiles),
    "anomalies": (("t", "service_type", "model"), anomalies),
}
QUANTILES = {"p50_ms", "p95_ms", "p99_ms", "baseline_p95_ms"}
