"""Build and run the telemetry path from settings: sink, spool, forwarder, metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from ..config import TrackingSettings
from .forwarder import Forwarder
from .metrics import registry_for
from .sinks import FileSink, Sink, TinybirdSink
from .spool import Spool


def make_sink(settings: TrackingSettings) -> Sink:
    """Tinybird when an API key is configured; otherwise the local NDJSON file."""
    key = settings.api_key.get_secret_value()
    if key:
        return TinybirdSink(settings.api_url, key, settings.datasource, settings.timeout, executor=None)
    return FileSink(settings.local_path, executor=None, max_bytes=settings.local_max_bytes, keep=settings.local_keep)


class Tracking:
    """The telemetry path of one process (or one app): start it, record events, close it."""

    def __init__(self, settings: TrackingSettings, sink: Sink | None = None, spool: Spool | None = None) -> None:
        self.settings = settings
        self.forwarder = Forwarder(
            settings,
            sink or make_sink(settings),
            spool or Spool(settings.spool_dir, settings.spool_max_bytes),
        )
        self.registry: CollectorRegistry = registry_for(self.forwarder)

    async def start(self) -> None:
        await self.forwarder.start()

    async def close(self) -> None:
        await self.forwarder.close(self.settings.shutdown_timeout)

    async def __aenter__(self) -> Tracking:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
