"""A local stand-in for Tinybird's Events API that enforces its documented contract.

Contract (reference/tinybird.md): `POST /v0/events?name=DS[&wait=true]`, `Authorization: Bearer`
(403 when wrong), `name` required (400), NDJSON parsed line by line, gzip accepted, 10 MB per request
(413), answers `{successful_rows, quarantined_rows}` (200 with wait=true, else 202). Faults can be
scripted (`script`) or drawn at a seeded rate (`failure_rate`): 429 with Retry-After, 5xx, delays
past the client's timeout, connection resets, and answers trickled a byte at a time (no read ever
waits long, the whole answer takes longer than the client's timeout).

Run standalone for benchmarks: `python -m tests.events_api PORT TOKEN`.
"""

from __future__ import annotations

import asyncio
import gzip
import random
import sys
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

TEN_MB = 10 * 1024 * 1024


@dataclass(frozen=True)
class Fault:
    status: int | None = None
    retry_after: str | None = None
    delay: float = 0.0
    reset: bool = False
    # Seconds between the answer's bytes, after its headers.
    trickle: float = 0.0


@dataclass
class EventsAPI:
    token: str = "test-token"
    max_body: int = TEN_MB
    failure_rate: float = 0.0
    rng: random.Random = field(default_factory=lambda: random.Random(7))
    random_faults: tuple[Fault, ...] = (
        Fault(429, retry_after="0.05"), Fault(503), Fault(500), Fault(reset=True), Fault(delay=1.0),
    )
    columns: dict[str, str] | None = None
    down: bool = False
    script: deque[Fault] = field(default_factory=deque)
    rows: list[dict[str, Any]] = field(default_factory=list)
    # Standalone (benchmarks) counts rows instead of keeping them: millions of kept rows would
    # turn the stand-in's garbage collector into a CPU hog beside the server being measured, and
    # parsing them would take CPU that, here, the server's other core shares with it.
    keep_rows: bool = True
    requests: int = 0
    statuses: list[int] = field(default_factory=list)
    datasources: set[str] = field(default_factory=set)
    encodings: set[str] = field(default_factory=set)
    released: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v0/events", self.handle)
        return app

    def _quarantine(self, row: Any) -> bool:
        if not isinstance(row, dict):
            return True
        if self.columns is None:
            return False
        return any(name not in row and not kind.startswith("Nullable") for name, kind in self.columns.items())

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        fault = self.script.popleft() if self.script else None
        if fault is None and self.failure_rate and self.rng.random() < self.failure_rate:
            fault = self.rng.choice(self.random_faults)
        if self.down:
            fault = Fault(503)
        if fault is not None:
            if fault.delay:
                try:
                    await asyncio.wait_for(self.released.wait(), fault.delay)
                except TimeoutError:
                    pass
            if fault.trickle:
                return await self._trickle(request, fault.trickle)
            if fault.reset:
                assert request.transport is not None
                request.transport.abort()
                self.statuses.append(0)
                return web.Response(status=500)
            if fault.status is not None:
                headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
                self.statuses.append(fault.status)
                return web.json_response({"error": "injected"}, status=fault.status, headers=headers)
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            self.statuses.append(403)
            return web.json_response({"error": "invalid token"}, status=403)
        name = request.query.get("name")
        if not name:
            self.statuses.append(400)
            return web.json_response({"error": "name is required"}, status=400)
        body = await request.read()
        self.encodings.add(request.headers.get("Content-Encoding", "identity"))
        if body[:2] == b"\x1f\x8b":  # aiohttp's parser usually inflates gzip bodies already
            body = gzip.decompress(body)
        if len(body) > self.max_body:
            self.statuses.append(413)
            return web.json_response({"error": "too large"}, status=413)
        successful = quarantined = 0
        if not self.keep_rows:
            # Standalone (benchmarks): Tinybird parses rows on its own machines, so the stand-in,
            # on the server's machine, only counts them. Tests keep, and so parse, every row.
            successful = body.count(b"\n")
        for line in body.splitlines() if self.keep_rows else ():
            if not line.strip():
                continue
            try:
                row = orjson.loads(line)
            except orjson.JSONDecodeError:
                quarantined += 1
                continue
            if self._quarantine(row):
                quarantined += 1
            else:
                if self.keep_rows:
                    self.rows.append(row)
                successful += 1
        self.datasources.add(name)
        status = 200 if request.query.get("wait") == "true" else 202
        self.statuses.append(status)
        return web.json_response({"successful_rows": successful, "quarantined_rows": quarantined}, status=status)

    async def _trickle(self, request: web.Request, pause: float) -> web.StreamResponse:
        """Headers at once, then a 200's body a byte per `pause` seconds, never finishing in time."""
        self.statuses.append(200)
        body = orjson.dumps({"successful_rows": 0, "quarantined_rows": 0, "padding": " " * 1000})
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        response.content_length = len(body)
        await response.prepare(request)
        for index in range(len(body)):
            await response.write(body[index:index + 1])
            await asyncio.sleep(pause)
        await response.write_eof()
        return response


def main() -> None:
    port, token = int(sys.argv[1]), sys.argv[2]
    delay = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    api = EventsAPI(token=token, keep_rows=False)
    if delay:
        api.failure_rate, api.random_faults = 1.0, (Fault(delay=delay),)
    web.run_app(api.app(), host="127.0.0.1", port=port, print=None, access_log=None)


if __name__ == "__main__":
    main()
