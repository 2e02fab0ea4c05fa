"""Configuration: `config/*.toml` defaults, an optional TOML file, then environment variables.

Precedence, lowest first: `config/defaults.toml` and `config/models.toml`, the file given with
`--config`, then `IMAGE_SERVICE_<SECTION>__<KEY>` variables. Everything is validated once, when
built, and an error names the offending key so an operator can fix it without reading code.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal, get_args, get_origin
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, InitSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

CONFIG_DIR = Path(os.environ.get("IMAGE_SERVICE_CONFIG_DIR", Path(__file__).resolve().parent.parent / "config"))
DEFAULT_FILES = ("defaults.toml", "models.toml", "tiers.toml", "access.toml", "moderation.toml")
# The seed's variable names, honoured as they are (IMAGE_SERVICE_TRACKING__* still wins).
SEED_ENV = {"TINYBIRD_API_URL": "api_url", "TINYBIRD_API_KEY": "api_key"}
ENV_PREFIX = "IMAGE_SERVICE_"
# The flags of the command being run, for the settings source that ranks above the environment.
_COMMAND_LINE: ContextVar[dict[str, Any] | None] = ContextVar("image_service_command_line", default=None)
# What a URL in an error message must not show: its credentials (a password may hold '@' and '/':
# they run to the last '@'), and its query (a token, a signature).
_USERINFO = re.compile(r"//\S*@")
_URL_QUERY = re.compile(r"(://[^\s?#]*)[?#]\S*")


class ConfigError(ValueError):
    """Raised when configuration cannot be loaded; the message names the bad key."""


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    log_format: Literal["console", "json"] = "console"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    max_prompt_length: int = Field(2000, ge=1, le=100_000)
    shutdown_timeout: float = Field(30.0, gt=0)
    cpu_workers: int = Field(0, ge=0, le=256)


class GenerationSettings(_Section):
    default_model: str = "procedural"
    timeout: float = Field(60.0, gt=0)
    # Images being generated, moderated and encoded at once in this process, over every client and backend.
    max_concurrent: int = Field(32, ge=1)
    # Seconds of `timeout` (at most half of it) kept for a model's fallbacks when its primary does not answer.
    fallback_reserve: float = Field(10.0, ge=0)


class CacheSettings(_Section):
    backend: Literal["memory", "redis"] = "memory"
    max_bytes: int = Field(256 * 1024 * 1024, gt=0)
    ttl: int = Field(86400, ge=0)
    key_prefix: str = "image_service:"
    redis_url: str = "redis://127.0.0.1:6379/0"
    local_cache: bool = True
    redis_timeout: float = Field(0.5, gt=0, le=60)
    redis_backoff_max: float = Field(15.0, gt=0)
    lock_ttl: float = Field(10.0, gt=0)
    lock_wait: float = Field(90.0, gt=0)

    @field_validator("redis_url")
    @classmethod
    def _redis_url_parses(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("redis", "rediss") or not parts.hostname:
            raise ValueError("must look like redis://host:port/db (or rediss:// for TLS)")
        try:
            _ = parts.port
        except ValueError:
            raise ValueError("has a malformed port") from None
        db = parts.path.strip("/")
        if db and not db.isdigit():
            raise ValueError(f"database must be a number, got {db!r}")
        return value


class ModelSettings(_Section):
    backend: str
    description: str = ""
    max_side: int = Field(1280, ge=16, le=8192)
    default_side: int = Field(1024, ge=16, le=8192)
    tier: str = "anonymous"
    enhance: bool = False
    # Generation routing (issue 8): backends tried after `backend` fails, in order; the model name the
    # backend is asked for (empty = this model's own name); what one generated image costs.
    fallback: tuple[str, ...] = ()
    backend_model: str = ""
    cost: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _default_fits(self) -> ModelSettings:
        if self.default_side > self.max_side:
            raise ValueError(f"default_side {self.default_side} exceeds max_side {self.max_side}")
        return self

    @property
    def chain(self) -> tuple[str, ...]:
        """The backends tried, in order."""
        return (self.backend, *self.fallback)


def _http_url(value: str) -> str:
    """An http(s) URL with a host, checked at start: a URL without its scheme otherwise fails only
    later, on every call, as a client error the operator has to trace back here."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http(s) URL such as https://host")
    if parts.username is not None or parts.password is not None:
        # The client sends its own Authorization header: with credentials in the URL too, aiohttp
        # refuses every call (telemetry rows were lost that way), and the URL gets logged.
        raise ValueError("must not hold credentials (user:password@); the key has a setting of its own")
    return value


