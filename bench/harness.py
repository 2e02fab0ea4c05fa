"""Shared plumbing for HTTP benchmarks: servers in subprocesses, load from `wrk` in another one."""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent



@contextlib.contextmanager
def server(
    args: list[str], port: int, env: Mapping[str, str] | None = None, cwd: Path | None = None, idle: bool = False
) -> Iterator[str]:
    """Run `python args...` until it listens on `port`; yield its base URL; SIGTERM it afterwards.
    `idle`: only on CPU nothing else wants (SCHED_IDLE), for a stand-in of a service on other machines."""
    process = subprocess.Popen(
        [sys.executable, *args], cwd=cwd or ROOT, env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    if idle:
        os.sched_setscheduler(process.pid, os.SCHED_IDLE, os.sched_param(0))
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited: {process.stderr.read().decode() if process.stderr else ''}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("server did not start") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as reply:
        return reply.read()


@dataclass(frozen=True)
class Load:
    requests_per_s: float
    p50_ms: float
    p99_ms: float


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def wrk(url: str, seconds: int = 5, connections: int = 16) -> Load:
    """Drive `url` with wrk (one thread: the other core is the server's) and parse its report."""
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed: run `make bench` (it installs it) or apt-get install wrk")
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url],
        capture_output=True, text=True, check=True, timeout=seconds + 60,
    ).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"load run saw errors:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    return Load(rps, p50, p99)


@dataclass(frozen=True)
class Comparison:
    """How a target fared against the baseline over paired rounds (medians of per-round figures)."""

    requests_per_s: float
    ratio: float
    ratio_low: float
    ratio_high: float
    p99_ms: float
    added_p99_ms: float


def paired(urls: Mapping[str, str], baseline: str, rounds: int, seconds: int, connections: int = 16) -> dict[str, Comparison]:
    """Every target once per round, in a fresh random order; each round's figures are taken against
    the baseline's in the same round, so the machine's drift between rounds cancels out. The
    quartiles of the per-round ratios show how far one round can be trusted."""
    runs: dict[str, list[Load]] = {name: [] for name in urls}
    order = list(urls)
    shuffle = random.Random(0).shuffle
    for _ in range(rounds):
        shuffle(order)
        for name in order:
            runs[name].append(wrk(urls[name], seconds, connections))
    base = runs[baseline]
    result = {}
    for name, loads in runs.items():
        ratios = [load.requests_per_s / b.requests_per_s for load, b in zip(loads, base)]
        low, _, high = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
        result[name] = Comparison(
            requests_per_s=statistics.median(load.requests_per_s for load in loads),
            ratio=statistics.median(ratios),
            ratio_low=low,
            ratio_high=high,
            p99_ms=statistics.median(load.p99_ms for load in loads),
            added_p99_ms=statistics.median(load.p99_ms - b.p99_ms for load, b in zip(loads, base)),
        )
    return result
