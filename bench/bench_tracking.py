"""Telemetry's cost: processor per event, forwarder rows/s, and server throughput with tracking on/off."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from image_service.config import TrackingSettings
from image_service.testing import free_port
from image_service.tracking import Forwarder, Spool, TinybirdSink
from image_service.tracking.context import merge_request_context, new_request
from image_service.tracking.processor import TELEMETRY, EventQueue

from .harness import fetch, paired_runs, server, signal_server, switched_load, wrk

PATH = "/prompt/a%20red%20fox?width=512&height=384&seed=7"
TOKEN = "bench-token"
OFF = "tracking off"
# The failing sinks' variants, by name (`bench cycles` waits for their breakers to open).
DOWN = "sink down"
SLOW = "sink answers after 6 s"
# Servers per variant: the same code in two processes differs by up to ~10 % here.
INSTANCES = 2
# Paired rounds of the one-connection table.
ROUNDS = 8
# The saturated comparison: rounds, and windows of a load, recording and not in the order
# ABBA BAAB ABBA BAAB (or its mirror), so that a drift during the load, in either direction, weighs
# on both modes alike. Measured on a tracking-off server switched between two identical modes
# (the A/A control below), one load of four 2 s windows alternating ABAB gave ratios from 0.77 to
# 1.03 (standard deviation 0.076 over eight loads); sixteen windows of 0.5 s as above, 0.037.
SWITCHED_ROUNDS = 8
WINDOWS = 16
WINDOW = 0.5
BALANCED = (True, False, False, True)
# Resamples of the per-round ratios for the confidence interval of their median.
RESAMPLES = 4000
LOOP_CPU = Path(__file__).parent / "loop_cpu"


CACHE_HIT_EVENTS = (
    {"event": "request.received", "stage": "request", "duration_ms": 0.02},
    {"event": "cache.lookup", "stage": "cache", "cache_status": "hit", "duration_ms": 0.01},
    {"event": "request.completed", "stage": "response", "status": 200, "error": None, "duration_ms": 0.3},
)


def processor_cost() -> tuple[float, float]:
    """Microseconds each event adds, over whole cache hits (three events; the queue serialises
    every sixteenth request's terminal event's group with the fifteen before it), against the same
    requests with telemetry off: the processor alone, and with the context merge every log event pays."""
    queue = EventQueue(10_000_000)
    requests = 60_000

    def per_event(target: EventQueue | None, merge: bool) -> float:
        started = time.perf_counter()
        for n in range(requests):
            TELEMETRY.route_current_context(target)
            new_request(request_id=f"{n:032x}", request_start=time.time(), model="procedural", prompt="a red fox",
                        width=512, height=384, seed=7, tier="anonymous", route="/prompt/{prompt}", method="GET")
            for event in CACHE_HIT_EVENTS:
                TELEMETRY(None, "info", merge_request_context(None, "info", dict(event)) if merge else dict(event))
            if len(queue) >= 3_000:
                # The forwarder drains the queue about this often under load; a queue that only grows
                # would measure the allocator instead.
                queue.take(len(queue))
        return (time.perf_counter() - started) / (requests * len(CACHE_HIT_EVENTS)) * 1e6

    off = per_event(None, merge=False)
    alone, chain = per_event(queue, merge=False), per_event(queue, merge=True)
    TELEMETRY.route_current_context(None)
    return alone - off, chain - off


def request_group(n: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The context and the three events of one cache hit, as the processor queues them."""
    now = time.time()
    context = {"request_id": f"{n:032x}", "request_start": now - 0.0015, "trace_id": f"{n:032x}",
               "span_id": f"{n:016x}", "route": "/prompt/{prompt}", "method": "GET", "model": "procedural",
               "prompt": "a red fox", "width": 512, "height": 384, "seed": 7, "private": False, "nofeed": False,
               "nologo": False, "enhance": False, "user": "", "tier": "anonymous", "cache_status": "hit",
               "backend": "embedded", "provider": "image_service", "is_mature": False, "is_child": False}
    return context, [{**event, "_ts": now} for event in CACHE_HIT_EVENTS]


