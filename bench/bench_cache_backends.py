"""Cache-hit throughput over real TCP: memory vs Redis backend, 1 vs 2 worker processes.

Each configuration runs `image-service serve --workers N` as its own process tree, warms one image
into the cache, then `wrk` (a separate process) requests that image for a few seconds: every
request is a cache hit. Redis is a real redis-server on a free loopback port. The load generator
shares the machine's cores with the service, so compare the ratios, not the absolute numbers; the
configurations run round-robin for several rounds and each figure is the median of its rounds, so a
burst of outside load spreads over all of them instead of skewing one.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from image_service.testing import RedisServer, free_port

ROOT = Path(__file__).resolve().parent.parent
PATH = "/prompt/a%20lighthouse%20at%20dusk?width=512&height=512&seed=3"
DURATION = os.environ.get("BENCH_DURATION", "3s")
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
CONNECTIONS = 32
THREADS = 2
WARM_REQUESTS = 20
STARTUP_DEADLINE = 30.0

# (label, environment for the service)
BACKENDS: list[tuple[str, dict[str, str]]] = [
    ("memory", {"IMAGE_SERVICE_CACHE__BACKEND": "memory"}),
    ("redis + local level", {"IMAGE_SERVICE_CACHE__BACKEND": "redis", "IMAGE_SERVICE_CACHE__LOCAL_CACHE": "true"}),
    ("redis only", {"IMAGE_SERVICE_CACHE__BACKEND": "redis", "IMAGE_SERVICE_CACHE__LOCAL_CACHE": "false"}),
]
WORKERS = (1, 2)


def _listening(port: int) -> int:
    wanted = f"0100007F:{port:04X}"
    rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return sum(1 for row in rows if row.split()[1] == wanted and row.split()[3] == "0A")


def _seconds(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[unit]


def _run(env: dict[str, str], workers: int) -> tuple[float, float, float, int]:
    """requests/s, p50 and p99 latency in ms, and the body size, for one configuration."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "image_service", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--workers", str(workers), "--log-format", "json"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "IMAGE_SERVICE_SERVER__LOG_LEVEL": "warning", **env},
    )
    try:
        end = time.monotonic() + STARTUP_DEADLINE
        while _listening(port) < workers:
            if server.poll() is not None or time.monotonic() > end:
                raise RuntimeError("the service did not start")
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}{PATH}"
        size = 0
        for _ in range(WARM_REQUESTS):  # new connections reach every worker: each has its hit ready
            with urllib.request.urlopen(url, timeout=30) as reply:
                size = len(reply.read())
        result = subprocess.run(
            ["wrk", "-t", str(THREADS), "-c", str(CONNECTIONS), "-d", DURATION, "--latency", url],
            capture_output=True, text=True, check=True, timeout=120,
        ).stdout
    finally:
        server.terminate()
        server.wait(timeout=60)
    if re.search(r"Non-2xx or 3xx responses", result):
        raise RuntimeError(f"errors under load:\n{result}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", result).group(1))  # type: ignore[union-attr]
    p50 = _seconds(re.search(r"^\s*50%\s+(\S+)", result, re.MULTILINE).group(1)) * 1000  # type: ignore[union-attr]
    p99 = _seconds(re.search(r"^\s*99%\s+(\S+)", result, re.MULTILINE).group(1)) * 1000  # type: ignore[union-attr]
    return rps, p50, p99, size


def main() -> None:
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed (Debian package wrk; `make bench` installs it)")
    configurations = [(label, env, workers) for label, env in BACKENDS for workers in WORKERS]
    runs: dict[tuple[str, int], list[tuple[float, float, float, int]]] = {}
    with tempfile.TemporaryDirectory() as workdir, RedisServer(Path(workdir)) as redis_server:
        for _ in range(ROUNDS):
            for label, env, workers in configurations:
                full_env = {**env, "IMAGE_SERVICE_CACHE__REDIS_URL": redis_server.url}
                runs.setdefault((label, workers), []).append(_run(full_env, workers))
    medians = {
        config: tuple(statistics.median(run[i] for run in results) for i in range(4))
        for config, results in runs.items()
    }
    baseline = medians[(BACKENDS[0][0], WORKERS[0])][0]
    size = int(next(iter(medians.values()))[3])
    print(
        f"Cache hits of one {size:,}-byte JPEG (512×512) over loopback TCP; `wrk -t{THREADS} "
        f"-c{CONNECTIONS} -d{DURATION}` in a separate process on the same cores; median of {ROUNDS} "
        "round-robin rounds. Ratio: requests/s against memory with 1 worker, in this run.\n"
    )
    print("| backend | workers | requests/s | ratio | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|")
    for (label, workers), (rps, p50, p99, _) in medians.items():
        print(f"| {label} | {workers} | {rps:,.0f} | {rps / baseline:.2f} | {p50:.2f} | {p99:.2f} |")


if __name__ == "__main__":
    main()
