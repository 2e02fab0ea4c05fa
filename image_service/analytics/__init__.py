"""Analytics over the telemetry rows: the Tinybird project's pipes, run on Tinybird or locally.

    tinybird/*.datasource, *.pipe ─► datafile (read) ─► template (render, Tinybird's subset)
                                              │
          LocalEngine (chdb, local NDJSON) ◄──┴──► TinybirdSource (GET /v0/pipes/{name}.json)
                         └────── PipeSource ──────┘
                                    │
                 stats (tables) · alerts check (anomalies, webhook) · /dashboard

chdb is imported only when a local engine is built, never by importing this package.
"""

from .datafile import PROJECT_DIR, Datasource, Pipe, datasource, endpoint_pipes
from .engine import AnalyticsError
from .source import DASHBOARD_PIPES, LocalSource, PipeSource, TinybirdSource, check_params, make_source, run_pipes
from .template import TemplateError, render

__all__ = [
    "DASHBOARD_PIPES", "PROJECT_DIR", "AnalyticsError", "Datasource", "LocalSource", "Pipe", "PipeSource",
    "TemplateError", "TinybirdSource", "check_params", "datasource", "endpoint_pipes", "make_source", "render",
    "run_pipes",
]
