"""Cache-hit throughput of the full pipeline against a bare aiohttp handler serving the same bytes."""

from __future__ import annotations

import tempfile
from pathlib import Path

from image_service.testing import free_port

from .harness import fetch, interleaved, server

PATH = "/prompt/a%20red%20fox?width=512&height=384&seed=7"
TARGET = 0.8


def main() -> None:
    service_port, bare_port = free_port(), free_port()
    service_args = ["-m", "image_service", "serve", "--port", str(service_port), "--log-format", "json"]
    with tempfile.TemporaryDirectory() as tmp, server(service_args, service_port, cwd=Path(tmp)) as service:
        body = fetch(service + PATH)
        image = Path(tmp) / "body.jpg"
        image.write_bytes(body)
        with server(["-m", "bench.bare_server", str(bare_port), str(image)], bare_port) as bare:
            assert fetch(bare + PATH) == body
            loads = interleaved({"pipeline (cache hit)": service + PATH, "bare aiohttp": bare + PATH})
    pipeline, baseline = loads["pipeline (cache hit)"], loads["bare aiohttp"]
    print(f"{len(body)}-byte JPEG, wrk 1 thread 16 connections, median of 3 interleaved 4 s runs.\n")
    print("| server | requests/s | p50 ms | p99 ms |\n|---|---|---|---|")
    for name, load in loads.items():
        print(f"| {name} | {load.requests_per_s:,.0f} | {load.p50_ms:.2f} | {load.p99_ms:.2f} |")
    ratio = pipeline.requests_per_s / baseline.requests_per_s
    print(f"\nratio pipeline / bare: **{ratio:.2f}** (target ≥ {TARGET}) — {'met' if ratio >= TARGET else 'NOT met'}")
