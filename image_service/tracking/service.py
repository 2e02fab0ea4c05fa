"""Build and run the telemetry path from settings: sink, spool, forwarder, metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from ..config import ConfigError, TrackingSettings
from .forwarder import Forwarder
from .metrics import registry_for
from .sinks import FileSink, Sink, TinybirdSink
from .spool import Spool


def make_sink(settings: TrackingSettings) -> Sink:
    """Tinybird when an API key is configured; otherwise the local NDJSON file."""
    key = settings.api_key.get_secret_value()
    if key:
        return TinybirdSink(settings.api_url, key, settings.datasource, settings.timeout, executor=None)
    _check_outside_spool(settings)
    return FileSink(settings.local_path, executor=None, max_bytes=settings.local_max_bytes, keep=settings.local_keep)


def _check_outside_spool(settings: TrackingSettings) -> None:
    """The spool's process locks its directory for its lifetime, and the local sink locks its file's
    directory for each batch: inside the spool, every batch would wait for ever."""
    try:
        spool, sink = settings.spool_dir.resolve(), settings.local_path.resolve().parent
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise ConfigError(f"tracking.local_path or tracking.spool_dir cannot be resolved: {exc}") from None
    if sink == spool or spool in sink.parents:
        raise ConfigError(f"tracking.local_path {settings.local_path} must not be inside tracking.spool_dir {settings.spool_dir}")


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
