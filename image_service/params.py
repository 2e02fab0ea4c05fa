"""The request stage: turn a path and query string into validated, normalised image parameters.

Behaviour follows image.pollinations.ai where clients depend on it (booleans are true only for the
string "true", seed -1 means random, the pixel area is clamped per model keeping the aspect ratio),
and answers 400 with a clear message where the origin silently guessed.
"""

from __future__ import annotations

import hashlib
import math
import re
import secrets
import unicodedata
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import unquote_to_bytes, urlsplit

from .config import ModelSettings
from .errors import BadRequest, PromptTooLong, UnknownModel
from .tracking.rows import PRIVATE_PROMPT

RANDOM_PROMPT = "random_prompt"
DEFAULT_SEED = 42
MAX_SEED = 2**63 - 1
RANDOM_SEED_BOUND = 2**32
DEFAULT_NEGATIVE_PROMPT = "worst quality, blurry"
MAX_NEGATIVE_PROMPT_LENGTH = 1000
MAX_IMAGE_URLS = 4
MAX_IMAGE_URL_LENGTH = 2048
# Bytes one character can take in a URL: four of UTF-8, each percent-encoded as three.
URL_BYTES_PER_CHARACTER = 12
# aiohttp's default limit of a request line, left for the path's other parts and parameters.
REQUEST_LINE_REST = 8190
# The longest side any request may have after the area clamp, whatever the aspect ratio.
MAX_SIDE_RATIO = 2
# Larger requested sides are refused, not clamped: the clamp's float arithmetic overflows past
# ~1e308 (a 500), and no client means a side of two billion pixels.
MAX_REQUESTED_SIDE = 2**31 - 1
JPEG_QUALITY = {"low": 70, "medium": 85, "high": 92, "hd": 95}
DEFAULT_QUALITY = "medium"

# Control characters that are not whitespace (whitespace ones, tabs and line breaks, become spaces),
# and the bidirectional embeddings, overrides and isolates, which reorder how the rest of the prompt
# reads where it is shown (the feed, a filename).
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f\u202a-\u202e\u2066-\u2069]")
_WHITESPACE = re.compile(r"\s+")
SLUG_CHARS = 100
_SLUG_DROP = re.compile(r"[^a-z0-9]+")


@dataclass(frozen=True, slots=True)
class ImageParams:
    """Everything that decides the image; identity (token, referrer) deliberately lives elsewhere."""

    prompt: str
    model: str
    width: int
    height: int
    seed: int
    nologo: bool
    enhance: bool
    private: bool
    nofeed: bool
    safe: bool
    negative_prompt: str
    quality: str
    image: tuple[str, ...]

    @property
    def shows_logo(self) -> bool:
        return not (self.nologo or self.nofeed)

    @property
    def public_prompt(self) -> str:
        """The prompt as it may appear outside the process."""
        return PRIVATE_PROMPT if self.private else self.prompt

    def cache_key(self) -> str:
        """A full SHA-256 of every field that changes the bytes served (not `safe`: a policy)."""
        digest = hashlib.sha256()
        for value in (
            self.prompt, self.model, self.width, self.height, self.seed, self.shows_logo,
            self.enhance, self.private, self.negative_prompt, self.quality, "|".join(self.image),
        ):
            encoded = str(value).encode()
            digest.update(len(encoded).to_bytes(4, "big"))
            digest.update(encoded)
        return digest.hexdigest()

    def public_dict(self) -> dict[str, Any]:
        """Parameters as echoed to clients and written to EXIF: the texts (prompt, negative prompt,
        reference URLs) only when not private, as they often say the same private thing."""
        data = asdict(self)
        data["image"] = list(self.image)
        if self.private:
            data["prompt"] = data["negative_prompt"] = PRIVATE_PROMPT
            data["image"] = [PRIVATE_PROMPT for _ in self.image]
        return data

    def exif_dict(self, shows_logo: bool) -> dict[str, Any]:
        """What EXIF says made the image: only what the cache key covers, since every request with
        the same key is served these bytes (`nologo` true when the image has no logo: nologo or
        nofeed asked, or moderation left it off; not the policies `safe` and `nofeed`)."""
        data = self.public_dict()
        data["nologo"] = not shows_logo
        del data["safe"], data["nofeed"]
        return data


def normalise_prompt(raw: str) -> str:
    """Strip control characters and collapse whitespace, so equal-looking prompts share a cache entry."""
    text = unicodedata.normalize("NFC", raw)
    text = _CONTROL.sub("", text)
    return _WHITESPACE.sub(" ", text).strip()


