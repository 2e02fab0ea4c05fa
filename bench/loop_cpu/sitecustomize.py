"""Event-loop CPU by kind of work, for the telemetry benchmark's servers (PYTHONPATH=bench/loop_cpu).

Throughput ratios on a shared 2-core machine move by ±15 % between identical servers; the CPU time
the loop spends in each callback moves much less. With IMAGE_SERVICE_BENCH_LOOP_CPU set to a
directory, each callback's thread CPU time is added to its kind (request handling, telemetry,
other), requests are counted as their handler tasks finish, and the totals are written there as
JSON when the process exits.
"""

from __future__ import annotations

import asyncio.events
import atexit
import json
import os
import time
from pathlib import Path
from typing import Any

REQUESTS = ("RequestHandler", "_SelectorSocketTransport._read_ready")
TELEMETRY = ("Forwarder", "EncoderProcess", "SubprocessStreamProtocol", "_UnixReadPipeTransport",
             "_UnixWritePipeTransport", "ClientRequest", "ResponseHandler")


def _install(directory: Path) -> None:
    totals = {"requests": 0, "requests_s": 0.0, "telemetry_s": 0.0, "other_s": 0.0}
    run = asyncio.events.Handle._run
    clock = time.thread_time

    def timed_run(handle: asyncio.events.Handle) -> None:
        started = clock()
        run(handle)
        spent = clock() - started
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

    def write() -> None:
        if totals["requests"]:
            (directory / f"{os.getpid()}.json").write_text(json.dumps(totals))

    setattr(asyncio.events.Handle, "_run", timed_run)
    atexit.register(write)


if os.environ.get("IMAGE_SERVICE_BENCH_LOOP_CPU"):
    _install(Path(os.environ["IMAGE_SERVICE_BENCH_LOOP_CPU"]))