def _optional_http_url(value: str) -> str:
    """`_http_url`, or empty: the feature it names is off."""
    return _http_url(value) if value else value


class TrackingSettings(_Section):
    """Telemetry to Tinybird; `api_url`/`api_key` also come from TINYBIRD_API_URL / TINYBIRD_API_KEY."""

    enabled: bool = True
    api_url: str = "https://api.europe-west2.gcp.tinybird.co"
    api_key: SecretStr = SecretStr("")
    datasource: str = Field("pollinations_events", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    local_path: Path = Path("var/events.ndjson")
    local_max_bytes: int = Field(256 * 1024**2, ge=0)
    local_keep: int = Field(3, ge=1)
    spool_dir: Path = Path("var/spool")
    spool_max_bytes: int = Field(1024**3, gt=0)
    queue_size: int = Field(100_000, gt=0)
    batch_rows: int = Field(5000, gt=0)
    batch_bytes: int = Field(8 * 1024 * 1024, gt=0, le=10 * 1024 * 1024)
    max_wait: float = Field(1.0, gt=0, le=60)
    timeout: float = Field(5.0, gt=0)
    max_retries: int = Field(6, ge=0)
    backoff_base: float = Field(0.5, gt=0)
    backoff_cap: float = Field(30.0, gt=0)
    breaker_failures: int = Field(3, ge=1)
    breaker_cooldown: float = Field(30.0, gt=0)
    max_requests_per_second: float = Field(100.0, gt=0, le=1000)
    shutdown_timeout: float = Field(10.0, gt=0)
    environment: str = "development"
    encoder_process: bool = True
    encoder_process_min_events: int = Field(128, ge=1)
    encoder_process_delivers: bool = True

    _api_url = field_validator("api_url")(_http_url)

    @field_validator("local_path", "spool_dir", mode="before")
    @classmethod
    def _path_given(cls, value: Any) -> Any:
        """An empty variable would be ".": the sink would write into a directory, the spool into the working one."""
        if isinstance(value, str) and not value.strip():
            raise ValueError("must be a path, not empty")
        return value

    @field_validator("local_path")
    @classmethod
    def _a_file(cls, value: Path) -> Path:
        if value.is_dir():
            raise ValueError("is a directory; the local sink needs a file's path")
        return value

    @model_validator(mode="after")
    def _batch_fits_queue(self) -> TrackingSettings:
        if self.batch_rows > self.queue_size:
            raise ValueError(f"batch_rows {self.batch_rows} exceeds queue_size {self.queue_size}")
        return self


BackendType = Literal["embedded", "openai", "workers", "pollinations"]


class BackendSettings(_Section):
    """One named generation backend; models name it in `backend` or `fallback`."""

    type: BackendType
    # Shown as `provider` in telemetry; empty = the type's own label.
    provider: str = ""
    # openai and pollinations: where the server listens (http or https, no trailing path for pollinations).
    base_url: str = ""
    # The name of the environment variable holding the API key; keys are never read from files.
    api_key_env: str = ""
    # openai: request paths, "bearer" (OpenAI) or "api-key" (Azure) authentication, Azure's api-version.
    path: str = "/v1/images/generations"
    edits_path: str = "/v1/images/edits"
    auth_header: Literal["bearer", "api-key"] = "bearer"
    api_version: str = ""
    # workers: the `type` registered workers announce; empty = the backend's own name.
    worker_type: str = ""
    # workers: how many workers one request may try before giving up.
    max_attempts: int = Field(2, ge=1, le=10)
    # workers: denoising steps sent to the worker.
    steps: int = Field(4, ge=1, le=200)
    connect_timeout: float = Field(5.0, gt=0)
    timeout: float = Field(50.0, gt=0)
    max_body_bytes: int = Field(32 * 1024 * 1024, gt=0)
    # Consecutive failures that open the circuit breaker, and seconds it stays open before one trial.
    breaker_failures: int = Field(5, ge=1)
    breaker_reset: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _needs_base_url(self) -> BackendSettings:
        if self.type in ("openai", "pollinations") and not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"a {self.type} backend needs base_url starting with http:// or https://")
        if self.base_url:
            _http_url(self.base_url)
        return self


