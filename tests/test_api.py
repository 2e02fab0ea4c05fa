"""The HTTP surface: the image endpoint, headers, EXIF, errors, metadata routes."""

from __future__ import annotations

import asyncio
import io

import orjson
from PIL import Image

from image_service.app import FEED
from image_service.imaging import EXIF_IFD, EXIF_MAKE, EXIF_USER_COMMENT, USER_COMMENT_ASCII

from .conftest import ClientFactory, CountingBackend, make_settings

FOX = "/prompt/a%20red%20fox?width=512&height=384&seed=7"


class TestImage:
    async def test_jpeg_decodes_at_the_requested_size(self, client) -> None:
        """The body is a real JPEG of exactly the requested dimensions."""
        response = await client.get(FOX)
        assert response.status == 200
        image = Image.open(io.BytesIO(await response.read()))
        assert image.format == "JPEG" and image.size == (512, 384)

    async def test_response_headers_match_the_origin(self, client) -> None:
        """Content type, immutable caching, filename slug, request id and cache status."""
        response = await client.get(FOX)
        assert response.headers["Content-Type"] == "image/jpeg"
        assert response.headers["Cache-Control"] == "public, max-age=31536000, immutable"
        assert response.headers["Content-Disposition"] == 'inline; filename="a-red-fox.jpg"'
        assert len(response.headers["X-Request-Id"]) == 32
        assert response.headers["X-Cache"] == "MISS"
        assert response.headers["Access-Control-Allow-Origin"] == "*"

    async def test_exif_carries_parameters_and_model(self, client) -> None:
        """UserComment holds the parameters as JSON and Make the model, like the origin."""
        image = Image.open(io.BytesIO(await (await client.get(FOX)).read()))
        exif = image.getexif()
        assert exif[EXIF_MAKE] == "procedural"
        comment = exif.get_ifd(EXIF_IFD)[EXIF_USER_COMMENT]
        assert comment.startswith(USER_COMMENT_ASCII)
        data = orjson.loads(comment[len(USER_COMMENT_ASCII):])
        assert data["prompt"] == "a red fox" and (data["width"], data["height"], data["seed"]) == (512, 384, 7)

    async def test_exif_of_a_cache_hit_is_true_of_the_request_it_answers(self, client) -> None:
        """Requests sharing a cache key share the bytes, EXIF included: it holds only what the key
        covers, not the first request's policies."""
        comments = []
        for query in ("nologo=true", "nofeed=true&safe=true"):
            response = await client.get(f"/prompt/a%20fox%20exif?width=64&height=64&{query}")
            exif = Image.open(io.BytesIO(await response.read())).getexif().get_ifd(EXIF_IFD)[EXIF_USER_COMMENT]
            comments.append((response.headers["X-Cache"], orjson.loads(exif[len(USER_COMMENT_ASCII):])))
        (_, first), (cache, second) = comments
        assert cache == "HIT" and first == second and second["nologo"] is True
        assert "safe" not in second and "nofeed" not in second

    async def test_private_prompt_stays_out_of_exif_and_filename(self, client) -> None:
        """A private prompt appears nowhere in what is served."""
        response = await client.get("/prompt/my%20secret%20plan?private=true&width=64&height=64"
                                    "&negative_prompt=secret%20faces")
        body = await response.read()
        assert b"secret" not in body
        assert "secret" not in str(response.headers)
        assert response.headers["Cache-Control"].startswith("private")

    async def test_parameters_that_differ_only_in_their_escapes_are_different_images(self, client) -> None:
        """`cats%26dogs` is "cats&dogs"; `cats%2526dogs` is "cats%26dogs": not the same request."""
        comments = []
        for value in ("cats%26dogs", "cats%2526dogs"):
            response = await client.get(f"/prompt/fox?width=64&height=64&negative_prompt={value}")
            assert response.headers["X-Cache"] == "MISS"
            exif = Image.open(io.BytesIO(await response.read())).getexif().get_ifd(EXIF_IFD)[EXIF_USER_COMMENT]
            comments.append(orjson.loads(exif[len(USER_COMMENT_ASCII):])["negative_prompt"])
        assert comments == ["cats&dogs", "cats%26dogs"]

    async def test_a_private_image_is_no_other_clients_cache_hit(self, make_client: ClientFactory) -> None:
        """Else X-Cache (and the time a hit takes) would confirm a guessed private prompt to anyone."""
        client = await make_client(make_settings(access={"trusted_proxies": ["127.0.0.1"]}))
        url = "/prompt/my%20diagnosis?width=64&height=64&private=true"
        caches = [
            (await client.get(url, headers={"X-Forwarded-For": address})).headers["X-Cache"]
            for address in ("198.51.100.3", "198.51.100.4", "198.51.100.3")
        ]
        assert caches == ["MISS", "MISS", "HIT"]
        public = "/prompt/my%20diagnosis?width=64&height=64"
        assert [(await client.get(public, headers={"X-Forwarded-For": a})).headers["X-Cache"]
                for a in ("198.51.100.3", "198.51.100.4")] == ["MISS", "HIT"]

    async def test_privacy_and_safety_flags_fail_closed(self, client) -> None:
        """`private=false&private=true` or `Private=true` was public: prompt in the filename, the log,
        the feed. A site appending `&private=true` to a user's URL must be able to rely on it."""
        for query in ("private=false&private=true", "Private=true", "PRIVATE=TRUE"):
            response = await client.get(f"/prompt/my%20secret%20plan?width=64&height=64&{query}")
            assert response.headers["Cache-Control"].startswith("private"), query
            assert "secret" not in response.headers["Content-Disposition"]
            assert b"secret" not in await response.read()
        assert client.app[FEED].recent == []

    async def test_a_random_seed_image_is_never_kept_by_browsers_or_cdns(self, client) -> None:
        """Each `seed=-1` request is a new draw; an immutable year-long cache would freeze the first."""
        drawn = [await client.get("/prompt/fox?width=64&height=64&seed=-1") for _ in range(2)]
        assert [r.headers["Cache-Control"] for r in drawn] == ["no-store", "no-store"]
        assert await drawn[0].read() != await drawn[1].read()
        fixed = await client.get("/prompt/fox?width=64&height=64&seed=-0")
        assert fixed.headers["Cache-Control"] == "public, max-age=31536000, immutable"

    async def test_a_blank_negative_prompt_is_the_default_one(self, client) -> None:
        """Else the image's own URL (feed, chained instance) would name another image."""
        blank = await client.get("/prompt/fox?width=64&height=64&negative_prompt=%20")
        plain = await client.get("/prompt/fox?width=64&height=64")
        assert plain.headers["X-Cache"] == "HIT" and await plain.read() == await blank.read()

    async def test_a_url_that_is_not_utf8_is_refused_in_path_and_query(self, client) -> None:
        """Undecodable escapes were served as literal text in a path, as U+FFFD in a query: a
        different image from the one asked for, with no word said."""
        for path in ("/prompt/%C3%28", "/prompt/%ED%A0%BD", "/prompt/fox?negative_prompt=%FF%FE"):
            response = await client.get(path)
            assert response.status == 400, path
            assert "UTF-8" in (await response.json())["message"]
        literal = await client.get("/prompt/%25C3%28?width=64&height=64")  # "%C3(" sent as text is fine
        assert literal.status == 200

    async def test_second_identical_request_is_a_hit_with_identical_bytes(self, client) -> None:
        """The cache serves the very bytes the first request produced."""
        first = await client.get(FOX)
        second = await client.get(FOX)
        assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("MISS", "HIT")
        assert await first.read() == await second.read()

    async def test_same_inputs_give_same_bytes_across_instances(self, make_client: ClientFactory) -> None:
        """The embedded renderer is deterministic: a fresh process renders the same JPEG."""
        one, two = await make_client(), await make_client()
        assert await (await one.get(FOX)).read() == await (await two.get(FOX)).read()

    async def test_different_seeds_give_different_images(self, client) -> None:
        a = await (await client.get("/prompt/fox?seed=1&width=64&height=64")).read()
        b = await (await client.get("/prompt/fox?seed=2&width=64&height=64")).read()
        assert a != b

    async def test_nologo_changes_the_pixels(self, client) -> None:
        """The logo is drawn unless nologo: the two images differ."""
        a = await (await client.get("/prompt/fox?width=256&height=256")).read()
        b = await (await client.get("/prompt/fox?width=256&height=256&nologo=true")).read()
        assert a != b

    async def test_encoded_slash_in_prompt_is_part_of_the_prompt(self, client) -> None:
        """`/prompt/a%2Fb` and `/prompt/a/b` are the prompt "a/b", not a 404."""
        response = await client.get("/prompt/a/b?width=32&height=32")
        assert response.status == 200
        assert response.headers["Content-Disposition"] == 'inline; filename="a-b.jpg"'

    async def test_head_answers_without_a_body(self, client) -> None:
        response = await client.head(FOX)
        assert response.status == 200 and response.headers["Content-Type"] == "image/jpeg"


