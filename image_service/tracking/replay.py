"""`image-service events replay PATH`: send a local NDJSON file or a spool directory to Tinybird.

The rows go through the same forwarder as live telemetry (batching, retries, 413 splits, the breaker),
read from a spool: a directory is drained in place (segments are deleted as they are delivered), a
file is copied into a temporary spool first and left untouched.
"""

from __future__ import annotations

import asyncio
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from ..config import TrackingSettings
from .forwarder import BreakerState, Forwarder
from .rows import is_row_line
from .service import make_sink
from .spool import PREFIX, SUFFIX, Spool

POLL = 0.05


@dataclass(frozen=True)
class ReplayReport:
    sent: int
    quarantined: int
    dropped: int
    remaining_bytes: int
    skipped_lines: int = 0
    # Segments deleted by another hand while this replay ran: their rows were not sent.
    missing_segments: int = 0

    @property
    def complete(self) -> bool:
        return self.remaining_bytes == 0 and self.dropped == 0 and self.missing_segments == 0

    def summary(self) -> str:
        state = (
            "complete" if self.complete
            else f"incomplete: {self.remaining_bytes} bytes not delivered (replaying again is safe: the pipes "
            "count each event_id once)"
        )
        skipped = f"; {self.skipped_lines} lines skipped (blank, torn or not a JSON row)" if self.skipped_lines else ""
        missing = f"; {self.missing_segments} segments vanished before they were sent" if self.missing_segments else ""
        return f"replayed {self.sent} rows ({self.quarantined} quarantined, {self.dropped} dropped){skipped}{missing}; {state}"


def _copy_rows(source: Path, segment: Path) -> int:
    """Copy the lines of `source` that are JSON objects (rows) into `segment`; the others (blank
    lines, a line torn by a crash) would reach Tinybird only to be quarantined. Returns how many
    lines were skipped."""
    skipped = 0
    with source.open("rb") as lines, segment.open("wb") as out:
        for line in lines:
            if is_row_line(line):
                out.write(line if line.endswith(b"\n") else line + b"\n")
            else:
                skipped += 1
    return skipped


async def _drain(settings: TrackingSettings, directory: Path) -> ReplayReport:
    spool = Spool(directory, max_bytes=2**62, own_if_busy=False)
    # Spooled rows are built already: no encoder process to start.
    forwarder = Forwarder(settings.model_copy(update={"encoder_process": False}), make_sink(settings), spool)
    await forwarder.start()
    try:
        while spool.has_data() and forwarder.breaker.state is BreakerState.CLOSED:
            await asyncio.sleep(POLL)
    finally:
        await forwarder.close(settings.shutdown_timeout)
    stats = forwarder.stats
    return ReplayReport(
        stats.replayed, stats.quarantined, sum(stats.dropped.values()) + spool.stats.rows_missing, spool.total_bytes,
        missing_segments=spool.stats.segments_missing,
    )


async def replay(settings: TrackingSettings, path: Path) -> ReplayReport:
    if path.is_dir():
        return await _drain(settings, path)
    with tempfile.TemporaryDirectory(prefix="image-service-replay-") as tmp:
        skipped = await asyncio.to_thread(_copy_rows, path, Path(tmp) / f"{PREFIX}{1:012d}{SUFFIX}")
        report = await _drain(settings, Path(tmp))
        return replace(report, skipped_lines=skipped)
