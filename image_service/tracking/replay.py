"""`image-service events replay PATH`: send a local NDJSON file or a spool directory to Tinybird.

The rows go through the same forwarder as live telemetry (batching, retries, 413 splits, the breaker),
read from a spool: a directory is drained in place (segments are deleted as they are delivered), a
file is copied into a temporary spool first and left untouched.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..config import TrackingSettings
from .forwarder import BreakerState, Forwarder
from .service import make_sink
from .spool import PREFIX, SUFFIX, Spool

POLL = 0.05


@dataclass(frozen=True)
class ReplayReport:
    sent: int
    quarantined: int
    dropped: int
    remaining_bytes: int

    @property
    def complete(self) -> bool:
        return self.remaining_bytes == 0 and self.dropped == 0

    def summary(self) -> str:
        state = "complete" if self.complete else f"incomplete: {self.remaining_bytes} bytes not delivered"
        return f"replayed {self.sent} rows ({self.quarantined} quarantined, {self.dropped} dropped); {state}"


async def _drain(settings: TrackingSettings, directory: Path) -> ReplayReport:
    spool = Spool(directory, max_bytes=2**62)
    # Spooled rows are built already: no encoder process to start.
    forwarder = Forwarder(settings.model_copy(update={"encoder_process": False}), make_sink(settings), spool)
    await forwarder.start()
    try:
        while spool.has_data() and forwarder.breaker.state is BreakerState.CLOSED:
            await asyncio.sleep(POLL)
    finally:
        await forwarder.close(settings.shutdown_timeout)
    stats = forwarder.stats
    return ReplayReport(stats.replayed, stats.quarantined, sum(stats.dropped.values()), spool.total_bytes)


async def replay(settings: TrackingSettings, path: Path) -> ReplayReport:
    if path.is_dir():
        return await _drain(settings, path)
    with tempfile.TemporaryDirectory(prefix="image-service-replay-") as tmp:
        shutil.copyfile(path, Path(tmp) / f"{PREFIX}{1:012d}{SUFFIX}")
        return await _drain(settings, Path(tmp))
