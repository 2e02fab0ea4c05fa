"""Moderation: latency per image, throughput on the service's CPU pool, event-loop lag at full load.

Images are what the service moderates: procedural renders at the default 1024², plus the three test
photographs. Throughput and lag use the real `ClassifierModerator` on a 2-thread pool (the 2-core
target machine), with 4× as many images in flight as threads, while a 1 ms ticker measures how late
the event loop wakes up.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from image_service.app import GIL_SWITCH_INTERVAL, cpu_executor
from image_service.config import load_settings
from image_service.generation import GeneratedImage
from image_service.generation.embedded import render
from image_service.moderation import ClassifierModerator, Thresholds, load_classifiers
from image_service.params import ImageParams

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
WORKERS = 2
ROUNDS = 120
IN_FLIGHT = 4 * WORKERS
TICK = 0.001


def _images() -> list[Image.Image]:
    renders = [
        render(ImageParams(
            prompt=f"bench {i}", model="procedural", width=1024, height=1024, seed=i, nologo=False, enhance=False,
            private=False, nofeed=False, safe=False, negative_prompt="", quality="medium", image=(),
        ))
        for i in range(4)
    ]
    photos = [Image.open(path).convert("RGB") for path in sorted(DATA.glob("*.jpg"))]
    return renders + photos


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def _load(moderator: ClassifierModerator, images: list[Image.Image]) -> tuple[float, list[float], int]:
    """Keep IN_FLIGHT moderations running for ROUNDS images; return (seconds, loop lags, images)."""
    lags: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        while not done.is_set():
            start = time.perf_counter()
            await asyncio.sleep(TICK)
            lags.append(time.perf_counter() - start - TICK)

    queue = [GeneratedImage(image=images[i % len(images)], backend="bench", provider="bench") for i in range(ROUNDS)]

    async def worker() -> None:
        while queue:
            await moderator.check_image(queue.pop(), None)  # type: ignore[arg-type]

    tick = asyncio.create_task(ticker())
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
    elapsed = time.perf_counter() - start
    done.set()
    await tick
    return elapsed, lags, ROUNDS


async def _idle_lags(seconds: float) -> list[float]:
    lags: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        await asyncio.sleep(TICK)
        lags.append(time.perf_counter() - start - TICK)
    return lags


def main() -> None:
    settings = load_settings().moderation
    start = time.perf_counter()
    classifiers = load_classifiers(settings)
    load_s = time.perf_counter() - start
    images = _images()

    latencies = []
    for i in range(ROUNDS):
        image = images[i % len(images)]
        start = time.perf_counter()
        classifiers.analyse(image)
        latencies.append((time.perf_counter() - start) * 1000)

    idle = asyncio.run(_idle_lags(2.0))
    results = {}
    # The service's pool (niced threads, 1 ms GIL switch interval) against a plain pool at CPython defaults.
    for name, niced, switch in (("plain pool, 5 ms GIL switch", False, 0.005), ("service pool", True, GIL_SWITCH_INTERVAL)):
        previous = sys.getswitchinterval()
        sys.setswitchinterval(switch)
        with cpu_executor(WORKERS) if niced else ThreadPoolExecutor(max_workers=WORKERS) as executor:
            moderator = ClassifierModerator(classifiers, Thresholds.from_settings(settings), executor)
            results[name] = asyncio.run(_load(moderator, images))
        sys.setswitchinterval(previous)

    idle_ms = [lag * 1000 for lag in idle]
    print(f"Models load + warm-up: {load_s * 1000:.0f} ms. Images: 4 procedural renders at 1024², 3 photographs.\n")
    print(f"Latency per image, one thread, no contention: p50 {statistics.median(latencies):.1f} ms, "
          f"p95 {_percentile(latencies, 95):.1f} ms. Event-loop lag with nothing running: "
          f"p99 {_percentile(idle_ms, 99):.2f} ms.\n")
    print(f"Full load: {WORKERS} threads, {IN_FLIGHT} moderations in flight, {ROUNDS} images, 1 ms ticker.\n")
    print("| pool | images/s | loop lag p50 | loop lag p99 (target < 5 ms) | loop lag max |")
    print("|---|---|---|---|---|")
    for name, (elapsed, lags, count) in results.items():
        lag_ms = [lag * 1000 for lag in lags]
        print(f"| {name} | {count / elapsed:.1f} | {statistics.median(lag_ms):.2f} ms | "
              f"{_percentile(lag_ms, 99):.2f} ms | {max(lag_ms):.2f} ms |")


if __name__ == "__main__":
    main()
