"""GPU workers: authenticated registration, heartbeat, least-busy selection, retry, safety flags."""

from __future__ import annotations

import asyncio
import io
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
import pytest
from PIL import Image

from image_service.app import FEED, WORKERS
from image_service.config import WorkerSettings, load_settings
from image_service.errors import Forbidden, Unauthorized
from image_service.generation import GeneratedImage
from image_service.generation.base import BackendError, NoCapacity
from image_service.generation.transport import decode_image
from image_service.generation.workers import WorkerRegistry
from image_service.imaging import EXIF_IFD, EXIF_USER_COMMENT, USER_COMMENT_ASCII
from image_service.moderation import ClassifierModerator, Findings, PassThroughModerator, Thresholds, Verdict
from image_service.params import ImageParams

from ..conftest import ClientFactory, make_settings
from .conftest import Serve, base_url, fast
from .servers import GPUWorker, png

SECRET = "worker-secret-123"
AUTH = {"Authorization": f"Bearer {SECRET}"}


class NothingFound:
    """Our classifiers, seeing nothing in the image."""

    def analyse(self, image: Image.Image) -> Findings:
        return Findings(models={"test": "1"})


class RecordingModerator(PassThroughModerator):
    """Pass-through that remembers the backend flags it was shown."""

    def __init__(self) -> None:
        self.flags: list[dict[str, float]] = []

    async def check_image(self, generated: GeneratedImage, params: ImageParams) -> Verdict:
        self.flags.append(generated.backend_flags)
        return self.VERDICT


@pytest.fixture(autouse=True)
def worker_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGE_SERVICE_WORKER_SECRET", SECRET)


def worker_settings(**spec: Any) -> Any:
    return make_settings(
        backends={"flux": fast(type="workers", steps=6, **spec)},
        models={"flux": {"backend": "flux", "max_side": 1024, "default_side": 64}},
    )


async def register(client: Any, url: str, **extra: Any) -> None:
    response = await client.post("/register", json={"url": url, "type": "flux", **extra}, headers=AUTH)
    assert response.status == 200, await response.text()


