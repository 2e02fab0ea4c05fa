"""Shared plumbing for HTTP benchmarks: servers in subprocesses, load from `wrk` in another one."""

from __future__ import annotations

import contextlib
import math
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent

# The server under test gets a core of its own; wrk, stand-in sinks and the server's helper
# processes share the others. Left to the scheduler, the same server moved between runs from
# 5,000 to 7,000 requests/s as wrk woke up on its core or on the other one.
_CPUS = sorted(os.sched_getaffinity(0))
SERVER_CPUS = set(_CPUS[:1])
OTHER_CPUS = set(_CPUS[1:]) or SERVER_CPUS
# Seconds a switched load runs before its first window and after its last: wrk connecting, and
# wrk stopping, stay out of the windows.
SETTLE_SECONDS = 0.5
# Servers under test by base URL: their helper processes start late and are moved before each run.
_UNDER_TEST: dict[str, int] = {}


def _children(pid: int) -> list[int]:
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _move_helpers(url: str) -> None:
    """Move the helper processes of the server at `url` (its encoder process) off its core."""
    pid = _UNDER_TEST.get(url)
    for child in _children(pid) if pid is not None else []:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(child, OTHER_CPUS)


@contextlib.contextmanager
def server(
    args: list[str], port: int, env: Mapping[str, str] | None = None, cwd: Path | None = None, idle: bool = False
) -> Iterator[str]:
    """Run `python args...` until it listens on `port`; yield its base URL; SIGTERM it afterwards.
    `idle`: only on CPU nothing else wants (SCHED_IDLE), for a stand-in of a service on other
    machines, on the cores wrk uses; otherwise a server under test, on a core of its own."""
    process = subprocess.Popen(
        [sys.executable, *args], cwd=cwd or ROOT, env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    os.sched_setaffinity(process.pid, OTHER_CPUS if idle else SERVER_CPUS)
    if idle:
        os.sched_setscheduler(process.pid, os.SCHED_IDLE, os.sched_param(0))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_listening(process, port, 30)
        if not idle:
            _UNDER_TEST[url] = process.pid
        yield url
    finally:
        _UNDER_TEST.pop(url, None)
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def wait_listening(process: subprocess.Popen[bytes], port: int, seconds: float) -> None:
    """Until `process` listens on `port`; its stderr in the error if it exits first."""
    deadline = time.monotonic() + seconds
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {process.stderr.read().decode() if process.stderr else ''}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start") from None
            time.sleep(0.1)


def _base(url: str) -> str:
    """The base URL a server under test is known by."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def signal_server(url: str, signum: int) -> None:
    """Send a signal to the server under test at `url`, and give it a moment to act on it."""
    os.kill(_UNDER_TEST[_base(url)], signum)
    time.sleep(0.1)


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


def _require_wrk() -> None:
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed: run `make bench` (it installs it) or apt-get install wrk")


def _check_report(out: str) -> None:
    """A run that saw errors measured something else than the path under test."""
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"load run saw errors:\n{out}")


def wrk(url: str, seconds: int = 5, connections: int = 16) -> Load:
    """Drive `url` with wrk (one thread, off the server's core) and parse its report."""
    _require_wrk()
    _move_helpers(_base(url))
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url],
        capture_output=True, text=True, check=True, timeout=seconds + 60,
        preexec_fn=lambda: os.sched_setaffinity(0, OTHER_CPUS),
    ).stdout
    _check_report(out)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    return Load(rps, p50, p99)


