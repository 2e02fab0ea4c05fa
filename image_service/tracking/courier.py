"""The encoder process's courier: the first delivery attempt of the rows it has just built.

While the sink is healthy, the rows of a frame need not travel back to the server: the encoder
process gzips them and posts them to the Events API itself, from a thread of its own, and the
server only hears how each delivery went (a `Settlement`). Anything but a 2xx settles with the
rows, byte for byte (same event ids): the helper writes them into the spool for the forwarder's
own calls to drain (with retries and backoff, behind the breaker), or, after a 413, hands them back
to be split. The courier never retries.

Parcels waiting together leave in one call, within the forwarder's row and byte limits; calls
start at most `max_per_second` times a second.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import orjson

from .contract import DETAIL_BYTES, Endpoint, Outcome, SendResult, classify, gzip, retry_after

ABANDONED = "abandoned"
# Errors that mean a kept-alive connection was closed before it carried the request: the call is
# made again, once, on a fresh connection.
STALE_CONNECTION = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)
# How often the deadline looks again for the socket of a call still connecting when it passed.
CONNECTING_POLL = 0.05


@dataclass(slots=True)
class Parcel:
    ticket: int
    rows: bytes
    count: int


@dataclass(slots=True)
class Settlement:
    """How one parcel's delivery went; `rows` holds its rows unless the sink took them, or, once
    `spooled`, the helper wrote them into the spool."""

    ticket: int
    count: int
    status: int | None = None
    error: str = ""
    retry_after: float | None = None
    body: bytes = b""
    rows: bytes = b""
    spooled: bool = False

    def result(self) -> SendResult:
        if self.status is None:
            return SendResult(Outcome.RETRY, detail=self.error)
        return classify(self.status, self.body, self.retry_after)


@dataclass(frozen=True, slots=True)
class CourierSettings:
    endpoint: Endpoint
    max_per_second: float
    batch_rows: int
    batch_bytes: int

    def to_json(self) -> bytes:
        endpoint = self.endpoint
        return orjson.dumps({
            "api_url": endpoint.api_url, "key": endpoint.key, "datasource": endpoint.datasource,
            "timeout": endpoint.timeout, "max_per_second": self.max_per_second, "batch_rows": self.batch_rows,
            "batch_bytes": self.batch_bytes,
        })

    @classmethod
    def from_json(cls, data: bytes) -> CourierSettings:
        fields = orjson.loads(data)
        endpoint = Endpoint(fields["api_url"], fields["key"], fields["datasource"], fields["timeout"])
        return cls(endpoint, fields["max_per_second"], fields["batch_rows"], fields["batch_bytes"])

    @property
    def capacity(self) -> int:
        """Rows that may wait for the courier; beyond that frames come back to the server as rows."""
        return 2 * self.batch_rows


class _Deadline:
    """Ends a call that outlives the endpoint's timeout. http.client's timeout bounds each socket
    operation, not the call: a sink answering a byte at a time could hold the courier, and every
    row behind it, for as long as it liked. One thread watches the call under way and, once its
    deadline has passed, shuts its socket down, which ends the blocked read or write."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._connection: http.client.HTTPConnection | None = None
        # When the call under way must end; None while no call is watched (or it has been ended).
        self._at: float | None = None
        self._thread: threading.Thread | None = None
        self.passed = False

    @contextlib.contextmanager
    def watching(self, connection: http.client.HTTPConnection, seconds: float) -> Iterator[None]:
        with self._changed:
            self._connection, self._at, self.passed = connection, time.monotonic() + seconds, False
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="telemetry-courier-deadline", daemon=True)
                self._thread.start()
            self._changed.notify_all()
        try:
            yield
        finally:
            with self._changed:
                self._connection, self._at = None, None

    def _watch(self) -> None:
        with self._changed:
            while True:
                if self._at is None or (remaining := self._at - time.monotonic()) > 0:
                    self._changed.wait(None if self._at is None else remaining)
                    continue
                self.passed = True
                sock = self._connection.sock if self._connection is not None else None
                if sock is None:
                    self._at = time.monotonic() + CONNECTING_POLL
                    continue
                self._at = None
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