class TestRegistration:
    async def test_registration_without_the_secret_is_refused(self, make_client: ClientFactory) -> None:
        """No credentials → 401 JSON, wrong secret → 403 JSON; the worker is not added."""
        client = await make_client(worker_settings())
        missing = await client.post("/register", json={"url": "http://127.0.0.1:9/", "type": "flux"})
        wrong = await client.post("/register", json={"url": "http://127.0.0.1:9/", "type": "flux"},
                                  headers={"Authorization": "Bearer nope"})
        assert (missing.status, (await missing.json())["error"]) == (401, "unauthorized")
        assert (wrong.status, (await wrong.json())["error"]) == (403, "forbidden")
        assert client.app[WORKERS].snapshot() == []

    async def test_listing_workers_is_for_operators_only(self, make_client: ClientFactory) -> None:
        client = await make_client(worker_settings())
        await register(client, "http://127.0.0.1:9")
        assert (await client.get("/register")).status == 401
        listing = await (await client.get("/register", headers=AUTH)).json()
        assert [(w["url"], w["type"], w["busy"], w["active"]) for w in listing] == [("http://127.0.0.1:9", "flux", 0, True)]

    async def test_registration_is_refused_when_no_secret_is_configured(
        self, make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.delenv("IMAGE_SERVICE_WORKER_SECRET")
        client = await make_client(worker_settings())
        response = await client.post("/register", json={"url": "http://127.0.0.1:9", "type": "flux"}, headers=AUTH)
        assert response.status == 403 and "disabled" in (await response.json())["message"]

    @pytest.mark.parametrize("body", [b"not json", b'{"type": "flux"}', b'{"url": "ftp://x", "type": "flux"}',
                                      b'{"url": "http://127.0.0.1:9", "type": ""}', b"[1]",
                                      b'{"url": "http://user:pw@127.0.0.1:9", "type": "flux"}',
                                      b'{"url": "http://127.0.0.1:9/?wtoken=WURLSECRET", "type": "flux"}',
                                      b'{"url": "http://127.0.0.1:9/#k=WURLSECRET", "type": "flux"}'])
    async def test_malformed_registration_is_400(self, make_client: ClientFactory, body: bytes) -> None:
        """Credentials (or a query or fragment, where a token hides) in a worker URL are refused
        too: the URL is logged and listed."""
        client = await make_client(worker_settings())
        response = await client.post("/register", data=body, headers=AUTH)
        assert response.status == 400 and (await response.json())["error"] == "bad_request"

    @pytest.mark.parametrize("encoding", ["gzip", "deflate"])
    async def test_a_body_that_does_not_decode_is_400(self, make_client: ClientFactory, encoding: str) -> None:
        client = await make_client(worker_settings())
        response = await client.post("/register", data=b"not compressed", headers={**AUTH, "Content-Encoding": encoding})
        assert response.status == 400 and (await response.json())["error"] == "bad_request"


class TestRegistry:
    def test_secret_check_distinguishes_missing_and_wrong(self) -> None:
        registry = WorkerRegistry(WorkerSettings(), secret=SECRET)
        registry.authorize(f"Bearer {SECRET}")
        with pytest.raises(Unauthorized):
            registry.authorize(None)
        with pytest.raises(Forbidden):
            registry.authorize(f"Basic {SECRET}")
        with pytest.raises(Forbidden):  # a header byte that is not UTF-8, as aiohttp decodes it
            registry.authorize("Bearer worker-\udcffsecret")

    def test_one_address_written_two_ways_is_one_worker(self) -> None:
        registry = WorkerRegistry(WorkerSettings(), secret=SECRET)
        for url in ("http://GPU.example:8000", "http://gpu.example:8000/.", "http://gpu.example:08000/",
                    "http://gpu.example.:8000"):
            registry.register({"url": url, "type": "flux"})
        assert [worker["url"] for worker in registry.snapshot()] == ["http://gpu.example:8000"]

    async def test_worker_goes_inactive_after_the_heartbeat_timeout(self) -> None:
        """Silent for more than 45 s: no more requests; a heartbeat brings it back."""
        now = [1000.0]
        registry = WorkerRegistry(WorkerSettings(), clock=lambda: now[0], secret=SECRET)
        registry.register({"url": "http://127.0.0.1:9", "type": "flux"})
        now[0] += 44.0
        assert [w.url for w in registry.active("flux")] == ["http://127.0.0.1:9"]
        now[0] += 2.0
        assert registry.active("flux") == []
        with pytest.raises(NoCapacity):
            await registry.acquire("flux")
        registry.register({"url": "http://127.0.0.1:9", "type": "flux"})
        assert (await registry.acquire("flux")).url == "http://127.0.0.1:9"

    async def test_least_busy_selection_respects_concurrency(self) -> None:
        """A worker allowed 2 concurrent jobs takes a second one before a full worker does; none exceeds its cap."""
        registry = WorkerRegistry(WorkerSettings(), secret=SECRET)
        registry.register({"url": "http://127.0.0.1:1", "type": "flux", "concurrency": 1})
        registry.register({"url": "http://127.0.0.1:2", "type": "flux", "concurrency": 2})
        picked = [(await registry.acquire("flux")).url for _ in range(3)]
        assert sorted(picked) == ["http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:2"]
        waiting = asyncio.ensure_future(registry.acquire("flux"))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        (one,) = [w for w in registry.active("flux") if w.url.endswith(":1")]
        registry.release(one, ok=True)
        assert (await asyncio.wait_for(waiting, 1)).url == "http://127.0.0.1:1"


class TestWorkerBackend:
    async def test_sequential_requests_alternate_between_idle_workers(
        self, serve: Serve, make_client: ClientFactory
    ) -> None:
        """Equally idle workers take turns (least recently used), so one is not worn out while another idles."""
        workers = [GPUWorker(), GPUWorker()]
        client = await make_client(worker_settings())
        for worker in workers:
            await register(client, base_url(await serve(worker)), concurrency=4)
        for i in range(4):
            assert (await client.get(f"/prompt/bird{i}?model=flux&width=32&height=32")).status == 200
        assert [len(w.requests) for w in workers] == [2, 2]

    async def test_worker_receives_the_reference_payload_and_its_flags_reach_moderation(
        self, serve: Serve, make_client: ClientFactory
    ) -> None:
        worker = GPUWorker()
        worker.nsfw, worker.scores = True, {"0": 0.12, "1": -0.3}
        moderator = RecordingModerator()
        client = await make_client(worker_settings(), moderator=moderator)
        await register(client, base_url(await serve(worker)))
        response = await client.get("/prompt/a%20cat?model=flux&width=64&height=48&seed=5&negative_prompt=ugly")
        assert response.status == 200
        assert Image.open(io.BytesIO(await response.read())).size == (64, 48)
        assert worker.requests == [{"prompts": ["a cat"], "width": 64, "height": 48, "seed": 5,
                                    "negative_prompt": "ugly", "steps": 6}]
        assert moderator.flags == [{"nsfw": 1.0, "concept.0": 0.12, "concept.1": -0.3}]

    async def test_an_image_the_workers_checker_flags_is_treated_as_mature(
        self, serve: Serve, make_client: ClientFactory
    ) -> None:
        """Where our own classifiers see nothing, the worker's has_nsfw_concept still counts: refused
        under safe=true, otherwise served without a logo (EXIF says so) and kept out of the feed."""
        worker = GPUWorker()
        worker.nsfw = True
        with ThreadPoolExecutor(max_workers=1) as pool:
            moderator = ClassifierModerator(NothingFound(), Thresholds.from_settings(load_settings().moderation), pool)
            client = await make_client(worker_settings(), moderator=moderator)
            await register(client, base_url(await serve(worker)))
            refused = await client.get("/prompt/a%20rocket?model=flux&width=64&height=48&safe=true")
            served = await client.get("/prompt/a%20rocket?model=flux&width=64&height=48&seed=8")
            assert refused.status == 451 and (await refused.json())["error"] == "content_blocked"
            assert served.status == 200 and client.app[FEED].recent == []
            exif = Image.open(io.BytesIO(await served.read())).getexif().get_ifd(EXIF_IFD)[EXIF_USER_COMMENT]
            assert orjson.loads(exif[len(USER_COMMENT_ASCII):])["nologo"] is True

    async def test_the_workers_child_concept_scores_flag_a_child(
        self, serve: Serve, make_client: ClientFactory
    ) -> None:
        """A special-concept score above `backend_child_score` makes the image a child's: never in the
        feed, and refused outright when the checker also found it mature."""
        worker = GPUWorker()
        with ThreadPoolExecutor(max_workers=1) as pool:
            moderator = ClassifierModerator(NothingFound(), Thresholds.from_settings(load_settings().moderation), pool)
            client = await make_client(worker_settings(), moderator=moderator)
            await register(client, base_url(await serve(worker)))
            worker.scores = {"0": -0.2, "1": -0.04}
            assert (await client.get("/prompt/a%20beach?model=flux&width=64&height=48")).status == 200
            assert len(client.app[FEED].recent) == 1
            worker.scores = {"0": -0.2, "1": 0.03}
            assert (await client.get("/prompt/a%20park?model=flux&width=64&height=48")).status == 200
            assert len(client.app[FEED].recent) == 1
            worker.nsfw = True
            refused = await client.get("/prompt/a%20lake?model=flux&width=64&height=48")
            assert refused.status == 451 and (await refused.json())["reason"] == "sexual_minor_image"

    async def test_least_busy_selection_spreads_concurrent_requests(
        self, serve: Serve, make_client: ClientFactory
    ) -> None:
        """Two held requests land on two different workers, one each, though either could take both."""
        workers = [GPUWorker(hold=True), GPUWorker(hold=True)]
        client = await make_client(worker_settings(timeout=5.0))
        for worker in workers:
            await register(client, base_url(await serve(worker)), concurrency=4)
        requests = [asyncio.ensure_future(client.get(f"/prompt/cat{i}?model=flux&width=32&height=32")) for i in range(2)]
        for _ in range(200):
            if sum(w.in_flight for w in workers) == 2:
                break
            await asyncio.sleep(0.01)
        assert [w.in_flight for w in workers] == [1, 1]
        listing = await (await client.get("/register", headers=AUTH)).json()
        assert [w["busy"] for w in listing] == [1, 1]
        assert [w["concurrency"] for w in listing] == [4, 4]
        for worker in workers:
            worker.release.set()
        assert [r.status for r in await asyncio.gather(*requests)] == [200, 200]

    async def test_a_failed_worker_is_retried_on_another(self, serve: Serve, make_client: ClientFactory) -> None:
        """A worker answering 500 costs no request: each goes on to the healthy one; the failures are listed."""
        broken, healthy = GPUWorker(mode="error500"), GPUWorker()
        client = await make_client(worker_settings())
        broken_url = base_url(await serve(broken))
        await register(client, broken_url)
        await register(client, base_url(await serve(healthy)))
        statuses = [(await client.get(f"/prompt/dog{i}?model=flux&width=32&height=32")).status for i in range(4)]
        assert statuses == [200] * 4 and len(healthy.requests) == 4
        listing = {w["url"]: w for w in await (await client.get("/register", headers=AUTH)).json()}
        assert listing[broken_url]["failures"] == len(broken.requests) >= 1

    async def test_a_worker_that_keeps_failing_rests_while_a_healthy_one_serves(
        self, serve: Serve, make_client: ClientFactory
    ) -> None:
        """Two broken workers that still heartbeat fail fast, so they always looked the least busy:
        half the requests failed while the healthy worker idled. Three failures in a row rest them."""
        broken, healthy = [GPUWorker(mode="error500"), GPUWorker(mode="error500")], GPUWorker()
        client = await make_client(worker_settings(max_attempts=1, breaker_failures=100))
        broken_urls = [base_url(await serve(worker)) for worker in broken]
        for url in broken_urls:
            await register(client, url)
        await register(client, base_url(await serve(healthy)))
        statuses = [(await client.get(f"/prompt/dog{i}?model=flux&width=32&height=32")).status for i in range(16)]
        assert statuses.count(502) == 6 and statuses[-6:] == [200] * 6
        listing = {w["url"]: w for w in await (await client.get("/register", headers=AUTH)).json()}
        assert [(listing[url]["failures"], listing[url]["restingSecondsLeft"] > 0) for url in broken_urls] == [(3, True)] * 2

    async def test_a_worker_that_rounds_sizes_serves_the_size_asked_for(self, serve: Serve, make_client: ClientFactory) -> None:
        """A 1001-wide request answered 992 wide was a 502 that tripped the breaker: two such
        requests from one client cut the backend off for everyone."""
        worker = GPUWorker(mode="round16")
        client = await make_client(worker_settings(breaker_failures=2))
        await register(client, base_url(await serve(worker)))
        for seed in range(3):
            response = await client.get(f"/prompt/fox?model=flux&width=1001&height=301&seed={seed}")
            assert response.status == 200
            assert Image.open(io.BytesIO(await response.read())).size == (1001, 301)
        assert (worker.requests[0]["width"], worker.requests[0]["height"]) == (1001, 301)
        health = (await (await client.get("/health")).json())["generation"]["flux"]
        assert health["breaker"] == "closed" and health["failures"] == {}

    async def test_requests_that_found_every_worker_busy_do_not_open_the_breaker(
        self, serve: Serve, make_client: ClientFactory
    ) -> None:
        """Four requests for one busy worker until the deadline: one was sent and timed out, three
        never left the queue. Only the first is the backend's failure; the pool then serves."""
        worker = GPUWorker(hold=True)
        settings = make_settings(
            backends={"flux": fast(type="workers", breaker_failures=2, timeout=5.0)},
            models={"flux": {"backend": "flux", "default_side": 32}}, generation={"timeout": 1.0},
        )
        client = await make_client(settings)
        await register(client, base_url(await serve(worker)))
        statuses = await asyncio.gather(*(client.get(f"/prompt/dog{i}?model=flux") for i in range(4)))
        assert [response.status for response in statuses] == [504] * 4
        health = (await (await client.get("/health")).json())["generation"]["flux"]
        assert health["breaker"] == "closed" and health["failures"] == {"timeout": 1, "busy": 3}, health
        worker.hold = False
        worker.release.set()
        assert (await client.get("/prompt/cat?model=flux")).status == 200

    async def test_time_spent_on_an_earlier_attempt_is_not_waiting(self, serve: Serve, make_client: ClientFactory) -> None:
        """Two hung workers: the first attempt times out at 0.6 s, the second is cut by the deadline at
        1 s. Neither waited for room, so it is the backend's timeout (it read as 'busy' once)."""
        workers = [GPUWorker(mode="hang"), GPUWorker(mode="hang")]
        settings = make_settings(
            backends={"flux": fast(type="workers", breaker_failures=1, timeout=0.6, max_attempts=2)},
            models={"flux": {"backend": "flux", "default_side": 32}}, generation={"timeout": 1.0},
        )
        client = await make_client(settings)
        for worker in workers:
            await register(client, base_url(await serve(worker)))
        assert (await client.get("/prompt/dog?model=flux")).status == 504
        health = (await (await client.get("/health")).json())["generation"]["flux"]
        assert health["breaker"] == "open" and health["failures"] == {"timeout": 1}, health
        assert [len(worker.requests) for worker in workers] == [1, 1]

    async def test_a_worker_that_never_answers_rests_after_three_deadlines(
        self, serve: Serve, make_client: ClientFactory
    ) -> None:
        """The generation's deadline cuts the hung worker's call before its own timeout: that counts
        towards its rest too, or a heartbeating but hung worker kept getting every other request."""
        hung, healthy = GPUWorker(mode="hang"), GPUWorker()
        settings = make_settings(
            backends={"flux": fast(type="workers", breaker_failures=100, timeout=5.0)},
            models={"flux": {"backend": "flux", "default_side": 32}}, generation={"timeout": 0.5},
        )
        client = await make_client(settings)
        hung_url = base_url(await serve(hung))
        await register(client, hung_url)
        await register(client, base_url(await serve(healthy)))
        statuses = [(await client.get(f"/prompt/dog{i}?model=flux")).status for i in range(10)]
        assert statuses.count(504) == 3 and statuses[-4:] == [200] * 4
        listing = {w["url"]: w for w in await (await client.get("/register", headers=AUTH)).json()}
        assert listing[hung_url]["restingSecondsLeft"] > 0

    @pytest.mark.parametrize(("asked", "answered", "kept"), [
        ((1001, 301), (992, 288), True), ((1448, 724), (1408, 704), True), ((32, 32), (1, 1), False),
        ((1, 1), (64, 64), False), ((64, 1024), (1, 1087), False), ((512, 512), (576, 512), False),
    ])
    def test_only_a_rounded_size_passes_for_the_size_asked(
        self, asked: tuple[int, int], answered: tuple[int, int], kept: bool
    ) -> None:
        """Rounding to a multiple of 8, 16 or 64 is the image asked for; a placeholder is not."""
        if kept:
            assert decode_image(png(*answered), *asked, "a worker").size == asked
        else:
            with pytest.raises(BackendError, match="not the requested"):
                decode_image(png(*answered), *asked, "a worker")

    async def test_no_registered_worker_is_503(self, make_client: ClientFactory) -> None:
        client = await make_client(worker_settings())
        response = await client.get("/prompt/cat?model=flux&width=32&height=32")
        assert response.status == 503 and (await response.json())["error"] == "backend_unavailable"

    @pytest.mark.parametrize(("mode", "status"), [("malformed", 502), ("not_image", 502), ("wrong_size", 502),
                                                  ("oversized", 502), ("hang", 504)])
    async def test_every_worker_failing_maps_to_a_clear_status(
        self, serve: Serve, make_client: ClientFactory, mode: str, status: int
    ) -> None:
        worker = GPUWorker(mode=mode)
        client = await make_client(worker_settings(timeout=0.3))
        await register(client, base_url(await serve(worker)))
        response = await client.get("/prompt/cat?model=flux&width=32&height=32")
        assert response.status == status


async def test_a_malformed_worker_url_is_a_400_not_a_crash(
    make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """yarl refuses some URLs by raising; registration must answer 400 JSON for them."""
    monkeypatch.setenv("IMAGE_SERVICE_WORKER_SECRET", "s3cret")
    client = await make_client()
    for url in ("http://[::1", "http://example.test:99999/", "ftp://example.test/"):
        response = await client.post("/register", json={"url": url, "type": "flux"},
                                     headers={"Authorization": "Bearer s3cret"})
        assert response.status == 400 and (await response.json())["error"] == "bad_request", url
