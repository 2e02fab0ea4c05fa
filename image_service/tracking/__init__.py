"""Telemetry: every pipeline stage's event becomes a row in Tinybird, without slowing a request.

    structlog event ─► TelemetryProcessor (copy onto a bounded queue; never blocks, never raises)
                            │
                            ▼
                       Forwarder task ─► rows (privacy applied) ─► batches ─► Sink (Tinybird | file)
                            │                                                   │ failures
                            └──────────────► disk Spool ◄───────────────────────┘ (breaker, overflow)
"""

from .context import bind, new_request, parse_traceparent, request_ids
from .forwarder import Breaker, BreakerState, Forwarder
from .logs import configure_logging, flush_logs, is_configured, processors
from .processor import TELEMETRY, EventQueue, TelemetryProcessor
from .rows import COLUMNS, TERMINAL_EVENT, TEXT_EVENT, build_row, sanitise
from .service import Tracking, make_sink
from .sinks import FileSink, Outcome, SendResult, Sink, TinybirdSink
from .spool import Spool
from .text import record_text_completion

__all__ = [
    "COLUMNS", "TELEMETRY", "TERMINAL_EVENT", "TEXT_EVENT", "Breaker", "BreakerState", "EventQueue", "FileSink",
    "Forwarder", "Outcome", "SendResult", "Sink", "Spool", "TelemetryProcessor", "TinybirdSink",
    "Tracking", "bind", "build_row", "configure_logging", "flush_logs", "is_configured", "make_sink", "new_request",
    "parse_traceparent", "processors", "record_text_completion", "request_ids", "sanitise",
]
