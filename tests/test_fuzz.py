"""Property: no path or query string makes the service answer 5xx."""

from __future__ import annotations

from urllib.parse import quote

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

PARAMS = ["model", "width", "height", "seed", "nologo", "enhance", "private", "nofeed", "safe",
          "negative_prompt", "quality", "image", "referrer", "token", "zzz"]
values = st.one_of(
    st.text(max_size=30),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.sampled_from(["true", "-1", "1e400", "nan", "procedural", "hd", "http://x/y.png|ftp://z", "1.5"]),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    prompt=st.text(max_size=120),
    query=st.dictionaries(st.sampled_from(PARAMS), values, max_size=6),
)
async def test_no_input_yields_a_server_error(client, prompt: str, query: dict[str, str]) -> None:
    if "width" in query or "height" in query:
        query.setdefault("width", "32")
        query.setdefault("height", "32")
    else:
        query.update(width="32", height="32")
    qs = "&".join(f"{quote(k)}={quote(v, safe='')}" for k, v in query.items())
    response = await client.get(f"/prompt/{quote(prompt, safe='')}?{qs}")
    assert response.status < 500, await response.text()
    if response.status >= 400:
        body = await response.json()
        assert {"error", "message", "requestId", "requestParameters"} <= body.keys()
