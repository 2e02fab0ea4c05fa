"""The spool directory the workers of `serve --workers N` share, and the worker counts of successive runs."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from image_service.tracking.batch import Rows
from image_service.cli import main
from image_service.tracking.spool import INCOMING, Spool, SpoolInUse, in_use, share_out, worker_directory


def rows(tag: str, count: int) -> list[bytes]:
    return [orjson.dumps({"event_id": f"{tag}-{n:04d}"}) + b"\n" for n in range(count)]


def spooled(directory: Path, lines: list[bytes]) -> None:
    """`lines` left in the spool at `directory` by a process that has stopped."""
    spool = Spool(directory, 10**9, segment_bytes=2_000)
    spool.open()
    spool.append(Rows.of_lines(lines))
    spool.close()


def drained(directory: Path) -> list[bytes]:
    """Every row a process starting on the spool at `directory` sends."""
    spool = Spool(directory, 10**9)
    spool.open()
    sent: list[bytes] = []
    try:
        while batch := spool.read_batch(100, 10**6):
            sent += batch
            spool.commit(len(batch))
    finally:
        spool.close()
    return sent


def test_rows_spooled_by_more_workers_are_sent_by_fewer(tmp_path: Path) -> None:
    """Restarted with fewer workers, the service still sends what every old worker spooled, once."""
    root = tmp_path / "spool"
    written = []
    for index in range(3):
        lines = rows(f"w{index}", 60)
        spooled(worker_directory(root, index), lines)
        written += lines
    helper_file = rows("helper", 5)  # written by worker 2's encoder process while its sink was down
    (worker_directory(root, 2) / INCOMING).mkdir()
    (worker_directory(root, 2) / INCOMING / "4242-7.ndjson").write_bytes(b"".join(helper_file))
    (worker_directory(root, 2) / INCOMING / "4242-8.partial").write_bytes(b"".join(rows("unfinished", 2)))

    share_out(root, 2)
    sent = drained(worker_directory(root, 0)) + drained(worker_directory(root, 1))

    assert sorted(sent) == sorted(written + helper_file)
    assert not worker_directory(root, 2).exists()


def test_rows_spooled_without_workers_go_to_the_first_worker(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    lines = rows("single", 40)
    spooled(root, lines)
    share_out(root, 2)
    assert sorted(drained(worker_directory(root, 0))) == sorted(lines)
    assert drained(root) == [] and drained(worker_directory(root, 1)) == []


def test_a_single_process_sends_what_the_workers_spooled(tmp_path: Path) -> None:
    """`serve` without workers, or `events replay` of the directory, takes every worker's rows too."""
    root = tmp_path / "spool"
    written = rows("own", 10)
    spooled(root, written)
    for index in range(2):
        lines = rows(f"w{index}", 30)
        spooled(worker_directory(root, index), lines)
        written += lines
    assert sorted(drained(root)) == sorted(written)
    assert list(root.glob("worker-*")) == []


def test_a_spool_in_use_is_left_to_the_process_that_serves_it(tmp_path: Path) -> None:
    """A second process on the same spool is refused, and one gathering old spools skips a
    worker's spool while that worker runs: its segments are still being written."""
    root = tmp_path / "spool"
    serving = Spool(worker_directory(root, 0), 10**9, segment_bytes=2_000)
    serving.open()
    serving.append(Rows.of_lines(rows("live", 30)))
    try:
        with pytest.raises(SpoolInUse, match="in use by a running image-service"):
            Spool(worker_directory(root, 0), 10**9, own_if_busy=False).open()
        assert drained(root) == [] and in_use(root) == [worker_directory(root, 0)]
        serving.sync()
        assert list(worker_directory(root, 0).glob("segment-*.ndjson"))  # left where its writer is
    finally:
        serving.close()
    assert in_use(root) == [] and sorted(drained(root)) == sorted(rows("live", 30))


def test_a_segment_deleted_under_the_spool_is_skipped_and_counted(tmp_path: Path) -> None:
    """Deleted by hand while queued, a segment held up every one after it for ever."""
    spool = Spool(tmp_path, 10**9, segment_bytes=500)
    spool.open()
    try:
        spool.append(Rows.of_lines(rows("first", 10)))
        spool.append(Rows.of_lines(rows("second", 10)))
        spool.sync()
        segments = sorted(tmp_path.glob("segment-*.ndjson"))
        gone = segments[0].read_bytes().count(b"\n")
        segments[0].unlink()
        sent: list[bytes] = []
        while batch := spool.read_batch(100, 10**6):
            sent += batch
            spool.commit(len(batch))
    finally:
        spool.close()
    assert len(sent) == 20 - gone and (spool.stats.segments_missing, spool.stats.rows_missing) == (1, gone)


def test_replay_refuses_the_spool_of_a_running_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """It drained the segments the server was still writing into: their rows were lost, uncounted."""
    monkeypatch.setenv("TINYBIRD_API_KEY", "p.test")
    root = tmp_path / "spool"
    serving = Spool(worker_directory(root, 1), 10**9)
    serving.open()
    serving.append(Rows.of_lines(rows("live", 3)))
    try:
        assert main(["events", "replay", str(root)]) == 2
    finally:
        serving.close()
    assert f"{worker_directory(root, 1)} is the spool of a running image-service" in capsys.readouterr().err
    assert sorted(drained(worker_directory(root, 1))) == sorted(rows("live", 3))


def test_a_second_instance_on_a_spool_in_use_keeps_its_own_inside_it(tmp_path: Path) -> None:
    """Two servers started from one directory: the second spools apart, and what it leaves behind
    is drained by the next process to open the spool once it has stopped."""
    first, second = Spool(tmp_path, 10**9), Spool(tmp_path, 10**9)
    first.open()
    try:
        second.open()
        assert second.directory.parent == tmp_path and second.directory.name.startswith("worker-pid")
        second.append(Rows.of_lines(rows("second", 4)))
        second.close()
    finally:
        first.close()
    assert sorted(drained(tmp_path)) == sorted(rows("second", 4))


def test_a_server_keeps_its_spool_locked_after_draining_it(tmp_path: Path) -> None:
    """Draining the segment being written closed it, and the lock went with it: a replay or a second
    server could then take the spool from under the server."""
    spool = Spool(tmp_path, 10**9)
    spool.open()
    try:
        spool.append(Rows.of_lines(rows("live", 5)))
        while batch := spool.read_batch(100, 10**6):
            spool.commit(len(batch))
        assert in_use(tmp_path) == [tmp_path]
    finally:
        spool.close()
    assert in_use(tmp_path) == []


def test_a_spool_whose_start_failed_can_be_opened_again(tmp_path: Path) -> None:
    (tmp_path / INCOMING).mkdir()
    (tmp_path / INCOMING / "1-1.ndjson").mkdir()  # read_bytes on a directory fails the start
    failed = Spool(tmp_path, 10**9)
    with pytest.raises(OSError):
        failed.open()
    (tmp_path / INCOMING / "1-1.ndjson").rmdir()
    assert in_use(tmp_path) == [] and drained(tmp_path) == []


def test_a_second_instance_takes_over_what_a_stopped_one_left_beside_it(tmp_path: Path) -> None:
    """An instance that spooled beside the server and stopped: the next one to start beside it
    drains its rows, instead of leaving them until the server itself restarts."""
    serving = Spool(tmp_path, 10**9)
    serving.open()
    try:
        spooled(tmp_path / "worker-pid99999", rows("stopped", 6))
        assert sorted(drained(tmp_path)) == sorted(rows("stopped", 6))
    finally:
        serving.close()
