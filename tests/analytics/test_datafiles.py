"""The datafiles: the official CLI accepts them, the schema is the forwarder's, our renderer is Tinybird's."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from image_service.analytics.datafile import PROJECT_DIR, datasource, endpoint_pipes, read_pipe
from image_service.analytics.template import TemplateError, render
from image_service.tracking import COLUMNS

from .conftest import official_render, tb_executable

DATAFILES = sorted(PROJECT_DIR.glob("*/*.datasource")) + sorted(PROJECT_DIR.glob("*/*.pipe"))


def tb_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(tb_executable("tb")), "check", str(path)], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("path", DATAFILES, ids=lambda p: p.name)
def test_tb_check_accepts_every_datafile(path: Path) -> None:
    done = tb_check(path)
    assert done.returncode == 0 and "processed correctly" in done.stdout, done.stdout + done.stderr


def test_tb_check_refuses_a_broken_schema(tmp_path: Path) -> None:
    """The check can fail: a misspelt type in a copy of our datasource is reported."""
    broken = tmp_path / "pollinations_events.datasource"
    broken.write_text((PROJECT_DIR / "datasources" / "pollinations_events.datasource").read_text()
                      .replace("`event_id` String", "`event_id` Strnig"))
    assert tb_check(broken).returncode != 0


def test_datasource_columns_are_the_forwarders_row_schema() -> None:
    """Same names, same order, same types as image_service.tracking.rows.COLUMNS; every column has its json path."""
    ds = datasource()
    assert [(c.name, c.type) for c in ds.columns] == list(COLUMNS.items())
    assert all(c.json_path == f"$.{c.name}" for c in ds.columns)


def test_datasource_engine_settings() -> None:
    ds = datasource()
    assert ds.partition_key == "toYYYYMM(start_time)"
    assert ds.sorting_key is not None and ds.sorting_key.startswith("service_type")
    assert ds.ttl and "start_time" in ds.ttl
    text = (PROJECT_DIR / "datasources" / "pollinations_events.datasource").read_text()
    assert 'TOKEN "pollinations_events_append" APPEND' in text


def test_every_pipe_is_an_endpoint_that_deduplicates_by_event_id() -> None:
    pipes = endpoint_pipes()
    assert set(pipes) == {"request_volume", "error_rates", "cache_hit_rate", "tier_distribution",
                          "content_violations", "latency_percentiles", "anomalies"}
    for pipe in pipes.values():
        assert "LIMIT 1 BY event_id" in pipe.nodes[0].sql, pipe.name
        assert pipe.nodes[0].sql.count("FROM pollinations_events") == 1


PARAMS = [
    {},
    {"bucket": "minute", "service_type": "image", "model": "flux"},
    {"bucket": "day", "start": "2025-01-01 00:00:00", "end": "2025-02-01 00:00:00"},
    {"model": "it's \"odd\" \\ 100% `x`\n", "bucket": "hour"},
    {"max_error_rate": "0.25", "max_p95_ms": "1500", "factor": "4", "min_requests": "20"},
    {"bucket": "week"},
    {"start": "yesterday"},
    {"min_requests": "many"},
]


def test_service_renderer_produces_exactly_tinybirds_sql() -> None:
    """The service renders pipes without tinybird-cli; for every node and parameter set the SQL is identical,
    and it refuses exactly what Tinybird refuses."""
    cases = [(pipe.name, node, params) for pipe in endpoint_pipes().values() for node in pipe.nodes for params in PARAMS]
    answers = official_render([{"sql": node.sql, "params": params} for _, node, params in cases])
    refused = 0
    for (name, node, params), answer in zip(cases, answers, strict=True):
        if "error" in answer:
            refused += 1
            with pytest.raises(TemplateError):
                render(node.sql, params)
        else:
            assert render(node.sql, params) == answer["sql"], (name, node.name, params)
    assert refused >= 3


def test_read_pipe_keeps_node_order(tmp_path: Path) -> None:
    path = tmp_path / "p.pipe"
    path.write_text("NODE a\nSQL >\n    SELECT 1\n\nNODE b\nSQL >\n    %\n    SELECT * FROM a\n\nTYPE endpoint\n")
    pipe = read_pipe(path)
    assert [(n.name, n.sql) for n in pipe.nodes] == [("a", "SELECT 1"), ("b", "%\nSELECT * FROM a")]
    assert pipe.type == "endpoint"