class WorkerSettings(_Section):
    """GPU workers that announce themselves with POST /register."""

    # The environment variable holding the shared registration secret; unset = registration refused.
    secret_env: str = "IMAGE_SERVICE_WORKER_SECRET"
    heartbeat_timeout: float = Field(45.0, gt=0)
    # Concurrent generations per worker unless it announces its own `concurrency`.
    concurrency: int = Field(1, ge=1, le=256)
    max_workers: int = Field(256, ge=1)
    # A worker failing this many times in a row rests this many seconds (used only if all others rest).
    rest_after_failures: int = Field(3, ge=1)
    rest_seconds: float = Field(30.0, gt=0)


class ReferenceSettings(_Section):
    """Fetching reference images (`image=` URLs) for backends that take them."""

    # Allow loopback, private, link-local and other non-public addresses (only for trusted networks).
    allow_private: bool = False
    max_bytes: int = Field(10 * 1024 * 1024, gt=0)
    timeout: float = Field(10.0, gt=0)
    max_redirects: int = Field(3, ge=0, le=10)
# Tiers from least to most privileged; a model's `tier` is the least one that may use it.
TIER_ORDER = ("anonymous", "seed", "flower", "nectar")


class TierSettings(_Section):
    """Per-client limits of one tier: at most `concurrency` generations at once, starts at least
    `interval` seconds apart, and at most `queue_depth` requests held (running plus waiting)."""

    concurrency: int = Field(ge=1, le=10_000)
    interval: float = Field(ge=0, le=3600)
    queue_depth: int = Field(ge=1, le=100_000)

    @model_validator(mode="after")
    def _depth_holds_the_running(self) -> TierSettings:
        if self.queue_depth < self.concurrency:
            raise ValueError(f"queue_depth {self.queue_depth} is below concurrency {self.concurrency}")
        return self


class TiersSettings(_Section):
    anonymous: TierSettings = TierSettings(concurrency=1, interval=5.0, queue_depth=5)
    seed: TierSettings = TierSettings(concurrency=3, interval=3.0, queue_depth=15)
    flower: TierSettings = TierSettings(concurrency=6, interval=1.0, queue_depth=30)
    nectar: TierSettings = TierSettings(concurrency=20, interval=0.0, queue_depth=100)

    def limits(self, tier: str) -> TierSettings:
        return getattr(self, tier) if tier in TIER_ORDER else self.anonymous


class AccessSettings(_Section):
    # Token file (relative paths are under the config directory): SHA-256 of a token → account.
    tokens_file: str = "tokens.toml"
    # When set, tokens are validated by this HTTP service instead of the file.
    validator_url: str = ""
    validator_timeout: float = Field(2.0, gt=0, le=60)
    validator_cache_ttl: float = Field(300.0, ge=0)
    validator_cache_size: int = Field(10_000, ge=1)
    # Peers whose X-Forwarded-For is believed (addresses or CIDR networks).
    trusted_proxies: tuple[str, ...] = ()
    # Bits of an IPv6 client address that name the client (its queue, its blocks, its feed streams).
    ipv6_prefix: int = Field(64, ge=1, le=128)
    # Referrer domain (and its subdomains) → tier, for requests without a token.
    referrers: dict[str, str] = {}

    _validator_url = field_validator("validator_url")(_optional_http_url)

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address or network") from None
        return value

    @field_validator("referrers")
    @classmethod
    def _referrer_tiers(cls, value: dict[str, str]) -> dict[str, str]:
        for domain, tier in value.items():
            if tier not in TIER_ORDER:
                raise ValueError(f"referrer {domain!r} names unknown tier {tier!r} (tiers: {', '.join(TIER_ORDER)})")
        return {domain.lower().strip("."): tier for domain, tier in value.items()}


class EnhanceSettings(_Section):
    # OpenAI-compatible server: POST {base_url}/v1/chat/completions. Empty = enhancement is off.
    base_url: str = ""
    model: str = ""
    api_key: SecretStr = SecretStr("")
    timeout: float = Field(5.0, gt=0, le=60)
    system_prompt: str = (
        "Rewrite the user's image prompt into one vivid, detailed image description. "
        "Answer with the description only."
    )
    # Referrer domains whose prompts are rewritten with `transform_template` (was_transformed).
    transform_referrers: tuple[str, ...] = ()
    transform_template: str = "{prompt}"

    _base_url = field_validator("base_url")(_optional_http_url)

    @field_validator("transform_template")
    @classmethod
    def _has_prompt(cls, value: str) -> str:
        if "{prompt}" not in value:
            raise ValueError("must contain {prompt}")
        return value