async def forwarder_rate(url: str, rows: int = 201_000) -> tuple[float, int, float]:
    """Rows/s through the real forwarder (encoding, gzip, HTTP) into the local Events API in another process."""
    with tempfile.TemporaryDirectory() as tmp:
        forwarder = Forwarder(
            TrackingSettings(queue_size=rows, batch_rows=10_000, max_wait=0.2),
            TinybirdSink(url, TOKEN, "pollinations_events", 30.0, executor=None),
            Spool(Path(tmp), 10**9),
        )
        await forwarder.start()
        for n in range(rows // len(CACHE_HIT_EVENTS)):
            forwarder.queue.put_group(*request_group(n))
        started = time.perf_counter()
        await forwarder.flush(timeout=300)
        elapsed = time.perf_counter() - started
        batches = forwarder.stats.batches
        await forwarder.close()
    return rows / elapsed, batches, batches / elapsed


def loop_accounting(directory: Path) -> dict[str, str]:
    """Environment that makes a server account its event loop's CPU by kind into `directory`."""
    paths = [str(LOOP_CPU), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {"PYTHONPATH": os.pathsep.join(paths), "IMAGE_SERVICE_BENCH_LOOP_CPU": str(directory)}


def loop_totals(directory: Path) -> dict[str, dict[str, float]]:
    """The totals a server wrote at exit, by mode ("on": recording, "off": not); its encoder
    process writes none: it handles no request."""
    files = list(directory.glob("*.json"))
    if len(files) != 1:
        raise RuntimeError(f"expected one loop-CPU report in {directory}, found {len(files)}")
    totals: dict[str, dict[str, float]] = json.loads(files[0].read_text())
    return totals


@dataclass(frozen=True)
class Server:
    variant: str
    url: str
    accounts: Path


Totals = dict[str, dict[str, float]]


@dataclass(frozen=True)
class Windows:
    """What each server's windows added to its loop account, by round and mode ("on": recording,
    "off": not; a tracking-off server's two modes run the same code)."""

    servers: Sequence[Server]
    rounds: Sequence[Mapping[str, Totals]]

    def per_round(self, variant: str, *modes: str) -> list[float]:
        """The variant's requests/s in `modes` together, each round: the mean over its servers."""
        return [
            statistics.fmean(
                sum(added[entry.url][mode]["requests"] for mode in modes)
                / sum(added[entry.url][mode]["wall_s"] for mode in modes)
                for entry in self.servers if entry.variant == variant
            )
            for added in self.rounds
        ]

    def within(self, variant: str) -> list[float]:
        """Each round's ratio of the variant's requests/s recording to not recording."""
        return [on / off for on, off in zip(self.per_round(variant, "on"), self.per_round(variant, "off"))]

    def summed(self, variant: str, *modes: str) -> dict[str, float]:
        chosen = [added[entry.url][mode] for added in self.rounds for entry in self.servers if entry.variant == variant
                  for mode in modes]
        return {key: sum(totals[key] for totals in chosen) for key in chosen[0]}

    def thread_per_request(self, entry: Server) -> float:
        modes = [added[entry.url][mode] for added in self.rounds for mode in ("on", "off")]
        return sum(totals["thread_s"] for totals in modes) / sum(totals["requests"] for totals in modes)


def balanced_signals(first_on: bool) -> list[int]:
    """WINDOWS signals, recording (SIGUSR2) and not (SIGUSR1), in the balanced order from `first_on`."""
    quarter = [first_on == on for on in BALANCED]
    pattern = (quarter + [not on for on in quarter]) * (WINDOWS // 8)
    return [signal.SIGUSR2 if on else signal.SIGUSR1 for on in pattern]


def switched_rounds(servers: Sequence[Server], rounds: int) -> Windows:
    """Every server once a round, in a fresh random order, under one load of WINDOWS windows of
    WINDOW seconds, recording and not in the balanced order from a random first mode. A tracking-off
    server is switched the same way between two modes that run the same code: the A/A control, which
    shows what the design reads when there is nothing to find. Work telemetry defers (the
    forwarder's next round, a delivery's settlement) spills into the next window: the CPU table
    shows it as telemetry work in windows not recording."""
    order = list(servers)
    choose = random.Random(1)
    seen: dict[str, Totals] = {}
    added_by_round = []
    for _ in range(rounds):
        choose.shuffle(order)
        added: dict[str, Totals] = {}
        for entry in order:
            switched_load(entry.url, balanced_signals(choose.random() < 0.5), WINDOW)
            now = loop_totals(entry.accounts)
            before = seen.get(entry.url)
            added[entry.url] = now if before is None else {
                mode: {key: value - before[mode][key] for key, value in totals.items()} for mode, totals in now.items()
            }
            seen[entry.url] = now
        added_by_round.append(added)
    return Windows(servers, added_by_round)


def median_interval(values: Sequence[float], resamples: int = RESAMPLES) -> tuple[float, float]:
    """A 95 % bootstrap confidence interval of the median of `values`."""
    draw = random.Random(0).choices
    medians = sorted(statistics.median(draw(values, k=len(values))) for _ in range(resamples))
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def processor_in_situ(sink: str, directory: Path, rounds: int = 6, seconds: int = 2) -> tuple[float, float]:
    """The processor's thread CPU a cache hit in a saturated server of its own (µs: recording, not
    recording), switched between the two modes `rounds` times; the clock's own cost is in both."""
    port = free_port()
    (directory / "loop-cpu").mkdir(parents=True)
    env = {"TINYBIRD_API_KEY": TOKEN, "TINYBIRD_API_URL": sink, "IMAGE_SERVICE_BENCH_PROCESSOR_CPU": "1",
           **loop_accounting(directory / "loop-cpu")}
    args = ["-m", "image_service", "serve", "--port", str(port), "--log-format", "json"]
    with server(args, port, env=env, cwd=directory) as base:
        url = base + PATH
        fetch(url)
        for _ in range(rounds):
            for on in random.sample((True, False), 2):
                recording(on)(url)
                wrk(url, seconds)
    totals = loop_totals(directory / "loop-cpu")
    recorded, unrecorded = (totals[mode]["processor_s"] / totals[mode]["requests"] * 1e6 for mode in ("on", "off"))
    return recorded, unrecorded


def recording(on: bool) -> Callable[[str], None]:
    """Switch the server at a URL to recording telemetry or not (`bench/loop_cpu`'s signals)."""
    return lambda url: signal_server(url, signal.SIGUSR2 if on else signal.SIGUSR1)


def quiet(name: str) -> str:
    return f"{name}, not recording"


def sink_variants(stack: contextlib.ExitStack) -> dict[str, dict[str, str]]:
    """The servers compared, by the environment that makes each: tracking off, and tracking into a
    healthy sink, a closed port and a sink that answers after 6 s. The two stand-in sinks run
    until `stack` closes. Tinybird parses rows on its own machines: the stand-ins take only CPU the
    servers, wrk and the encoder processes leave idle, as a remote sink takes none."""
    sink_port, slow_port = free_port(), free_port()
    sink = stack.enter_context(server(["-m", "tests.events_api", str(sink_port), TOKEN], sink_port, idle=True))
    slow_sink = stack.enter_context(
        server(["-m", "tests.events_api", str(slow_port), TOKEN, "6"], slow_port, idle=True)
    )
    return {
        OFF: {"IMAGE_SERVICE_TRACKING__ENABLED": "false"},
        "tracking on": {"TINYBIRD_API_URL": sink},
        DOWN: {"TINYBIRD_API_URL": f"http://127.0.0.1:{free_port()}"},
        SLOW: {"TINYBIRD_API_URL": slow_sink},
    }


def main() -> None:
    alone, chain = processor_cost()
    print("| measure | value |\n|---|---|")
    print(f"| processor cost per event (a cache hit's three; groups serialised sixteen at a time) | {alone:.2f} µs |")
    print(f"| context merge + processor per event | {chain:.2f} µs |")

    sink_port = free_port()
    with server(["-m", "tests.events_api", str(sink_port), TOKEN], sink_port) as sink:
        rate, batches, per_second = asyncio.run(forwarder_rate(sink))
    print(f"| forwarder into local Events API | {rate:,.0f} rows/s ({batches} requests, {per_second:.1f} requests/s) |")
    print(f"\nTarget ≥ 33,000 rows/s at ≤ 100 requests/s: {'met' if rate >= 33_000 and per_second <= 100 else 'NOT met'}.\n")

    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        variants = sink_variants(stack)
        sink = variants["tracking on"]["TINYBIRD_API_URL"]
        kinds: dict[str, list[str]] = {}
        before: dict[str, Callable[[str], None]] = {}
        servers: list[Server] = []
        for name, env in variants.items():
            urls = kinds[name] = []
            for _ in range(INSTANCES):
                port = free_port()
                directory = Path(tmp) / str(port)
                (directory / "loop-cpu").mkdir(parents=True)
                url = stack.enter_context(server(
                    ["-m", "image_service", "serve", "--port", str(port), "--log-format", "json"], port,
                    env={"TINYBIRD_API_KEY": TOKEN, **loop_accounting(directory / "loop-cpu"), **env},
                    cwd=directory,
                )) + PATH
                fetch(url)
                urls.append(url)
                servers.append(Server(name, url, directory / "loop-cpu"))
            if name != OFF:
                kinds[quiet(name)] = urls
                before[name], before[quiet(name)] = recording(True), recording(False)
        windows = switched_rounds(servers, SWITCHED_ROUNDS)
        one_at_a_time = paired_runs({name: urls for name, urls in kinds.items() if name != OFF}, ROUNDS, 2, 1, before)
        processor_on, processor_off = processor_in_situ(sink, Path(tmp) / "processor")
    tracked = [name for name in variants if name != OFF]
    print(f"Cache hits, {INSTANCES} servers per variant. Saturated (wrk, 16 connections): {SWITCHED_ROUNDS} rounds, "
          f"every server once a round, in a fresh random order, under one load of {WINDOWS} windows of {WINDOW} s "
          "(`bench/loop_cpu` accounts each window; wrk's start and end are in none). A tracking server records "
          "telemetry in half the windows, in the order ABBA BAAB ABBA BAAB from a random first mode, and not in the "
          "others (its telemetry routed nowhere, its forwarder resting, as without tracking). **Within one "
          "process** compares the two: the same memory layout, the same load, a second apart. A tracking-off "
          "server is switched the same way between two modes that run the same code: its row is the A/A "
          "control, what the design reads with nothing to find. **Against tracking off** compares with the "
          "servers started without tracking, whose processes differ by up to ~10 % from any other for the same "
          "code. Requests/s are the server's own count over its windows' time; each figure is the median over "
          "rounds of the mean of a variant's servers, with a 95 % bootstrap confidence interval of that median.\n")
    print("Saturated (wrk, 16 connections):\n")
    print("| server | requests/s | ratio within one process | 95 % interval | quartiles | ratio against tracking off |")
    print("|---|---|---|---|---|---|")
    off_rps = windows.per_round(OFF, "on", "off")
    within_by_variant = {name: windows.within(name) for name in variants}
    verdicts = []
    for name, within in within_by_variant.items():
        low, _, high = statistics.quantiles(within, n=4)
        lowest, highest = median_interval(within)
        if name == OFF:
            print(f"| {OFF} (A/A control) | {statistics.median(off_rps):,.0f} | {statistics.median(within):.3f} | "
                  f"{lowest:.3f}–{highest:.3f} | {low:.2f}–{high:.2f} | 1.000 |")
            continue
        rps = windows.per_round(name, "on")
        against = statistics.median(value / base for value, base in zip(rps, off_rps))
        verdicts.append((name, statistics.median(within), lowest))
        print(f"| {name} | {statistics.median(rps):,.0f} | {statistics.median(within):.3f} | {lowest:.3f}–{highest:.3f} | "
              f"{low:.2f}–{high:.2f} | {against:.3f} |")
    for name, ratio, lowest in verdicts:
        verdict = "met" if lowest >= 0.95 else "met by the median only" if ratio >= 0.95 else "NOT met"
        print(f"\n{name}: ratio ≥ 0.95 within one process {verdict} (median {ratio:.3f}, interval from {lowest:.3f}).", end="")
    print("\n\nEach round's ratio within one process, in the order run (to pool runs):\n")
    for name, within in within_by_variant.items():
        print(f"- {name}: {', '.join(f'{value:.4f}' for value in within)}")
    print("\nOne request at a time (wrk, 1 connection): the latency a request itself gains, within one process. "
          f"{ROUNDS} paired rounds of 2 s: every tracking server once a round, in a fresh random order, twice in a "
          "row, recording and not, in a random order.\n")
    print("| server | requests/s | p99 ms | added p99 ms |")
    print("|---|---|---|---|")
    for name in tracked:
        within_p99 = one_at_a_time.compare(name, quiet(name))
        print(f"| {name} | {within_p99.requests_per_s:,.0f} | {within_p99.p99_ms:.3f} | {within_p99.added_p99_ms:+.3f} |")
    print("\nTargets: ratio ≥ 0.95 for each variant; added p99 < 0.5 ms.\n")
    print("Event-loop thread CPU per request in the saturated windows, all of a variant's servers and rounds "
          "together: the loop's callbacks by kind (`bench/loop_cpu`) while recording, and the whole thread "
          "(callbacks and the time between them) recording and not. Telemetry work in windows not recording is "
          "what recording windows left behind.\n")
    print("| server | requests | request handling µs | telemetry µs | other µs | thread µs | not recording: thread µs | "
          "not recording: telemetry µs | thread CPU ratio within one process |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in variants:
        on = windows.summed(name, "on", "off") if name == OFF else windows.summed(name, "on")
        count = on["requests"]
        parts = f"| {name} | {count:,.0f} | {on['requests_s'] / count * 1e6:.1f} | "
        thread = on["thread_s"] / count
        if name == OFF:
            print(f"{parts} | {on['other_s'] / count * 1e6:.1f} | {thread * 1e6:.1f} | | | |")
            continue
        quiet_total = windows.summed(name, "off")
        quiet_thread = quiet_total["thread_s"] / quiet_total["requests"]
        spill = quiet_total["telemetry_s"] / quiet_total["requests"]
        print(f"{parts}{on['telemetry_s'] / count * 1e6:.1f} | {on['other_s'] / count * 1e6:.1f} | {thread * 1e6:.1f} | "
              f"{quiet_thread * 1e6:.1f} | {spill * 1e6:.2f} | {quiet_thread / thread:.3f} |")
    off_servers = [windows.thread_per_request(entry) for entry in servers if entry.variant == OFF]
    print(f"\nThread CPU per request of the {OFF} servers: {min(off_servers) * 1e6:.1f} to {max(off_servers) * 1e6:.1f} µs.")
    print(f"\nThe processor in situ (a server of its own, tracking on, saturated, its processor timed by thread CPU): "
          f"{processor_on:.1f} µs a cache hit recording, {processor_off:.1f} µs not recording (the clock's own cost, "
          f"~0.7 µs a call, is in both): {processor_on - processor_off:.1f} µs of recording, against "
          f"{3 * alone:.1f} µs for three events in the processor benchmark above.")
