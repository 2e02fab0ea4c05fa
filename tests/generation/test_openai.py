"""The OpenAI-compatible images backend, through the app, against a local server speaking the API."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from ..conftest import ClientFactory, make_settings
from ..test_pipeline_events import capture_logs
from .conftest import Serve, base_url, fast
from .servers import OpenAIImages

KEY = "sk-test-do-not-log-9f8e7d"


def openai_settings(url: str, **spec: object) -> object:
    return make_settings(
        backends={"openai": fast(type="openai", base_url=url, api_key_env="TEST_OPENAI_KEY", **spec)},
        models={"dalle": {"backend": "openai", "backend_model": "dall-e-3", "max_side": 1024, "default_side": 64,
                          "cost": 0.04}},
    )


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_OPENAI_KEY", KEY)


class TestOpenAIBackend:
    async def test_generates_through_the_images_api_with_the_documented_fields(
        self, serve: Serve, make_client: ClientFactory
    ) -> None:
        """The request carries model, prompt, size, n=1, b64_json and the bearer key; the JPEG has the size."""
        fake = OpenAIImages()
        client = await make_client(openai_settings(base_url(await serve(fake))))
        response = await client.get("/prompt/a%20red%20fox?model=dalle&width=64&height=48&nologo=true")
        assert response.status == 200
        assert Image.open(io.BytesIO(await response.read())).size == (64, 48)
        (seen,) = fake.requests
        assert seen["path"] == "/v1/images/generations"
        assert seen["json"] == {"model": "dall-e-3", "prompt": "a red fox", "size": "64x48", "n": 1,
                                "response_format": "b64_json"}
        assert seen["headers"]["Authorization"] == f"Bearer {KEY}"

    async def test_azure_style_uses_api_key_header_and_api_version(
        self, serve: Serve, make_client: ClientFactory
    ) -> None:
        fake = OpenAIImages()
        url = base_url(await serve(fake)) + "/deployments/dalle"
        settings = openai_settings(url, path="/images/generations", auth_header="api-key", api_version="2024-02-01")
        response = await (await make_client(settings)).get("/prompt/fox?model=dalle&width=32&height=32")
        assert response.status == 200
        (seen,) = fake.requests
        assert seen["query"] == {"api-version": "2024-02-01"}
        assert seen["headers"]["api-key"] == KEY and "Authorization" not in seen["headers"]

    @pytest.mark.parametrize(
        ("mode", "status", "reason", "message"),
        [
            ("error500", 502, "http_status", "HTTP 500"),
            ("malformed", 502, "malformed_json", "malformed JSON"),
            ("not_image", 502, "not_image", "not a readable image"),
            ("wrong_size", 502, "wrong_dimensions", "not the requested 64x48"),
            ("oversized", 502, "oversized", "the limit is"),
            ("hang", 504, "timeout", "did not answer in time"),
        ],
    )
    async def test_bad_answers_are_clear_errors_and_counted(
        self, serve: Serve, make_client: ClientFactory, mode: str, status: int, reason: str, message: str
    ) -> None:
        """Each kind of garbage maps to 502/504 JSON naming the problem, and /health counts it."""
        fake = OpenAIImages(mode=mode)
        settings = openai_settings(base_url(await serve(fake)), timeout=0.3)
        client = await make_client(settings)
        response = await client.get("/prompt/fox?model=dalle&width=64&height=48")
        assert response.status == status
        body = await response.json()
        assert message in body["message"] and "Traceback" not in str(body)
        health = await (await client.get("/health")).json()
        assert health["generation"]["openai"]["failures"] == {reason: 1}

    async def test_api_key_never_reaches_logs_or_responses(self, serve: Serve, make_client: ClientFactory) -> None:
        fake = OpenAIImages(mode="error500")
        client = await make_client(openai_settings(base_url(await serve(fake))))
        with capture_logs() as logs:
            response = await client.get("/prompt/fox?model=dalle&width=64&height=48")
            text = await response.text() + await (await client.get("/health")).text()
        assert fake.requests and KEY not in repr(logs) and KEY not in text


class TestReferenceImages:
    async def test_references_go_to_the_edits_endpoint_as_files(
        self, serve: Serve, make_client: ClientFactory
    ) -> None:
        """With `image=`, the fetched reference bytes are uploaded to /v1/images/edits."""
        from .servers import ImageHost, png

        host, fake = ImageHost(), OpenAIImages()
        ref_url = base_url(await serve(host)) + "/ref.png"
        settings = openai_settings(base_url(await serve(fake)))
        settings = settings.model_copy(update={"references": settings.references.model_copy(
            update={"allow_private": True})})
        response = await (await make_client(settings)).get(f"/prompt/fox?model=dalle&width=64&height=48&image={ref_url}")
        assert response.status == 200
        (seen,) = fake.requests
        assert seen["path"] == "/v1/images/edits" and seen["images"] == [png(8, 8)]
        assert seen["form"]["size"] == "64x48" and seen["form"]["model"] == "dall-e-3"

    async def test_loopback_reference_is_refused_before_any_generation(
        self, serve: Serve, make_client: ClientFactory
    ) -> None:
        """By default an `image=` URL on 127.0.0.1 is a 400 and neither the host nor the backend is called."""
        from .servers import ImageHost

        host, fake = ImageHost(), OpenAIImages()
        ref_url = base_url(await serve(host)) + "/ref.png"
        client = await make_client(openai_settings(base_url(await serve(fake))))
        response = await client.get(f"/prompt/fox?model=dalle&width=64&height=48&image={ref_url}")
        assert response.status == 400
        assert (await response.json())["error"] == "reference_rejected"
        assert host.requests == [] and fake.requests == []
