"""Telemetry across the process boundary: SIGTERM flushes or spools; `events replay` sends files."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import orjson
import pytest

from image_service.testing import free_port

from .events_api import EventsAPI
from .test_cli import wait_until_listening


def start_server(tmp_path: Path, url: str, **env: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "image_service", "serve", "--port", str(port), "--log-format", "json"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "TINYBIRD_API_URL": url, "TINYBIRD_API_KEY": "test-token",
             "IMAGE_SERVICE_TRACKING__MAX_WAIT": "30", "IMAGE_SERVICE_TRACKING__TIMEOUT": "1", **env},
    )
    wait_until_listening(port, process)
    return process, port


def get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
        return reply.headers["X-Request-Id"]


async def test_sigterm_flushes_the_last_requests_rows(events_api: tuple[EventsAPI, str], tmp_path: Path) -> None:
    """Rows still queued at SIGTERM (max_wait is 30 s here) reach the sink before the process exits."""
    api, url = events_api
    loop = asyncio.get_running_loop()
    process, port = await loop.run_in_executor(None, start_server, tmp_path, url)
    try:
        ids = [await loop.run_in_executor(None, get, port, f"/prompt/fox{n}?width=32&height=32") for n in range(3)]
        assert api.rows == []
        process.send_signal(signal.SIGTERM)
        code = await loop.run_in_executor(None, process.wait, 30)
    finally:
        process.kill()
        process.communicate()
    assert code == 0
    assert {r["id"] for r in api.rows if r["event"] == "request.completed"} == set(ids)
    assert len(api.rows) == 15


async def test_a_request_cut_short_by_shutdown_still_ends_with_a_terminal_row(
    events_api: tuple[EventsAPI, str], tmp_path: Path
) -> None:
    """SIGTERM waits server.shutdown_timeout for requests in flight; one still queued behind its
    tier's interval then is cancelled, and its rows say it was not answered."""
    api, url = events_api
    loop = asyncio.get_running_loop()
    process, port = await loop.run_in_executor(
        None, lambda: start_server(tmp_path, url, IMAGE_SERVICE_SERVER__SHUTDOWN_TIMEOUT="1")
    )
    try:
        first = await loop.run_in_executor(None, get, port, "/prompt/first?width=32&height=32")
        queued = loop.run_in_executor(None, get, port, "/prompt/second?width=32&height=32")
        await asyncio.sleep(0.5)  # the anonymous tier makes the second wait ~5 s for its slot
        process.send_signal(signal.SIGTERM)
        assert await loop.run_in_executor(None, process.wait, 30) == 0
        with pytest.raises(OSError):
            await queued
    finally:
        process.kill()
        process.communicate()
    terminals = {row["id"]: row for row in api.rows if row["event"] == "request.completed"}
    (cut,) = set(terminals) - {first}
    assert (terminals[cut]["http_status"], terminals[cut]["error"], terminals[cut]["status"]) == (503, "cancelled", "error")
    assert [row["event"] for row in api.rows if row["id"] == cut] == ["request.received", "cache.lookup", "request.completed"]


async def test_a_long_prompt_in_a_non_latin_script_is_served_and_tracked(
    events_api: tuple[EventsAPI, str], tmp_path: Path
) -> None:
    """1,000 CJK characters are a legal prompt (the limit is 2,000) and 9,000 bytes percent-encoded:
    past the 8,190 bytes aiohttp's parser takes by default."""
    api, url = events_api
    loop = asyncio.get_running_loop()
    process, port = await loop.run_in_executor(None, start_server, tmp_path, url)
    try:
        path = "/prompt/" + urllib.parse.quote("猫" * 1000) + "?width=32&height=32"
        request_id = await loop.run_in_executor(None, get, port, path)
        process.send_signal(signal.SIGTERM)
        assert await loop.run_in_executor(None, process.wait, 30) == 0
    finally:
        process.kill()
        process.communicate()
    (terminal,) = [row for row in api.rows if row["id"] == request_id and row["event"] == "request.completed"]
    assert terminal["http_status"] == 200 and terminal["prompt"].startswith("猫猫猫")


