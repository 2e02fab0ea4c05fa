"""Shared plumbing for HTTP benchmarks: servers in subprocesses, load from `wrk` in another one."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent



@contextlib.contextmanager
def server(args: list[str], port: int, env: Mapping[str, str] | None = None, cwd: Path | None = None) -> Iterator[str]:
    """Run `python args...` until it listens on `port`; yield its base URL; SIGTERM it afterwards."""
    process = subprocess.Popen(
        [sys.executable, *args], cwd=cwd or ROOT, env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
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


def wrk(url: str, seconds: float = 5, connections: int = 16) -> Load:
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


def interleaved(urls: Mapping[str, str], rounds: int = 3, seconds: float = 4) -> dict[str, Load]:
    """Alternate the targets round by round and keep each one's median run, so drift hits all alike."""
    runs: dict[str, list[Load]] = {name: [] for name in urls}
    for _ in range(rounds):
        for name, url in urls.items():
            runs[name].append(wrk(url, seconds))
    return {name: sorted(loads, key=lambda load: load.requests_per_s)[len(loads) // 2] for name, loads in runs.items()}
