"""Configuration: files, environment overrides and validation messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from image_service.config import ConfigError, load_settings


def test_defaults_load_from_the_config_directory() -> None:
    settings = load_settings()
    assert settings.cache.backend == "memory" and "procedural" in settings.models


def test_toml_file_overrides_defaults_and_keeps_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "service.toml"
    path.write_text("[cache]\nttl = 60\n[server]\nport = 9000\n")
    settings = load_settings(path)
    assert (settings.cache.ttl, settings.server.port) == (60, 9000)
    assert settings.cache.max_bytes == 268435456


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """IMAGE_SERVICE_<SECTION>__<KEY> wins over the TOML file."""
    path = tmp_path / "service.toml"
    path.write_text("[cache]\nttl = 60\n")
    monkeypatch.setenv("IMAGE_SERVICE_CACHE__TTL", "5")
    monkeypatch.setenv("IMAGE_SERVICE_MODELS__PROCEDURAL__MAX_SIDE", "1536")
    settings = load_settings(path)
    assert settings.cache.ttl == 5 and settings.models["procedural"].max_side == 1536


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"IMAGE_SERVICE_CACHE__MAX_BYTES": "-1"}, "cache.max_bytes"),
        ({"IMAGE_SERVICE_CACHE__TYPO": "1"}, "cache.typo"),
        ({"IMAGE_SERVICE_SERVER__LOG_FORMAT": "xml"}, "server.log_format"),
        ({"IMAGE_SERVICE_GENERATION__DEFAULT_MODEL": "flux"}, "generation.default_model"),
        ({"IMAGE_SERVICE_MODELS__PROCEDURAL__DEFAULT_SIDE": "4000"}, "default_side"),
        ({"IMAGE_SERVICE_CACHE__BACKEND": "memcached"}, "cache.backend"),
        ({"IMAGE_SERVICE_CACHE__REDIS_URL": "http://127.0.0.1:6379"}, "cache.redis_url"),
        ({"IMAGE_SERVICE_CACHE__REDIS_URL": "redis://127.0.0.1:6379/zero"}, "cache.redis_url"),
        ({"IMAGE_SERVICE_ACCESS__TRUSTED_PROXIES": '["not-an-ip"]'}, "access.trusted_proxies"),
        ({"IMAGE_SERVICE_ACCESS__REFERRERS": '{"a.example": "gold"}'}, "access.referrers"),
        ({"IMAGE_SERVICE_TIERS__SEED__QUEUE_DEPTH": "1"}, "tiers.seed"),
        ({"IMAGE_SERVICE_ENHANCE__TRANSFORM_TEMPLATE": "no placeholder"}, "enhance.transform_template"),
        ({"IMAGE_SERVICE_TRACKING__BATCH_ROWS": "0"}, "tracking.batch_rows"),
    ],
)
def test_invalid_values_fail_with_a_message_naming_the_key(
    env: dict[str, str], named: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_settings()


def test_missing_or_broken_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "absent.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[cache\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(broken)
    with pytest.raises(ConfigError, match="cannot be read"):
        load_settings(tmp_path)
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b"[server]\nhost = '\xe9'\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(latin)


@pytest.mark.parametrize(("variable", "value"), [
    ("IMAGE_SERVICE_ACCESS__TRUSTED_PROXIES", "10.0.0.1"),
    ("IMAGE_SERVICE_ACCESS__REFERRERS", "example.com=seed"),
    ("IMAGE_SERVICE_MODELS__PROCEDURAL__FALLBACK", "embedded"),
])
def test_a_list_variable_that_is_not_json_is_named(monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> None:
    """The message names the variable to fix, not only its section."""
    monkeypatch.setenv("IMAGE_SERVICE_ACCESS__TOKENS_FILE", "tokens.toml")  # a string: not JSON, and fine
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=f"^invalid configuration: {variable}: lists and tables take JSON"):
        load_settings()


def test_env_example_documents_every_setting() -> None:
    """config/.env.example names a variable for every key of every section."""
    example = (Path(__file__).parent.parent / "config" / ".env.example").read_text()
    settings = load_settings()
    for section in ("server", "generation", "cache", "tracking"):
        for key in type(getattr(settings, section)).model_fields:
            assert f"IMAGE_SERVICE_{section.upper()}__{key.upper()}" in example


def test_a_copy_of_env_example_with_the_tinybird_key_filled_in_ships_to_tinybird(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What a newcomer does: copy the file, fill in TINYBIRD_API_KEY and TINYBIRD_API_URL, load it."""
    example = (Path(__file__).parent.parent / "config" / ".env.example").read_text()
    for line in example.splitlines():
        name, equals, value = line.partition("=")
        if equals and not line.startswith("#"):
            monkeypatch.setenv(name, value.strip("'"))
    monkeypatch.setenv("TINYBIRD_API_KEY", "p.filled-in")
    monkeypatch.setenv("TINYBIRD_API_URL", "https://api.us-east.tinybird.co")
    tracking = load_settings().tracking
    assert (tracking.api_key.get_secret_value(), tracking.api_url) == ("p.filled-in", "https://api.us-east.tinybird.co")