def parse_bool(value: str | None) -> bool:
    return value is not None and value.strip().lower() == "true"


def _asked(query: Mapping[str, str], name: str) -> bool:
    """A privacy or safety flag fails closed: `true` under any spelling of its name, in any of its
    repetitions. A site that appends `&private=true` or `&safe=true` to a user's URL must not be
    undone by a `private=false` or `Safe` the user put first."""
    return any(key.lower() == name and parse_bool(value) for key, value in query.items())


def _parse_int(name: str, value: str) -> int:
    text = value.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        raise BadRequest(f"{name} must be an integer, got {value[:40]!r}") from None
    if not math.isfinite(number) or number != int(number):
        raise BadRequest(f"{name} must be an integer, got {value[:40]!r}")
    return int(number)


def clamp_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Scale both sides down by the same factor when the area exceeds max_side², as the origin does."""
    max_area = max_side * max_side
    if width * height > max_area:
        scale = math.sqrt(max_area / (width * height))
        width, height = max(1, math.floor(width * scale)), max(1, math.floor(height * scale))
    longest = max_side * MAX_SIDE_RATIO
    if max(width, height) > longest:
        scale = longest / max(width, height)
        width, height = max(1, math.floor(width * scale)), max(1, math.floor(height * scale))
    return width, height


def _parse_seed(value: str | None) -> int:
    if value is None or not value.strip():
        return DEFAULT_SEED
    seed = _parse_int("seed", value)
    if seed == -1:
        return secrets.randbelow(RANDOM_SEED_BOUND)
    if not 0 <= seed <= MAX_SEED:
        raise BadRequest(f"seed must be -1 (random) or between 0 and {MAX_SEED}, got {seed}")
    return seed


def draws_a_seed(query: Mapping[str, str]) -> bool:
    """Whether a valid request asks for a random seed (`-1`): its image is one draw of many."""
    value = query.get("seed")
    return value is not None and "-" in value and _parse_int("seed", value) == -1


def _parse_side(name: str, value: str | None, default: int) -> int:
    if value is None or not value.strip():
        return default
    side = _parse_int(name, value)
    if side <= 0:
        raise BadRequest(f"{name} must be a positive integer, got {side}")
    if side > MAX_REQUESTED_SIDE:
        given = value.strip()
        raise BadRequest(f"{name} must be at most {MAX_REQUESTED_SIDE}, got {given[:20]}{'...' if len(given) > 20 else ''}")
    return side


def _has_host(url: str) -> bool:
    """Whether an http(s) URL names a host at all: `http://` or `http://[::1` names none, and would
    still have split the cache on a backend that takes no references."""
    try:
        return bool(urlsplit(url).hostname)
    except ValueError:
        return False


def _parse_images(value: str | None) -> tuple[str, ...]:
    if not value:
        return ()
    urls = tuple(part.strip() for part in re.split(r"[|,]", value) if part.strip())
    if len(urls) > MAX_IMAGE_URLS:
        raise BadRequest(f"image accepts at most {MAX_IMAGE_URLS} URLs, got {len(urls)}")
    for url in urls:
        if len(url) > MAX_IMAGE_URL_LENGTH or not url.lower().startswith(("http://", "https://")) or not _has_host(url):
            raise BadRequest("image must be http(s) URLs separated by '|'")
    return urls


def longest_request_line(max_prompt_length: int) -> int:
    """Bytes in the request line of the longest valid request. The HTTP parser must accept it:
    at aiohttp's default (8,190 bytes, ~900 percent-encoded CJK characters) a legal prompt in a
    non-Latin script was refused before the service saw it, with no row and no JSON error."""
    text = (max_prompt_length + MAX_NEGATIVE_PROMPT_LENGTH) * URL_BYTES_PER_CHARACTER
    return text + MAX_IMAGE_URLS * MAX_IMAGE_URL_LENGTH * URL_BYTES_PER_CHARACTER + REQUEST_LINE_REST


def requested_model(query: Mapping[str, str], default_model: str) -> str:
    return (query.get("model") or default_model).strip()


def parse_params(
    raw_prompt: str,
    query: Mapping[str, str],
    models: Mapping[str, ModelSettings],
    default_model: str,
    max_prompt_length: int,
) -> ImageParams:
    """Validate one request; raises BadRequest (400) with a message naming the parameter."""
    prompt = normalise_prompt(raw_prompt) or RANDOM_PROMPT
    if len(prompt) > max_prompt_length:
        raise PromptTooLong(
            f"prompt is {len(prompt)} characters; the limit is {max_prompt_length}",
            limit=max_prompt_length,
        )

    model = requested_model(query, default_model)
    if model not in models:
        raise UnknownModel(
            f"unknown model {model[:60]!r}; valid models: {', '.join(sorted(models))}",
            validModels=sorted(models),
        )
    spec = models[model]
    width, height = clamp_size(
        _parse_side("width", query.get("width"), spec.default_side),
        _parse_side("height", query.get("height"), spec.default_side),
        spec.max_side,
    )

    quality = (query.get("quality") or DEFAULT_QUALITY).strip().lower()
    if quality not in JPEG_QUALITY:
        raise BadRequest(f"quality must be one of {', '.join(JPEG_QUALITY)}, got {quality[:20]!r}")

    # Blank is absent: a stored "" would come back from the image's own URL as the default.
    negative_prompt = normalise_prompt(query.get("negative_prompt") or "") or DEFAULT_NEGATIVE_PROMPT
    if len(negative_prompt) > MAX_NEGATIVE_PROMPT_LENGTH:
        raise BadRequest(f"negative_prompt is longer than {MAX_NEGATIVE_PROMPT_LENGTH} characters")

    private = _asked(query, "private")
    return ImageParams(
        prompt=prompt,
        model=model,
        width=width,
        height=height,
        seed=_parse_seed(query.get("seed")),
        nologo=parse_bool(query.get("nologo")),
        enhance=parse_bool(query.get("enhance")),
        private=private,
        nofeed=private or _asked(query, "nofeed"),
        safe=_asked(query, "safe"),
        negative_prompt=negative_prompt,
        quality=quality,
        image=_parse_images(query.get("image")),
    )


def _require_utf8(raw: str, part: str) -> None:
    try:
        unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(f"the {part} is not valid UTF-8 once percent-decoded") from None


# URLs longer than this are not memoised: popular URLs are short, and a memo of 4,096 URLs of the
# longest valid size (~130 KB each) held a gigabyte, filled by one client whose requests all failed.
MEMO_MAX_URL = 4096


def slug(prompt: str) -> str:
    """The filename stem: the prompt's first SLUG_CHARS characters, alphanumerics and dashes, lower case."""
    return _SLUG_DROP.sub("-", prompt[:SLUG_CHARS].lower()).strip("-") or "image"


