"""Self-observability in Prometheus format, read from the forwarder's plain counters at scrape time.

Counting with plain integers on the hot path and converting only when scraped keeps the processor's
cost to an append.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .forwarder import Forwarder
from .processor import TELEMETRY

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class TelemetryCollector(Collector):
    def __init__(self, forwarder: Forwarder) -> None:
        self._forwarder = forwarder

    def collect(self) -> Iterator[Metric]:
        forwarder = self._forwarder
        stats, queue = forwarder.stats, forwarder.queue
        for name, help_text, value in (
            ("enqueued", "Events accepted by the telemetry processor", queue.enqueued),
            ("sent", "Rows delivered to the sink", stats.sent),
            ("retried", "Rows re-sent after a retryable failure", stats.retried),
            ("spooled", "Rows written to the disk spool", stats.spooled),
            ("replayed", "Rows delivered from the disk spool", stats.replayed),
            ("quarantined", "Rows the sink accepted into quarantine", stats.quarantined),
            ("encoded_elsewhere", "Rows built by the encoder process rather than the event loop", stats.encoded_elsewhere),
            ("delivered_elsewhere", "Rows the encoder process delivered to the sink itself", stats.delivered_elsewhere),
            ("spooled_elsewhere", "Rows the encoder process wrote into the spool itself", stats.spooled_elsewhere),
        ):
            yield CounterMetricFamily(f"image_service_telemetry_rows_{name}", help_text, value=value)
        dropped = CounterMetricFamily(
            "image_service_telemetry_rows_dropped", "Rows lost, by reason", labels=["reason"]
        )
        reasons = dict(stats.dropped)
        reasons["unserialisable"] = reasons.get("unserialisable", 0) + queue.unserialisable
        reasons["queue_full"] = queue.dropped_full
        reasons["after_shutdown"] = queue.dropped_closed
        reasons["processor_error"] = TELEMETRY.errors
        reasons["spool_missing"] = forwarder.spool.stats.rows_missing
        for reason, count in sorted(reasons.items()):
            dropped.add_metric([reason], count)
        yield dropped
        yield CounterMetricFamily("image_service_telemetry_batches_sent", "Batches delivered", value=stats.batches)
        yield GaugeMetricFamily("image_service_telemetry_queue_depth", "Events waiting in memory", value=len(queue))
        yield GaugeMetricFamily("image_service_telemetry_spool_bytes", "Bytes in the disk spool", value=forwarder.spool.total_bytes)
        yield GaugeMetricFamily(
            "image_service_telemetry_breaker_state", "0 closed, 1 open, 2 half-open", value=int(forwarder.breaker.state)
        )
        yield GaugeMetricFamily(
            "image_service_telemetry_seconds_since_last_success",
            "Seconds since the sink last accepted a batch (since start if never)",
            value=forwarder.seconds_since_success(),
        )


def registry_for(forwarder: Forwarder) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TelemetryCollector(forwarder))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
