"""The console script: serves over real TCP, reports bad configuration, stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from image_service.testing import RedisServer, free_port

ROOT = Path(__file__).resolve().parent.parent



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
    """`python -m image_service serve` serves a JPEG, then SIGTERM ends it with status 0. Its flags
    beat exported variables (a shell that loaded config/.env.example has a port of 8080)."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "image_service", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--log-format", "json"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "IMAGE_SERVICE_SERVER__LOG_LEVEL": "info", "IMAGE_SERVICE_SERVER__PORT": str(free_port()),
             "IMAGE_SERVICE_SERVER__HOST": "127.0.0.2"},
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


def test_a_host_that_does_not_resolve_is_named_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "image_service", "serve", "--host", "nonexistent.invalid", "--port", str(free_port())],
        cwd=tmp_path, capture_output=True, timeout=30,
    )
    assert result.returncode == 2 and b"Traceback" not in result.stderr
    assert b"server.host 'nonexistent.invalid' is no address to listen on" in result.stderr


def listening_sockets(port: int) -> int:
    """How many sockets listen on the loopback port (SO_REUSEPORT lets several)."""
    wanted = f"0100007F:{port:04X}"
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return sum(1 for line in lines if line.split()[1] == wanted and line.split()[3] == "0A")


def wait_until_both_workers_listen(port: int, process: subprocess.Popen[bytes]) -> None:
    wait_until_listening(port, process)
    end = time.monotonic() + 20
    while listening_sockets(port) < 2:
        assert time.monotonic() < end, "the second worker did not start listening"
        time.sleep(0.05)


def worker_pids(supervisor: int) -> list[int]:
    """The supervisor's spawned workers (not multiprocessing's resource tracker)."""
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    return [int(pid) for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def test_serve_with_two_workers_shares_the_port_and_stops_all_on_sigterm(tmp_path: Path) -> None:
    """Two worker processes answer on one port, share the Redis cache, and SIGTERM stops them all."""
    with RedisServer(tmp_path) as redis_server:
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "image_service", "serve", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "2", "--log-format", "json"],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, "IMAGE_SERVICE_CACHE__BACKEND": "redis",
                 "IMAGE_SERVICE_CACHE__REDIS_URL": redis_server.url},
        )
        try:
            wait_until_both_workers_listen(port, process)
            caches = []
            for _ in range(12):  # new connections: the kernel spreads them over both workers
                url = f"http://127.0.0.1:{port}/prompt/fox?width=64&height=48"
                with urllib.request.urlopen(url, timeout=10) as reply:
                    assert reply.status == 200 and reply.headers["Content-Type"] == "image/jpeg"
                    caches.append(reply.headers["X-Cache"])
            workers = worker_pids(process.pid)
            process.send_signal(signal.SIGTERM)
            stdout, stderr = process.communicate(timeout=30)
        finally:
            process.kill()
    assert process.returncode == 0, stderr.decode()
    assert caches.count("MISS") == 1, caches  # one generation for all workers: the cache is shared
    assert len(workers) == 2 and not any(Path(f"/proc/{pid}").exists() for pid in workers)
    assert stdout.count(b'"event":"request.completed"') == 12
    assert b"2 workers" in stderr and b"Traceback" not in stderr
    # Both workers' telemetry is in the shared local file, whole rows; each spooled in its own directory.
    rows = [json.loads(line) for line in (tmp_path / "var/events.ndjson").read_bytes().splitlines()]
    assert len({row["message_id"] for row in rows if row["event"] == "request.completed"}) == 12
    assert sorted(path.name for path in (tmp_path / "var/spool").iterdir()) == ["worker-0", "worker-1"]