def test_env_example_documents_access_tiers_enhance_and_feed_settings() -> None:
    """Every key of the access, enhance and feed sections and of every tier has its variable."""
    example = (Path(__file__).parent.parent / "config" / ".env.example").read_text()
    settings = load_settings()
    for section in ("access", "enhance", "feed"):
        for key in type(getattr(settings, section)).model_fields:
            assert f"IMAGE_SERVICE_{section.upper()}__{key.upper()}=" in example
    for tier in type(settings.tiers).model_fields:
        for key in type(getattr(settings.tiers, tier)).model_fields:
            assert f"IMAGE_SERVICE_TIERS__{tier.upper()}__{key.upper()}=" in example


def test_environment_sets_trusted_proxies_and_referrers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGE_SERVICE_ACCESS__TRUSTED_PROXIES", '["10.0.0.0/8"]')
    monkeypatch.setenv("IMAGE_SERVICE_ACCESS__REFERRERS", '{"Partner.Example": "seed"}')
    settings = load_settings()
    assert settings.access.trusted_proxies == ("10.0.0.0/8",)
    assert settings.access.referrers == {"partner.example": "seed"}


@pytest.mark.parametrize("url", ["redis://:hunter2@127.0.0.1:port/0", "redis://:hun@ter2@127.0.0.1:port/0",
                                 "redis://:hun/ter2@127.0.0.1:port/0"])