class TestSingleFlight:
    async def test_twenty_concurrent_identical_requests_cause_one_generation(
        self, make_client: ClientFactory, backend: CountingBackend
    ) -> None:
        """Concurrent misses wait for one generation and all receive its bytes."""
        client = await make_client(backends={"embedded": backend})
        backend.gate.clear()
        requests = [asyncio.ensure_future(client.get(FOX)) for _ in range(20)]
        while backend.calls == 0:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        backend.gate.set()
        responses = await asyncio.gather(*requests)
        bodies = {await r.read() for r in responses}
        assert backend.calls == 1
        assert [r.status for r in responses] == [200] * 20 and len(bodies) == 1

    async def test_failure_reaches_every_waiter_and_is_not_cached(
        self, make_client: ClientFactory, backend: CountingBackend
    ) -> None:
        """All waiters get the 502; the next request generates again and succeeds."""
        client = await make_client(backends={"embedded": backend})
        backend.gate.clear()
        backend.fail_with = RuntimeError("GPU on fire at /srv/secret/path")
        requests = [asyncio.ensure_future(client.get(FOX)) for _ in range(5)]
        while backend.calls == 0:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        backend.gate.set()
        responses = await asyncio.gather(*requests)
        assert [r.status for r in responses] == [502] * 5
        body = await responses[0].json()
        assert body["error"] == "generation_failed" and "/srv/secret" not in str(body)
        backend.fail_with = None
        again = await client.get(FOX)
        assert again.status == 200 and again.headers["X-Cache"] == "MISS" and backend.calls == 2