def test_workers_stopping_keep_their_telemetry_when_the_sink_hangs(tmp_path: Path) -> None:
    """SIGTERM to the supervisor while Tinybird hangs: each worker spends tracking.shutdown_timeout
    flushing, then spools. The supervisor used to kill them first (its patience left the flush out),
    losing the rows, and exited 1 without a word."""
    port = free_port()
    with socket.socket() as silent_sink:
        silent_sink.bind(("127.0.0.1", 0))
        silent_sink.listen(64)  # accepts connections, never answers
        process = subprocess.Popen(
            [sys.executable, "-m", "image_service", "serve", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "2"],
            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env={**os.environ, "TINYBIRD_API_URL": f"http://127.0.0.1:{silent_sink.getsockname()[1]}",
                 "TINYBIRD_API_KEY": "p.test", "IMAGE_SERVICE_TRACKING__TIMEOUT": "30",
                 "IMAGE_SERVICE_TRACKING__SHUTDOWN_TIMEOUT": "11", "IMAGE_SERVICE_SERVER__SHUTDOWN_TIMEOUT": "0.5",
                 "IMAGE_SERVICE_MODERATION__IMAGE": "none"},
        )
        try:
            wait_until_both_workers_listen(port, process)
            for n in range(8):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/prompt/fox{n}?width=32&height=32", timeout=10) as reply:
                    assert reply.status == 200
            time.sleep(1.5)  # the first batch leaves, and hangs
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=60)
        finally:
            process.kill()
    assert process.returncode == 0, stderr.decode()
    spooled = [json.loads(line) for segment in (tmp_path / "var/spool").glob("worker-*/segment-*.ndjson")
               for line in segment.read_bytes().splitlines() if line.strip()]
    assert len({row["message_id"] for row in spooled if row["event"] == "request.completed"}) == 8


def test_workers_are_refused_with_a_gpu_worker_backend(tmp_path: Path) -> None:
    """Each GPU worker registered with one of the processes: the others answered its model 503 at random."""
    result = subprocess.run(
        [sys.executable, "-m", "image_service", "serve", "--workers", "2", "--port", str(free_port())],
        cwd=tmp_path, capture_output=True, timeout=30,
        env={**os.environ, "IMAGE_SERVICE_BACKENDS__GPU": '{"type": "workers"}',
             "IMAGE_SERVICE_MODELS__FLUX": '{"backend": "gpu", "fallback": ["embedded"]}'},
    )
    assert result.returncode == 2 and b"Traceback" not in result.stderr
    assert b"--workers 2 cannot serve the workers backend 'gpu'" in result.stderr


def test_workers_must_be_a_positive_number(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "image_service", "serve", "--workers", "0"],
        cwd=tmp_path, capture_output=True, timeout=30,
    )
    assert result.returncode == 2 and b"--workers" in result.stderr


def test_a_dead_worker_stops_the_others_and_the_supervisor_exits_1(tmp_path: Path) -> None:
    """A worker killed from outside is not silently lost: all stop, status 1, for a supervisor to restart."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "image_service", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "2"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        wait_until_listening(port, process)
        end = time.monotonic() + 20
        while len(worker_pids(process.pid)) < 2 or listening_sockets(port) < 2:
            assert time.monotonic() < end, "workers did not start"
            time.sleep(0.05)
        victim, survivor = worker_pids(process.pid)
        os.kill(victim, signal.SIGKILL)
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 1
    assert b"exited with status -9" in stderr and not Path(f"/proc/{survivor}").exists()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_port_in_use_is_a_message_not_a_traceback(tmp_path: Path, workers: str) -> None:
    """Status 2 with workers too, as for a single process: status 1 says a worker crashed, and a
    supervisor can be told not to restart on 2 (systemd's RestartPreventExitStatus)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "image_service", "serve", "--port", str(port), "--workers", workers], cwd=tmp_path,
            capture_output=True, text=True, timeout=60, check=False,
            env={**os.environ, "IMAGE_SERVICE_MODERATION__IMAGE": "none"},
        )
    assert done.returncode == 2 and "address already in use" in done.stderr and "Traceback" not in done.stderr
    assert "already stopping" not in done.stderr  # the supervisor's stop reaching a worker that never served
