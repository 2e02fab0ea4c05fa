"""The console script: serves over real TCP, reports bad configuration, stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_listening(port: int, process: subprocess.Popen[bytes], deadline: float = 20.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("server did not start")


def test_serve_answers_and_exits_cleanly_on_sigterm(tmp_path: Path) -> None:
    """`python -m image_service serve` serves a JPEG, then SIGTERM ends it with status 0."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "image_service", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--log-format", "json"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "IMAGE_SERVICE_SERVER__LOG_LEVEL": "info"},
    )
    try:
        wait_until_listening(port, process)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/prompt/fox?width=64&height=48", timeout=10) as reply:
            assert reply.status == 200 and reply.headers["Content-Type"] == "image/jpeg"
        process.send_signal(signal.SIGTERM)
        stdout, _ = process.communicate(timeout=20)
    finally:
        process.kill()
    assert process.returncode == 0
    assert b'"event":"request.completed"' in stdout and b'"status":200' in stdout


def test_invalid_configuration_exits_2_naming_the_key(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "image_service", "serve"],
        cwd=tmp_path, capture_output=True, timeout=30,
        env={**os.environ, "IMAGE_SERVICE_CACHE__MAX_BYTES": "lots"},
    )
    assert result.returncode == 2
    assert b"cache.max_bytes" in result.stderr and b"Traceback" not in result.stderr