class FeedSettings(_Section):
    # Items replayed to a new subscriber.
    replay: int = Field(20, ge=0, le=1000)
    # Items buffered per subscriber; a subscriber that falls further behind is dropped.
    subscriber_buffer: int = Field(64, ge=1, le=10_000)
    max_subscribers: int = Field(1000, ge=1)
    # Streams one client (address, or IPv6 network) may hold at once; more get 429.
    max_subscribers_per_client: int = Field(10, ge=1)
    # Seconds between SSE comment lines that keep proxies from closing an idle stream.
    heartbeat: float = Field(15.0, gt=0)
    # Seconds one write to a subscriber may take before it is dropped.
    write_timeout: float = Field(10.0, gt=0)


# NudeNet classes whose detection can make an image mature (see config/moderation.toml).
NUDENET_CLASSES = frozenset({
    "female_genitalia_covered", "female_genitalia_exposed", "female_breast_covered", "female_breast_exposed",
    "buttocks_covered", "buttocks_exposed", "anus_covered", "anus_exposed", "belly_covered", "belly_exposed",
    "feet_covered", "feet_exposed", "armpits_covered", "armpits_exposed", "male_genitalia_exposed",
    "male_breast_exposed", "face_female", "face_male",
})


class TermLists(_Section):
    """Prompt word lists by category, each a mapping language → terms."""

    minor: dict[str, list[str]] = {}
    sexual: dict[str, list[str]] = {}
    minor_sexual: dict[str, list[str]] = {}


class ModerationSettings(_Section):
    image: Literal["classifiers", "none"] = "classifiers"
    nudenet_model: Path | None = None
    age_model_dir: Path | None = None
    face_threshold: float = Field(0.4, ge=0, le=1)
    min_face_side: int = Field(24, ge=2)
    minor_probability: float = Field(0.5, gt=0, le=1)
    backend_child_score: float = 0.0
    safe_refuses_sexual_prompt: bool = True
    violation_threshold: float = Field(3.0, gt=0)
    violation_half_life: float = Field(600.0, gt=0)
    violation_max_clients: int = Field(100_000, ge=1)
    thresholds: dict[str, float] = {}
    terms: TermLists = TermLists()

    @model_validator(mode="before")
    @classmethod
    def _empty_path_is_bundled(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = {k: (None if k in ("nudenet_model", "age_model_dir") and v == "" else v) for k, v in data.items()}
        return data

    @model_validator(mode="after")
    def _known_classes(self) -> ModerationSettings:
        unknown = set(self.thresholds) - NUDENET_CLASSES
        if unknown:
            raise ValueError(
                f"thresholds name unknown NudeNet classes {sorted(unknown)}; known: {', '.join(sorted(NUDENET_CLASSES))}"
            )
        bad = {k: v for k, v in self.thresholds.items() if not 0 < v <= 1}
        if bad:
            raise ValueError(f"thresholds must be in (0, 1], got {bad}")
        return self


class Settings(BaseSettings):
    """The whole configuration; one frozen object shared by every stage."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", frozen=True
    )

    server: ServerSettings = ServerSettings()
    generation: GenerationSettings = GenerationSettings()
    cache: CacheSettings = CacheSettings()
    tracking: TrackingSettings = TrackingSettings()
    models: dict[str, ModelSettings] = Field(min_length=1)
    backends: dict[str, BackendSettings] = {"embedded": BackendSettings(type="embedded")}
    workers: WorkerSettings = WorkerSettings()
    references: ReferenceSettings = ReferenceSettings()
    tiers: TiersSettings = TiersSettings()
    access: AccessSettings = AccessSettings()
    enhance: EnhanceSettings = EnhanceSettings()
    feed: FeedSettings = FeedSettings()
    moderation: ModerationSettings = ModerationSettings()

    def backends_in_use(self) -> set[str]:
        """The backends some model names, as primary or fallback."""
        return {name for spec in self.models.values() for name in spec.chain}

    @model_validator(mode="after")
    def _default_model_exists(self) -> Settings:
        if self.generation.default_model not in self.models:
            raise ValueError(
                f"generation.default_model {self.generation.default_model!r} is not in models "
                f"({', '.join(sorted(self.models))})"
            )
        return self

    @model_validator(mode="after")
    def _model_backends_exist(self) -> Settings:
        for name, spec in self.models.items():
            for backend in spec.chain:
                if backend not in self.backends:
                    raise ValueError(
                        f"models.{name} names backend {backend!r}, which is not in backends "
                        f"({', '.join(sorted(self.backends))})"
                    )
        return self

    @model_validator(mode="after")
    def _model_tiers_exist(self) -> Settings:
        for name, spec in self.models.items():
            if spec.tier not in TIER_ORDER:
                raise ValueError(f"models.{name}.tier {spec.tier!r} is not one of {', '.join(TIER_ORDER)}")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The command line first, then the environment, then whatever the files (passed as init
        # values) say: a flag typed for this run beats an exported variable.
        return (InitSettingsSource(settings_cls, init_kwargs=_COMMAND_LINE.get() or {}), env_settings, init_settings)


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"configuration file not found: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"configuration file {path} cannot be read: {exc.strerror or exc}") from None


def _redacted(text: str) -> str:
    return _URL_QUERY.sub(r"\1?***", _USERINFO.sub("//***@", text))


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        shown = item["type"] != "missing" and not isinstance(item["input"], dict) and "key" not in key
        value = _redacted(item["input"]) if isinstance(item["input"], str) else item["input"]
        got = f" (got {value!r})" if shown else ""
        lines.append(f"{key}: {item['msg']}{got}")
    return "; ".join(lines)


def _check_variable_names() -> None:
    """A misspelt section (IMAGE_SERVICE_CAHCE__BACKEND) would be ignored without a word, where a
    misspelt key is refused: refuse it too, and a setting's name with one underscore where two
    belong (IMAGE_SERVICE_SERVER_PORT), which pydantic-settings never reads."""
    for name in os.environ:
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX):]
        if "__" in rest:
            section = rest.split("__", 1)[0].lower()
            if section not in Settings.model_fields:
                raise ConfigError(
                    f"{name} names no configuration section {section!r} (sections: {', '.join(Settings.model_fields)})"
                )
            continue
        for section, field in Settings.model_fields.items():
            prefix = f"{section.upper()}_"
            key = rest[len(prefix):]
            if rest.startswith(prefix) and key.lower() in getattr(field.annotation, "model_fields", {}):
                raise ConfigError(f"{name} is read by nothing: the setting {section}.{key.lower()} "
                                  f"is {ENV_PREFIX}{section.upper()}__{key} (two underscores)")


def _annotation_of(path: list[str]) -> Any:
    """The type of the setting an environment variable's parts name (None if they name none)."""
    annotation: Any = Settings
    for part in path:
        if get_origin(annotation) is dict:  # a table of named entries (models, backends): the part names one
            annotation = get_args(annotation)[1]
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel) and part in annotation.model_fields:
            annotation = annotation.model_fields[part].annotation
        else:
            return None
    return annotation


