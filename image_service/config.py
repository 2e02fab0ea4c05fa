"""Configuration: `config/*.toml` defaults, an optional TOML file, then environment variables.

Precedence, lowest first: `config/defaults.toml` and `config/models.toml`, the file given with
`--config`, then `IMAGE_SERVICE_<SECTION>__<KEY>` variables. Everything is validated once, when
built, and an error names the offending key so an operator can fix it without reading code.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

CONFIG_DIR = Path(os.environ.get("IMAGE_SERVICE_CONFIG_DIR", Path(__file__).resolve().parent.parent / "config"))
DEFAULT_FILES = ("defaults.toml", "models.toml")
# Credentials in a URL (redis://user:password@host) are never echoed in an error message.
_USERINFO = re.compile(r"//[^/@]*@")


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

    @model_validator(mode="after")
    def _default_fits(self) -> ModelSettings:
        if self.default_side > self.max_side:
            raise ValueError(f"default_side {self.default_side} exceeds max_side {self.max_side}")
        return self


class Settings(BaseSettings):
    """The whole configuration; one frozen object shared by every stage."""

    model_config = SettingsConfigDict(
        env_prefix="IMAGE_SERVICE_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    server: ServerSettings = ServerSettings()
    generation: GenerationSettings = GenerationSettings()
    cache: CacheSettings = CacheSettings()
    models: dict[str, ModelSettings] = Field(min_length=1)

    @model_validator(mode="after")
    def _default_model_exists(self) -> Settings:
        if self.generation.default_model not in self.models:
            raise ValueError(
                f"generation.default_model {self.generation.default_model!r} is not in models "
                f"({', '.join(sorted(self.models))})"
            )
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
        # Environment first: it overrides whatever the files (passed as init values) say.
        return (env_settings, init_settings)


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
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from None


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        shown = _USERINFO.sub("//***@", item["input"]) if isinstance(item["input"], str) else item["input"]
        got = f" (got {shown!r})" if item["type"] != "missing" and not isinstance(item["input"], dict) else ""
        lines.append(f"{key}: {item['msg']}{got}")
    return "; ".join(lines)


def load_settings(path: Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Build settings from the defaults, an optional file, the environment and explicit overrides.

    `overrides` (a nested dict, used by tests and embedding code) wins over the files but not over
    the environment, exactly like a `--config` file.
    """
    data: dict[str, Any] = {}
    for name in DEFAULT_FILES:
        data = _deep_merge(data, _read_toml(CONFIG_DIR / name))
    if path is not None:
        data = _deep_merge(data, _read_toml(Path(path)))
    if overrides:
        data = _deep_merge(data, overrides)
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration: {_describe(exc)}") from None