async def test_a_request_the_http_parser_refuses_is_logged_without_its_secrets(
    events_api: tuple[EventsAPI, str], tmp_path: Path
) -> None:
    """aiohttp answers 400 itself to a request line it cannot parse; its own log would quote the
    line (prompt, token) and the client's address."""
    _, url = events_api
    loop = asyncio.get_running_loop()
    process, port = await loop.run_in_executor(None, start_server, tmp_path, url)
    try:
        # From an address of its own: the server's banner names 127.0.0.1.
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.2", 0))
        writer.write(b"GET /prompt/my secret plan?private=true&token=sk_live_0123456789 HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await reader.read()
        writer.close()
        process.send_signal(signal.SIGTERM)
        assert await loop.run_in_executor(None, process.wait, 30) == 0
    finally:
        process.kill()
        out, err = process.communicate()
    assert answer.split(b"\r\n", 1)[0].split()[1] == b"400"
    logs = (out + err).decode()
    assert '"event":"http.server_error"' in logs
    for secret in ("secret plan", "sk_live", "127.0.0.2"):
        assert secret not in logs, secret


async def test_a_second_sigterm_does_not_cut_short_the_first_ones_shutdown(
    events_api: tuple[EventsAPI, str], tmp_path: Path
) -> None:
    """A stop sent to a process group reaches a worker twice (its own, then the supervisor's):
    the request in flight still gets its answer and its rows."""
    api, url = events_api
    loop = asyncio.get_running_loop()
    process, port = await loop.run_in_executor(None, start_server, tmp_path, url)
    try:
        await loop.run_in_executor(None, get, port, "/prompt/first?width=32&height=32")
        queued = loop.run_in_executor(None, get, port, "/prompt/second?width=32&height=32")
        await asyncio.sleep(0.5)  # the anonymous tier holds the second ~5 s for its slot
        process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        process.send_signal(signal.SIGTERM)
        second = await queued
        assert await loop.run_in_executor(None, process.wait, 30) == 0
    finally:
        process.kill()
        process.communicate()
    assert [row["http_status"] for row in api.rows if row["id"] == second and row["event"] == "request.completed"] == [200]


async def test_sigterm_with_the_sink_down_spools_to_disk_and_replay_sends_it(
    events_api: tuple[EventsAPI, str], tmp_path: Path
) -> None:
    """Nothing is lost: the spool holds the rows and `events replay` delivers them later."""
    api, url = events_api
    api.down = True
    loop = asyncio.get_running_loop()
    process, port = await loop.run_in_executor(
        None, lambda: start_server(tmp_path, url, IMAGE_SERVICE_TRACKING__SHUTDOWN_TIMEOUT="1")
    )
    try:
        request_id = await loop.run_in_executor(None, get, port, "/prompt/fox?width=32&height=32")
        process.send_signal(signal.SIGTERM)
        assert await loop.run_in_executor(None, process.wait, 30) == 0
    finally:
        process.kill()
        process.communicate()
    spool = tmp_path / "var" / "spool"
    spooled = [orjson.loads(line) for path in sorted(spool.iterdir()) for line in path.read_bytes().splitlines()]
    assert {r["id"] for r in spooled} == {request_id} and len(spooled) == 5 and api.rows == []

    api.down = False
    result = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "image_service", "events", "replay", str(spool), cwd=tmp_path,
        env={**os.environ, "TINYBIRD_API_URL": url, "TINYBIRD_API_KEY": "test-token"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await result.communicate()
    assert result.returncode == 0, err.decode()
    assert b"replayed 5 rows" in out
    assert {r["event_id"] for r in api.rows} == {r["event_id"] for r in spooled}
    assert list(spool.iterdir()) == []


async def _replay(path: Path, url: str, cwd: Path) -> tuple[int, str, str]:
    result = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "image_service", "events", "replay", str(path), cwd=cwd,
        env={**os.environ, "TINYBIRD_API_URL": url, "TINYBIRD_API_KEY": "test-token"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await result.communicate()
    assert result.returncode is not None
    return result.returncode, out.decode(), err.decode()


async def test_replay_of_a_local_ndjson_file_leaves_the_file(events_api: tuple[EventsAPI, str], tmp_path: Path) -> None:
    """Rows only: blank lines and a line torn by a crash are skipped and counted, not sent."""
    api, url = events_api
    source = tmp_path / "events.ndjson"
    rows = [orjson.dumps({"event_id": f"e{n}", "n": n}) for n in range(7)]
    source.write_bytes(b"\n".join([*rows[:3], b"", *rows[3:], b"", rows[0][:9]]))
    code, out, _ = await _replay(source, url, tmp_path)
    assert code == 0 and [r["n"] for r in api.rows] == list(range(7))
    assert "replayed 7 rows" in out and "3 lines skipped" in out
    assert source.read_bytes().count(b"\n") == 9


async def test_replay_of_a_directory_that_is_not_a_spool_says_so(events_api: tuple[EventsAPI, str], tmp_path: Path) -> None:
    """var/ holds events.ndjson and spool/: pointing at it is a mistake, not a complete replay."""
    _, url = events_api
    (tmp_path / "var" / "spool").mkdir(parents=True)
    (tmp_path / "var" / "events.ndjson").write_text("{}\n")
    code, _, err = await _replay(tmp_path / "var", url, tmp_path)
    assert code == 2 and "holds no spool segments" in err


async def test_replay_takes_a_spool_whose_rows_wait_in_its_incoming_directory(
    events_api: tuple[EventsAPI, str], tmp_path: Path
) -> None:
    """Rows an encoder process wrote but its forwarder never adopted are the spool's too."""
    api, url = events_api
    incoming = tmp_path / "spool" / "worker-0" / "incoming"
    incoming.mkdir(parents=True)
    (incoming / "frame-1.ndjson").write_bytes(b"".join(orjson.dumps({"event_id": f"e{n}"}) + b"\n" for n in range(2)))
    code, out, err = await _replay(tmp_path / "spool", url, tmp_path)
    assert code == 0, err
    assert "replayed 2 rows" in out and {r["event_id"] for r in api.rows} == {"e0", "e1"}


async def test_replay_without_a_key_explains_what_is_missing(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TINYBIRD_")}
    (tmp_path / "x.ndjson").write_text("{}\n")
    result = subprocess.run([sys.executable, "-m", "image_service", "events", "replay", "x.ndjson"],
                            cwd=tmp_path, env=env, capture_output=True, timeout=30)
    assert result.returncode == 2 and b"TINYBIRD_API_KEY" in result.stderr
