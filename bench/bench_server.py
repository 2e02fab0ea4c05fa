"""Cache-hit throughput of the full pipeline against a bare aiohttp handler serving the same bytes."""

from __future__ import annotations

import tempfile
from pathlib import Path

from image_service.testing import free_port

from .harness import fetch, paired, server

PATH = "/prompt/a%20red%20fox?width=512&height=384&seed=7"
TARGET = 0.8
ROUNDS = 6
BARE = "bare aiohttp"


def main() -> None:
    service_port, bare_port = free_port(), free_port()
    service_args = ["-m", "image_service", "serve", "--port", str(service_port), "--log-format", "json"]
    with tempfile.TemporaryDirectory() as tmp, server(service_args, service_port, cwd=Path(tmp)) as service:
        body = fetch(service + PATH)
        image = Path(tmp) / "body.jpg"
        image.write_bytes(body)
        with server(["-m", "bench.bare_server", str(bare_port), str(image)], bare_port) as bare:
            assert fetch(bare + PATH) == body
            results = paired({"pipeline (cache hit)": service + PATH, BARE: bare + PATH}, BARE, rounds=ROUNDS, seconds=3)
    print(f"{len(body)}-byte JPEG, wrk 1 thread 16 connections, {ROUNDS} paired rounds of 3 s in a fresh random "
          "order each; figures are medians of each round's figure against the bare handler in the same round.\n")
    print("| server | requests/s | ratio to bare | ratio quartiles | p99 ms |\n|---|---|---|---|---|")
    for name, result in results.items():
        print(f"| {name} | {result.requests_per_s:,.0f} | {result.ratio:.2f} | "
              f"{result.ratio_low:.2f}–{result.ratio_high:.2f} | {result.p99_ms:.2f} |")
    ratio = results["pipeline (cache hit)"].ratio
    print(f"\nratio pipeline / bare: **{ratio:.2f}** (target ≥ {TARGET}) — {'met' if ratio >= TARGET else 'NOT met'}")