class ParamsParser:
    """`parse_params` for one configuration, memoised per (prompt, query string).

    Popular URLs repeat; a hit skips validation and hashing. Requests that ask for a random seed
    are never memoised (each must draw its own).
    """

    def __init__(self, models: Mapping[str, ModelSettings], default_model: str, max_prompt_length: int,
                 memo_size: int = 4096) -> None:
        self._models = models
        self._default_model = default_model
        self._max_prompt_length = max_prompt_length
        self._memo: dict[tuple[str, str], tuple[ImageParams, str]] = {}
        self._memo_size = memo_size

    def known_model(self, query: Mapping[str, str]) -> str | None:
        """The model a request names (or the default), if it exists: a request refused for another
        parameter still counts against it."""
        model = requested_model(query, self._default_model)
        return model if model in self._models else None

    def parse(
        self, raw_prompt: str, query: Mapping[str, str], raw_path: str, query_string: str
    ) -> tuple[ImageParams, str]:
        """Validated parameters and their cache key; raises BadRequest like `parse_params`.
        The path and query string as sent key the memo (decoded, `a=x%26y` and `a=x%2526y` read
        alike, and the second request was served the first one's parameters), and must decode as
        UTF-8: what does not is kept as it came (`%C3%28` in a path) or replaced (in a query)."""
        memo_key = (raw_path, query_string)
        found = self._memo.get(memo_key) if len(raw_path) + len(query_string) <= MEMO_MAX_URL else None
        if found is not None:
            return found
        _require_utf8(raw_path, "path")
        _require_utf8(query_string, "query string")
        params = parse_params(raw_prompt, query, self._models, self._default_model, self._max_prompt_length)
        result = (params, params.cache_key())
        if not draws_a_seed(query) and len(raw_path) + len(query_string) <= MEMO_MAX_URL:
            if len(self._memo) >= self._memo_size:
                del self._memo[next(iter(self._memo))]
            self._memo[memo_key] = result
        return result