class TestErrors:
    async def test_unknown_model_is_400_json_listing_valid_models(self, client) -> None:
        response = await client.get("/prompt/fox?model=flux")
        assert response.status == 400
        body = await response.json()
        assert body["error"] == "unknown_model" and body["validModels"] == ["procedural"]
        assert body["requestId"] == response.headers["X-Request-Id"]
        assert body["requestParameters"]["model"] == "flux"

    async def test_unknown_path_is_404_json(self, client) -> None:
        response = await client.get("/nowhere")
        assert response.status == 404
        body = await response.json()
        assert (body["error"], body["path"]) == ("not_found", "/nowhere")

    async def test_wrong_method_is_405_json_with_allow(self, client) -> None:
        response = await client.post("/models")
        assert response.status == 405
        assert (await response.json())["error"] == "method_not_allowed"
        assert "GET" in response.headers["Allow"]

    async def test_prompt_over_the_limit_is_400(self, make_client: ClientFactory) -> None:
        client = await make_client(make_settings(server={"max_prompt_length": 10}))
        response = await client.get("/prompt/" + "x" * 11)
        assert response.status == 400 and (await response.json())["error"] == "prompt_too_long"

    async def test_bad_parameter_is_400_and_never_echoes_the_token_or_referrer(self, client) -> None:
        response = await client.get("/prompt/fox?width=wide&token=sk-very-secret&referrer=https://a.test/?k=s3")
        assert response.status == 400
        text = await response.text()
        assert "width must be an integer" in text and "sk-very-secret" not in text and "a.test" not in text

    async def test_an_error_echoes_what_was_parsed_and_stays_small(self, client) -> None:
        """A repeated parameter echoes the value the parser read (the first); parameters the API
        does not define are not echoed at all: they may be secrets, and they could grow the body."""
        extra = "&".join(f"p{n}={'v' * 90}" for n in range(70))
        response = await client.get(f"/prompt/fox?width=abc&width=64&access_token=at-123&password=hunter2&{extra}")
        body = await response.json()
        assert response.status == 400 and "'abc'" in body["message"]
        assert body["requestParameters"] == {"width": "abc", "prompt": "fox"}

    async def test_a_private_requests_error_echoes_none_of_its_texts(self, client) -> None:
        response = await client.get("/prompt/my%20secret?Private=true&width=abc&negative_prompt=secret%20faces"
                                    "&image=https://x.example/a.png%3Fsig%3Dsecret")
        assert response.status == 400 and "secret" not in await response.text()

    async def test_slow_backend_answers_504(self, make_client: ClientFactory, backend: CountingBackend) -> None:
        """A generation past its deadline is a 504 JSON, not a hang."""
        backend.delay = 5
        client = await make_client(make_settings(generation={"timeout": 0.2}), backends={"embedded": backend})
        response = await client.get(FOX)
        assert response.status == 504 and (await response.json())["error"] == "generation_timeout"

    async def test_unexpected_crash_is_500_json_without_trace(self, make_client: ClientFactory) -> None:
        """Even a bug answers JSON; the traceback stays in the server log."""

        class Broken:
            name, provider = "embedded", "test"

            async def generate(self, params: object) -> object:
                return object()  # not a GeneratedImage: the pipeline trips over it

            async def close(self) -> None:
                return None

        client = await make_client(backends={"embedded": Broken()})
        response = await client.get(FOX)
        assert response.status == 500
        body = await response.json()
        assert body["error"] == "internal_error" and "Traceback" not in str(body)

    async def test_options_preflight_is_answered_with_cors(self, client) -> None:
        response = await client.options("/prompt/fox")
        assert response.status == 204
        assert "GET" in response.headers["Access-Control-Allow-Methods"]

    async def test_options_to_an_unknown_path_is_not_found(self, client) -> None:
        """A preflight is answered only where there is something to call."""
        response = await client.options("/no-such-route", headers={"Access-Control-Request-Method": "GET"})
        assert response.status == 404 and (await response.json())["error"] == "not_found"
        assert (await client.options("/feed")).status == 204


class TestMetadataRoutes:
    async def test_models_lists_names_without_caching(self, client) -> None:
        response = await client.get("/models")
        assert await response.json() == ["procedural"]
        assert response.headers["Cache-Control"] == "no-store"

    async def test_about_describes_the_embedded_model_truthfully(self, client) -> None:
        """The built-in renderer is presented as what it is, not as a diffusion model."""
        (model,) = await (await client.get("/about")).json()
        assert model["name"] == "procedural" and model["maxSideLength"] == 2048
        assert "not a diffusion model" in model["description"].lower()

    async def test_health_reports_ok(self, client) -> None:
        body = await (await client.get("/health")).json()
        assert body["status"] == "ok" and body["cache"]["backend"] == "memory" and body["cache"]["state"] == "up"

    async def test_openapi_documents_every_route(self, client) -> None:
        """Each GET route the app serves has a path in the OpenAPI document."""
        document = await (await client.get("/openapi.json")).json()
        assert document["openapi"].startswith("3.")
        routes = {
            resource.canonical
            for resource in client.app.router.resources()
        }
        assert routes == set(document["paths"])