def test_a_bad_redis_url_is_reported_without_its_password(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """A password may hold '@' or '/': none of it is shown."""
    monkeypatch.setenv("IMAGE_SERVICE_CACHE__REDIS_URL", url)
    with pytest.raises(ConfigError, match=r"cache\.redis_url") as caught:
        load_settings()
    assert "ter2" not in str(caught.value)


@pytest.mark.parametrize(("variable", "url"), [
    ("TINYBIRD_API_URL", "https://user:s3cr3tpw@api.tinybird.co"),
    ("IMAGE_SERVICE_ACCESS__VALIDATOR_URL", "https://user:s3cr3tpw@auth.example"),
    ("IMAGE_SERVICE_ENHANCE__BASE_URL", "https://user:s3cr3tpw@llm.example"),
])
def test_a_service_url_with_credentials_is_refused_at_start(
    monkeypatch: pytest.MonkeyPatch, variable: str, url: str
) -> None:
    """The client adds its own Authorization header, and aiohttp then refuses every call: with
    TINYBIRD_API_URL, every row was lost while the service looked healthy."""
    monkeypatch.setenv(variable, url)
    with pytest.raises(ConfigError, match="credentials") as caught:
        load_settings()
    assert "s3cr3tpw" not in str(caught.value)


@pytest.mark.parametrize("url", ["ftp://auth.example/check?secret=VALSECRET", "ftp://auth.example/x#access_token=VALSECRET"])
def test_a_bad_url_is_reported_without_its_query_or_fragment(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("IMAGE_SERVICE_ACCESS__VALIDATOR_URL", url)
    with pytest.raises(ConfigError, match="validator_url") as caught:
        load_settings()
    assert "VALSECRET" not in str(caught.value) and "auth.example" in str(caught.value)


def test_seed_variables_configure_tinybird(monkeypatch: pytest.MonkeyPatch) -> None:
    """TINYBIRD_API_URL and TINYBIRD_API_KEY work as the seed names them; the key stays secret."""
    monkeypatch.setenv("TINYBIRD_API_URL", "https://api.us-east.tinybird.co")
    monkeypatch.setenv("TINYBIRD_API_KEY", "p.secret-append-token")
    settings = load_settings()
    assert settings.tracking.api_url == "https://api.us-east.tinybird.co"
    assert settings.tracking.api_key.get_secret_value() == "p.secret-append-token"
    assert "p.secret-append-token" not in repr(settings)


def test_a_misspelt_section_in_a_variable_is_refused_like_a_misspelt_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGE_SERVICE_CAHCE__BACKEND", "redis")
    with pytest.raises(ConfigError, match="IMAGE_SERVICE_CAHCE__BACKEND names no configuration section 'cahce'"):
        load_settings()


@pytest.mark.parametrize("name", ["IMAGE_SERVICE_SERVER_PORT", "IMAGE_SERVICE_TRACKING_API_KEY"])
def test_a_setting_named_with_one_underscore_is_refused_not_ignored(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """IMAGE_SERVICE_SERVER_PORT=1234 started on 8080 without a word."""
    monkeypatch.setenv(name, "1234")
    with pytest.raises(ConfigError, match=f"{name} is read by nothing: .*two underscores"):
        load_settings()


def test_variables_of_the_service_that_are_not_settings_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGE_SERVICE_WORKER_SECRET", "s3cret")
    assert load_settings().server.port == 8080


@pytest.mark.parametrize(("variable", "message"), [
    ("IMAGE_SERVICE_TRACKING__LOCAL_PATH", "tracking.local_path: Value error, must be a path, not empty"),
    ("IMAGE_SERVICE_TRACKING__SPOOL_DIR", "tracking.spool_dir: Value error, must be a path, not empty"),
])
def test_an_empty_path_is_refused_at_start(monkeypatch: pytest.MonkeyPatch, variable: str, message: str) -> None:
    """Empty, the sink's path was ".": every batch failed on a directory and went to the spool."""
    monkeypatch.setenv(variable, "")
    with pytest.raises(ConfigError, match=message):
        load_settings()


@pytest.mark.parametrize(("spool", "sink"), [("var", "var/events.ndjson"), ("var", "var/sub/events.ndjson")])
def test_a_local_sink_inside_the_spool_is_refused_when_it_is_the_sink(
    monkeypatch: pytest.MonkeyPatch, spool: str, sink: str
) -> None:
    """Telemetry stopped silently: the spool's lock on its directory held every batch of the sink.
    With a Tinybird key the local path is unused, and nothing is refused."""
    from image_service.tracking.service import make_sink

    monkeypatch.setenv("IMAGE_SERVICE_TRACKING__SPOOL_DIR", spool)
    monkeypatch.setenv("IMAGE_SERVICE_TRACKING__LOCAL_PATH", sink)
    monkeypatch.delenv("TINYBIRD_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="must not be inside tracking.spool_dir"):
        make_sink(load_settings().tracking)
    monkeypatch.setenv("TINYBIRD_API_KEY", "p.key")
    assert make_sink(load_settings().tracking).name == "tinybird"


def test_a_local_sink_path_that_is_a_directory_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("IMAGE_SERVICE_TRACKING__LOCAL_PATH", str(tmp_path))
    with pytest.raises(ConfigError, match="tracking.local_path: Value error, is a directory"):
        load_settings()


@pytest.mark.parametrize(("variable", "value"), [
    ("TINYBIRD_API_URL", "127.0.0.1:7181"), ("IMAGE_SERVICE_ACCESS__VALIDATOR_URL", "auth.internal/check"),
    ("IMAGE_SERVICE_ENHANCE__BASE_URL", "not a url"),
])
def test_a_service_url_without_its_scheme_is_refused_at_start(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    """Accepted, it would fail only later, on every call, as a client error."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match="must be an http\\(s\\) URL"):
        load_settings()

