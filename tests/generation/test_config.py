"""Generation configuration: backends named by models must exist and be complete; every key documented."""

from __future__ import annotations

from pathlib import Path

import pytest

from image_service.config import ConfigError, load_settings

ROOT = Path(__file__).parent.parent.parent


def test_a_model_naming_an_unknown_backend_fails_naming_both() -> None:
    with pytest.raises(ConfigError, match=r"models\.procedural names backend 'gpu'"):
        load_settings(overrides={"models": {"procedural": {"fallback": ["gpu"]}}})


def test_an_openai_backend_without_base_url_fails_naming_the_backend() -> None:
    with pytest.raises(ConfigError, match=r"backends\.hosted.*needs base_url"):
        load_settings(overrides={"backends": {"hosted": {"type": "openai"}}})


def test_backends_come_from_the_environment_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGE_SERVICE_BACKENDS__HOSTED__TYPE", "openai")
    monkeypatch.setenv("IMAGE_SERVICE_BACKENDS__HOSTED__BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("IMAGE_SERVICE_MODELS__PROCEDURAL__FALLBACK", '["hosted"]')
    settings = load_settings()
    assert settings.backends["hosted"].base_url == "http://127.0.0.1:9"
    assert settings.models["procedural"].fallback == ("hosted",)


def test_env_example_and_readme_document_the_generation_settings() -> None:
    example = (ROOT / "config" / ".env.example").read_text()
    readme = (ROOT / "README.md").read_text()
    settings = load_settings()
    for section in ("workers", "references"):
        for key in type(getattr(settings, section)).model_fields:
            assert f"IMAGE_SERVICE_{section.upper()}__{key.upper()}" in example
            assert f"`{section}.{key}`" in readme
    for key in type(settings.backends["embedded"]).model_fields:
        assert f"__{key.upper()}" in example and key in readme
