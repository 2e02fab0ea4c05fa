"""Background threads run below the event loop: a busy pool must never delay a request.

On Linux nice values are per thread, so a pool's threads can yield to the loop's thread within one
process. Elsewhere the threads keep the process's priority.
"""

from __future__ import annotations

import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

# Measured in BENCHMARKS.md ("Moderation"): with every core busy in the pool, the event loop still
# gets a core within a millisecond or two.
WORKER_NICE = 10


def lower_thread_priority() -> None:
    """The calling thread to WORKER_NICE, never above the priority it inherited."""
    thread = threading.get_native_id()
    os.setpriority(os.PRIO_PROCESS, thread, max(os.getpriority(os.PRIO_PROCESS, thread), WORKER_NICE))


def background_executor(workers: int, name: str) -> ThreadPoolExecutor:
    """A thread pool whose threads run at WORKER_NICE (on Linux)."""
    initializer = lower_thread_priority if sys.platform == "linux" else None
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name, initializer=initializer)