class Courier:
    def __init__(self, settings: CourierSettings) -> None:
        self._settings = settings
        parts = urlsplit(settings.endpoint.url_with_query)
        self._https = parts.scheme == "https"
        self._host, self._port = parts.hostname or "localhost", parts.port
        self._target = f"{parts.path}?{parts.query}"
        self._waiting: deque[Parcel] = deque()
        self._waiting_rows = 0
        self._in_flight: list[Parcel] = []
        self._abandoned: set[int] = set()
        self._settled: list[Settlement] = []
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._connection: http.client.HTTPConnection | None = None
        self._deadline = _Deadline()
        self._last_call = float("-inf")

    def offer(self, parcel: Parcel) -> bool:
        """Take the parcel for delivery; False when too many rows already wait."""
        with self._changed:
            if self._waiting_rows + parcel.count > self._settings.capacity and self._waiting:
                return False
            self._waiting.append(parcel)
            self._waiting_rows += parcel.count
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="telemetry-courier", daemon=True)
                self._thread.start()
            self._changed.notify_all()
        return True

    def collect(self, wait: float = 0.0, abandon: bool = False) -> list[Settlement]:
        """Settlements since the last call. Waits up to `wait` seconds for every parcel to settle;
        with `abandon`, what is still unsettled then comes back as ABANDONED, with its rows."""
        deadline = time.monotonic() + wait
        with self._changed:
            while (self._waiting or self._in_flight) and (remaining := deadline - time.monotonic()) > 0:
                self._changed.wait(remaining)
            if abandon:
                for parcel in [*self._in_flight, *self._waiting]:
                    self._abandoned.add(parcel.ticket)
                    self._settled.append(Settlement(parcel.ticket, parcel.count, error=ABANDONED, rows=parcel.rows))
                self._waiting.clear()
                self._waiting_rows = 0
            settled, self._settled = self._settled, []
        return settled

    def _next_call(self) -> list[Parcel]:
        with self._changed:
            while not self._waiting:
                self._changed.wait()
            batch = [self._waiting.popleft()]
            rows, size = batch[0].count, len(batch[0].rows)
            while self._waiting:
                parcel = self._waiting[0]
                if rows + parcel.count > self._settings.batch_rows or size + len(parcel.rows) > self._settings.batch_bytes:
                    break
                batch.append(self._waiting.popleft())
                rows, size = rows + parcel.count, size + len(parcel.rows)
            self._waiting_rows -= rows
            self._in_flight = batch
            return batch

    def _run(self) -> None:
        while True:
            batch = self._next_call()
            pause = self._last_call + 1.0 / self._settings.max_per_second - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            with self._changed:
                # Parcels abandoned during the pause have gone back to the server: not posted.
                batch = self._in_flight = [parcel for parcel in batch if not self._forget_abandoned(parcel)]
            if not batch:
                continue
            self._last_call = time.monotonic()
            try:
                status, body, wait, error = self._post(gzip([parcel.rows for parcel in batch]))
            except Exception as exc:
                # Whatever went wrong, the parcels come back; only the error's type is told, as its
                # text could quote the key (an invalid header value, say).
                self._disconnect()
                status, body, wait, error = None, b"", None, type(exc).__name__
            delivered = status in (200, 202)
            with self._changed:
                self._in_flight = []
                for index, parcel in enumerate(batch):
                    if self._forget_abandoned(parcel):
                        continue
                    # The answer's body (quarantined rows, error detail) is the call's: given once.
                    self._settled.append(Settlement(
                        parcel.ticket, parcel.count, status, error, wait,
                        body[:DETAIL_BYTES] if index == 0 else b"",
                        b"" if delivered else parcel.rows,
                    ))
                self._changed.notify_all()

    def _forget_abandoned(self, parcel: Parcel) -> bool:
        """Whether the parcel was abandoned (its rows already went back); called with the lock held."""
        if parcel.ticket in self._abandoned:
            self._abandoned.discard(parcel.ticket)
            return True
        return False

    def _post(self, body: bytes, again: bool = True, seconds: float | None = None) -> tuple[int | None, bytes, float | None, str]:
        """(status, answer, retry-after, error): status None after a transport error or the timeout.
        A call made again on a fresh connection has what is left of the first one's `seconds`."""
        seconds = self._settings.endpoint.timeout if seconds is None else seconds
        started = time.monotonic()
        reused = self._connection is not None
        try:
            connection = self._connection = self._connection or self._connect()
            with self._deadline.watching(connection, seconds):
                connection.request("POST", self._target, body=body, headers=self._settings.endpoint.headers)
                reply = connection.getresponse()
                answer = reply.read()
            if reply.will_close or self._deadline.passed:
                self._disconnect()
            return reply.status, answer, retry_after(reply.headers), ""
        except (OSError, http.client.HTTPException) as exc:
            self._disconnect()
            if self._deadline.passed:
                return None, b"", None, TimeoutError.__name__
            if again and reused and isinstance(exc, STALE_CONNECTION):
                return self._post(body, again=False, seconds=seconds - (time.monotonic() - started))
            return None, b"", None, type(exc).__name__

    def _connect(self) -> http.client.HTTPConnection:
        timeout = self._settings.endpoint.timeout
        if self._https:
            return http.client.HTTPSConnection(self._host, self._port, timeout=timeout, context=ssl.create_default_context())
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout)

    def _disconnect(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
