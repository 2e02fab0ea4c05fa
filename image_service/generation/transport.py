"""HTTP plumbing shared by the network backends, and the checks every answer must pass.

Sessions carry the backend's connect and total timeouts; bodies are read against a byte limit;
aiohttp errors become `BackendError`s at this boundary (`raise ... from exc`). The decoding helpers
are synchronous and run in the CPU executor: an answer is accepted only if it is a JPEG, PNG or WebP
of exactly the requested size.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import orjson
from PIL import Image, UnidentifiedImageError

from ..config import BackendSettings
from .base import BackendError, BackendTimeout, NoCapacity, Refused

ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP"})
READ_CHUNK = 64 * 1024


def client_session(spec: BackendSettings) -> aiohttp.ClientSession:
    """A session whose every request is bounded by the backend's connect and total timeouts."""
    timeout = aiohttp.ClientTimeout(total=spec.timeout, connect=spec.connect_timeout, sock_connect=spec.connect_timeout)
    # trust_env=False: a proxy from the environment must not silently reroute backend traffic.
    return aiohttp.ClientSession(timeout=timeout, trust_env=False)


@asynccontextmanager
async def mapped_errors(what: str) -> AsyncIterator[None]:
    """Turn transport failures of a call to `what` into BackendErrors with a countable reason."""
    try:
        yield
    except BackendError:
        raise
    except aiohttp.ConnectionTimeoutError as exc:
        raise BackendTimeout(f"could not connect to {what} in time", "connect_timeout") from exc
    except TimeoutError as exc:  # aiohttp's total/read timeouts subclass TimeoutError
        raise BackendTimeout(f"{what} did not answer in time", "timeout") from exc
    except aiohttp.ClientConnectorError as exc:
        raise BackendError(f"could not connect to {what}", "connect") from exc
    except aiohttp.ClientPayloadError as exc:
        raise BackendError(f"{what} sent a broken body", "broken_body") from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise BackendError(f"the connection to {what} failed ({type(exc).__name__})", "connection") from exc


# Statuses with which a backend refuses a request for what it asks, not for its own state.
REFUSALS = frozenset({400, 413, 414, 422, 451})


def check_status(response: aiohttp.ClientResponse, what: str) -> None:
    if response.status == 429:
        raise NoCapacity(f"{what} is rate limiting (HTTP 429)", "rate_limited")
    if response.status in REFUSALS:
        raise Refused(f"{what} refused this request (HTTP {response.status})", "refused")
    if response.status >= 400:
        raise BackendError(f"{what} answered HTTP {response.status}", "http_status")


async def read_limited(response: aiohttp.ClientResponse, limit: int, what: str) -> bytes:
    """The body, or BackendError("oversized") as soon as it exceeds `limit` bytes."""
    declared = response.content_length
    if declared is not None and declared > limit:
        raise BackendError(f"{what} sent {declared} bytes; the limit is {limit}", "oversized")
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(READ_CHUNK):
        size += len(chunk)
        if size > limit:
            raise BackendError(f"{what} sent more than {limit} bytes", "oversized")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(body: bytes, what: str) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BackendError(f"{what} answered malformed JSON", "malformed_json") from None


def decode_base64(text: object, what: str) -> bytes:
    if not isinstance(text, str) or not text:
        raise BackendError(f"{what} answered JSON without an image", "malformed_json")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BackendError(f"{what} answered an image that is not valid base64", "not_image") from None


# By how much a side may differ from the request and still be the image asked for: less than this
# many pixels, and than this share of the side (a 1x1 answer to 32x32 is no rounding).
ROUNDING_SLACK = 64
ROUNDING_SHARE = 0.25


def _near(answered: int, asked: int) -> bool:
    return abs(answered - asked) < min(ROUNDING_SLACK, ROUNDING_SHARE * asked)


def decode_image(data: bytes, width: int, height: int, what: str) -> Image.Image:
    """An RGB image of exactly width×height, or BackendError("not_image" / "wrong_dimensions").

    Diffusion models work in multiples of 8, 16 or 64 pixels, and the area clamp asks for any size
    (1448x724): an answer near each side (`_near`) is the image asked for, resized. A
    1001-wide request used to fail, and two of them opened the backend's breaker for everyone."""
    try:
        with Image.open(io.BytesIO(data)) as opened:
            if opened.format not in ALLOWED_FORMATS:
                raise BackendError(f"{what} answered an unsupported image format ({opened.format})", "not_image")
            if not (_near(opened.width, width) and _near(opened.height, height)):
                raise BackendError(
                    f"{what} answered a {opened.width}x{opened.height} image, not the requested {width}x{height}",
                    "wrong_dimensions",
                )
            opened.load()
            image = opened.convert("RGB")
            return image if image.size == (width, height) else image.resize((width, height), Image.Resampling.LANCZOS)
    except BackendError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning,
            OSError, SyntaxError, ValueError):
        raise BackendError(f"{what} answered something that is not a readable image", "not_image") from None
