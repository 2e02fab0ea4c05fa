"""Event-loop CPU by kind of work, for the telemetry benchmark's servers (PYTHONPATH=bench/loop_cpu).

Throughput ratios on a shared 2-core machine move by ±15 % between identical servers; the CPU time
the loop spends in each callback moves much less. With IMAGE_SERVICE_BENCH_LOOP_CPU set to a
directory, each callback's thread CPU time is added to its kind (request handling, telemetry,
other), requests are counted as their handler tasks finish, and the totals are written there as
JSON when the process exits.

The same process can also be measured with telemetry recording and without: SIGUSR1 stops routing
events to the forwarder (which then rests, idle), SIGUSR2 routes them again, and the totals are
kept apart by that mode. Two processes of the same code differ by up to ~10 % here (memory
layout), far more than telemetry costs; within one process that difference cancels out. Each
mode also gets the loop thread's whole CPU time (`thread_s`, callbacks and the time between them)
and the wall time it lasted (`wall_s`). Nothing counts until the first switch, and SIGWINCH pauses
the accounting until the next one (what happens meanwhile counts in no mode) and writes the totals
so far: a load can be measured without its start and end, and a benchmark can read the totals
after each load.

With IMAGE_SERVICE_BENCH_PROCESSOR_CPU also set, the telemetry processor's own thread CPU time is
added up too (`processor_s`), from the first switch on: its cost among the request's other work,
which its benchmark, with hot caches, understates. The clock costs ~0.7 µs a call, in both modes:
a server measured this way is not one whose throughput is compared.
"""

from __future__ import annotations

import asyncio.events
import atexit
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

REQUESTS = ("RequestHandler", "_SelectorSocketTransport._read_ready")
TELEMETRY = ("Forwarder", "EncoderProcess", "SubprocessStreamProtocol", "_UnixReadPipeTransport",
             "_UnixWritePipeTransport", "ClientRequest", "ResponseHandler")


def _record(on: bool) -> None:
    """Route telemetry events to the forwarder (`on`) or nowhere, as a server without tracking does."""
    from image_service.tracking.processor import TELEMETRY, TelemetryProcessor

    routes = vars(TELEMETRY)
    if on and "_bench_default" in routes:
        TELEMETRY.default = routes.pop("_bench_default")
        del routes["route_current_context"]
    elif not on and "_bench_default" not in routes:
        routes["_bench_default"], TELEMETRY.default = TELEMETRY.default, None
        routes["route_current_context"] = lambda queue: TelemetryProcessor.route_current_context(TELEMETRY, None)


def _time_processor(modes: dict[str, dict[str, float]], current: dict[str, str]) -> None:
    """Add the processor's thread CPU time to the current mode's `processor_s`. Patched on the
    first switch, not at start-up: importing the package here would come before the encoder
    process's choice of which copy of it to import."""
    from image_service.tracking.processor import TelemetryProcessor

    process = TelemetryProcessor.__call__
    clock = time.thread_time

    def timed(self: TelemetryProcessor, logger: Any, method_name: str, event_dict: Any) -> Any:
        started = clock()
        try:
            return process(self, logger, method_name, event_dict)
        finally:
            modes[current["mode"]]["processor_s"] += clock() - started

    setattr(TelemetryProcessor, "__call__", timed)


def _install(directory: Path) -> None:
    modes = {
        mode: {"requests": 0, "requests_s": 0.0, "telemetry_s": 0.0, "other_s": 0.0, "processor_s": 0.0,
               "thread_s": 0.0, "wall_s": 0.0}
        for mode in ("on", "off", "paused")
    }
    # Until the first signal, nothing counts: start-up, warming up, idling.
    current = {"mode": "paused"}
    run = asyncio.events.Handle._run
    clock = time.thread_time
    since = {"thread": clock(), "wall": time.monotonic()}

    def timed_run(handle: asyncio.events.Handle) -> None:
        started = clock()
        run(handle)
        spent = clock() - started
        totals = modes[current["mode"]]
        callback: Any = handle._callback  # type: ignore[attr-defined]
        task = getattr(callback, "__self__", None)
        coroutine = task.get_coro() if isinstance(task, asyncio.Task) else None
        name: str = getattr(coroutine or callback, "__qualname__", "")
        if name.startswith(REQUESTS):
            totals["requests_s"] += spent
            if name == "RequestHandler._handle_request" and task is not None and task.done():
                totals["requests"] += 1
        elif name.startswith(TELEMETRY):
            totals["telemetry_s"] += spent
        else:
            totals["other_s"] += spent

    untimed = bool(os.environ.get("IMAGE_SERVICE_BENCH_PROCESSOR_CPU"))

    def close_period(mode: str) -> None:
        """Charge the time since the last signal to the mode it ran in, and start `mode`."""
        thread, wall = clock(), time.monotonic()
        totals = modes[current["mode"]]
        totals["thread_s"] += thread - since["thread"]
        totals["wall_s"] += wall - since["wall"]
        since["thread"], since["wall"] = thread, wall
        current["mode"] = mode

    def switch(mode: str) -> None:
        nonlocal untimed
        if untimed:
            untimed = False
            _time_processor(modes, current)
        _record(mode == "on")
        close_period(mode)

    def pause() -> None:
        close_period("paused")
        write()

    def write() -> None:
        if any(totals["requests"] for totals in modes.values()):
            (directory / f"{os.getpid()}.json").write_text(json.dumps(modes))

    setattr(asyncio.events.Handle, "_run", timed_run)
    signal.signal(signal.SIGUSR1, lambda *_: switch("off"))
    signal.signal(signal.SIGUSR2, lambda *_: switch("on"))
    signal.signal(signal.SIGWINCH, lambda *_: pause())
    atexit.register(write)


if os.environ.get("IMAGE_SERVICE_BENCH_LOOP_CPU"):
    _install(Path(os.environ["IMAGE_SERVICE_BENCH_LOOP_CPU"]))
