"""The service's own template renderer under concurrency (its output is compared with Tinybird's in test_pipes)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from image_service.analytics.template import render


def test_pipes_render_safely_from_several_threads_at_once() -> None:
    """The dashboard renders every pipe in the CPU pool concurrently; the results must not change."""
    sql = "%\nSELECT 1 {% if defined(model) %} WHERE model = {{ String(model) }} {% end %}"
    expected = render(sql, {"model": "flux"})
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda n: render(sql + f" -- {n % 50}", {"model": "flux"}), range(2000)))
    assert all(result.startswith(expected) for result in results)