def _variables_not_json() -> list[str]:
    """The IMAGE_SERVICE_* variables for a list or table whose value is not JSON: pydantic-settings
    names only the section, and the operator has to find the variable."""
    named = []
    for name, value in sorted(os.environ.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        annotation = _annotation_of(name[len(ENV_PREFIX):].lower().split("__"))
        origin = get_origin(annotation) or annotation
        collection = origin in (list, tuple, dict, set, frozenset) or (
            isinstance(origin, type) and issubclass(origin, BaseModel)
        )
        if collection:
            try:
                json.loads(value)
            except ValueError:
                named.append(name)
    return named


def load_settings(
    path: Path | None = None, overrides: dict[str, Any] | None = None, command_line: dict[str, Any] | None = None
) -> Settings:
    """Build settings from the defaults, an optional file, the environment and explicit overrides.

    `overrides` (a nested dict, used by tests and embedding code) wins over the files but not over
    the environment, exactly like a `--config` file. `command_line` (flags such as `--port`) wins
    over everything.
    """
    data: dict[str, Any] = {}
    for name in DEFAULT_FILES:
        data = _deep_merge(data, _read_toml(CONFIG_DIR / name))
    if path is not None:
        data = _deep_merge(data, _read_toml(Path(path)))
    seed_env = {key: os.environ[name] for name, key in SEED_ENV.items() if os.environ.get(name)}
    if seed_env:
        data = _deep_merge(data, {"tracking": seed_env})
    if overrides:
        data = _deep_merge(data, overrides)
    _check_variable_names()
    token = _COMMAND_LINE.set(command_line)
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration: {_describe(exc)}") from None
    except SettingsError as exc:  # an environment variable that is not the JSON a list or table needs
        named = _variables_not_json() or [str(exc)]
        raise ConfigError(
            f"invalid configuration: {', '.join(named)}: lists and tables take JSON, such as "
            '["10.0.0.1"] or {"example.org": "seed"}'
        ) from None
    finally:
        _COMMAND_LINE.reset(token)