def switched_load(url: str, signals: Sequence[int], window: float, connections: int = 16) -> None:
    """One wrk load on `url` without a break, the server sent `signals[i]` at the start of the
    i-th window of `window` seconds and SIGWINCH once the last one ends: `bench/loop_cpu` accounts
    each window to its mode and pauses before wrk stops, so neither wrk's start nor its end (nor
    any idle time) is in the figures. Modes compared this way share the process and the load."""
    _require_wrk()
    base = _base(url)
    _move_helpers(base)
    pid = _UNDER_TEST[base]
    seconds = math.ceil(len(signals) * window + 2 * SETTLE_SECONDS)
    load = subprocess.Popen(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", url], stdout=subprocess.PIPE, text=True,
        preexec_fn=lambda: os.sched_setaffinity(0, OTHER_CPUS),
    )
    time.sleep(SETTLE_SECONDS)
    started = time.monotonic()
    for index, signum in enumerate(signals):
        os.kill(pid, signum)
        time.sleep(max(0.0, started + (index + 1) * window - time.monotonic()))
    os.kill(pid, signal.SIGWINCH)
    out, _ = load.communicate(timeout=seconds + 60)
    if load.returncode != 0:
        raise RuntimeError(f"wrk failed:\n{out}")
    _check_report(out)


@dataclass(frozen=True)
class Comparison:
    """How a target fared against the baseline over paired rounds (medians of per-round figures;
    a target run as several servers counts as their mean in each round)."""

    requests_per_s: float
    ratio: float
    ratio_low: float
    ratio_high: float
    p99_ms: float
    added_p99_ms: float


def paired(urls: Mapping[str, str], baseline: str, rounds: int, seconds: int, connections: int = 16) -> dict[str, Comparison]:
    """`paired_runs` with one server per target, every target compared with `baseline`."""
    runs = paired_runs({name: [url] for name, url in urls.items()}, rounds, seconds, connections)
    return {name: runs.compare(name, baseline) for name in urls}


@dataclass(frozen=True)
class PairedRuns:
    """Each server's loads by kind and place (a URL may serve two kinds), round by round."""

    kinds: Mapping[str, Sequence[str]]
    loads: Mapping[tuple[str, int], Sequence[Load]]
    rounds: int

    def per_round(self, name: str, figure: Callable[[Load], float]) -> list[float]:
        """A kind's figure in each round: the mean over its servers."""
        servers = range(len(self.kinds[name]))
        return [statistics.fmean(figure(self.loads[name, place][index]) for place in servers) for index in range(self.rounds)]

    def compare(self, name: str, baseline: str) -> Comparison:
        """Medians of the kind's per-round figures against the baseline's in the same round."""
        rps = self.per_round(name, lambda load: load.requests_per_s)
        p99 = self.per_round(name, lambda load: load.p99_ms)
        base_rps = self.per_round(baseline, lambda load: load.requests_per_s)
        base_p99 = self.per_round(baseline, lambda load: load.p99_ms)
        ratios = [value / base for value, base in zip(rps, base_rps)]
        low, _, high = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
        return Comparison(
            requests_per_s=statistics.median(rps),
            ratio=statistics.median(ratios),
            ratio_low=low,
            ratio_high=high,
            p99_ms=statistics.median(p99),
            added_p99_ms=statistics.median(value - base for value, base in zip(p99, base_p99)),
        )


def paired_runs(
    kinds: Mapping[str, Sequence[str]], rounds: int, seconds: int, connections: int = 16,
    before: Mapping[str, Callable[[str], None]] | None = None,
) -> PairedRuns:
    """Every server once per round, in a fresh random order: compared round by round, the
    machine's drift between rounds cancels out. Several identical servers per kind average out
    what differs between processes (up to ~10 % here for the same code); the quartiles of the
    per-round ratios show how far one round can be trusted.

    A URL may serve several kinds (one server in several modes): `before[kind](url)` puts it in
    that kind's mode, and its kinds run back to back, in a random order. Compared with each other,
    such kinds share a process, so its memory layout, and seconds of the machine's drift."""
    loads: dict[tuple[str, int], list[Load]] = {(name, place): [] for name, urls in kinds.items() for place in range(len(urls))}
    by_url: dict[str, list[tuple[str, int]]] = {}
    for name, place in loads:
        by_url.setdefault(kinds[name][place], []).append((name, place))
    urls = list(by_url)
    shuffle = random.Random(0).shuffle
    for _ in range(rounds):
        shuffle(urls)
        for url in urls:
            shuffle(by_url[url])
            for name, place in by_url[url]:
                if before is not None and name in before:
                    before[name](url)
                loads[name, place].append(wrk(url, seconds, connections))
    return PairedRuns(kinds, loads, rounds)
