"""The request stage: parsing, defaults, clamps and the cache key."""

from __future__ import annotations

import math
from typing import Any
from urllib.parse import quote

import pytest

from image_service.config import load_settings
from image_service.errors import BadRequest, PromptTooLong, UnknownModel
from image_service.params import (
    DEFAULT_NEGATIVE_PROMPT,
    MAX_IMAGE_URL_LENGTH,
    MAX_IMAGE_URLS,
    MAX_NEGATIVE_PROMPT_LENGTH,
    ImageParams,
    ParamsParser,
    clamp_size,
    longest_request_line,
    parse_params,
)

SETTINGS = load_settings(overrides={"models": {"small": {"backend": "embedded", "max_side": 512, "default_side": 256}}})


def parse(prompt: str = "a fox", **query: str) -> ImageParams:
    return parse_params(prompt, query, SETTINGS.models, SETTINGS.generation.default_model, 100)


class TestDefaults:
    def test_missing_parameters_take_the_documented_defaults(self) -> None:
        """Width and height default to the model's side, seed 42, quality medium, flags off."""
        params = parse()
        assert (params.model, params.width, params.height, params.seed) == ("procedural", 1024, 1024, 42)
        assert params.quality == "medium" and params.negative_prompt == DEFAULT_NEGATIVE_PROMPT
        assert not any((params.nologo, params.enhance, params.private, params.nofeed, params.safe))
        assert params.image == ()

    def test_empty_prompt_becomes_random_prompt(self) -> None:
        """An empty or blank path segment is the origin's `random_prompt`."""
        assert parse("").prompt == "random_prompt"
        assert parse("  \t ").prompt == "random_prompt"

    def test_each_model_has_its_own_default_side(self) -> None:
        """A model's default_side applies when width and height are absent."""
        assert (parse(model="small").width, parse(model="small").height) == (256, 256)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("true", True), ("TRUE", True), (" True ", True), ("false", False), ("1", False), ("yes", False), ("", False)],
)
def test_booleans_are_true_only_for_the_string_true(value: str, expected: bool) -> None:
    """Like the origin: `true` in any case; anything else is false, never an error."""
    assert parse(nologo=value).nologo is expected


class TestSizes:
    @pytest.mark.parametrize(
        ("width", "height", "max_side", "expected"),
        [
            (512, 384, 1280, (512, 384)),
            (2000, 2000, 1000, (1000, 1000)),
            (4000, 1000, 1000, (2000, 500)),
            (3000, 2000, 1280, (1567, 1045)),
            (100000, 1, 1000, (2000, 1)),
        ],
    )
    def test_area_above_max_side_squared_scales_down_keeping_aspect_ratio(
        self, width: int, height: int, max_side: int, expected: tuple[int, int]
    ) -> None:
        """Both sides scale by sqrt(max²/area), floored; no side exceeds twice max_side."""
        got = clamp_size(width, height, max_side)
        assert got == expected
        assert got[0] * got[1] <= max_side * max_side
        assert math.isclose(got[0] / got[1], width / height, rel_tol=0.01) or min(got) == 1

    def test_model_max_side_applies(self) -> None:
        """The clamp uses the requested model's max_side."""
        params = parse(model="small", width="1024", height="1024")
        assert (params.width, params.height) == (512, 512)

    def test_integral_floats_are_accepted(self) -> None:
        """`512.0` is a width a JavaScript client may send."""
        assert parse(width="512.0").width == 512


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"width": "abc"}, "width must be an integer"),
        ({"height": "12.5"}, "height must be an integer"),
        ({"width": "0"}, "width must be a positive integer"),
        ({"height": "-5"}, "height must be a positive integer"),
        ({"width": "nan"}, "width must be an integer"),
        ({"width": "inf"}, "width must be an integer"),
        ({"seed": "x"}, "seed must be an integer"),
        ({"seed": "-2"}, "seed must be -1"),
        ({"seed": str(2**64)}, "seed must be -1"),
        ({"quality": "ultra"}, "quality must be one of"),
        ({"image": "file:///etc/passwd"}, "image must be http(s)"),
        ({"image": "http://"}, "image must be http(s)"),
        ({"image": "https://example.com/a.png|http://[::1"}, "image must be http(s)"),
        ({"image": "|".join(f"http://x/{i}" for i in range(5))}, "at most 4"),
        ({"width": "9" * 5000}, "width must be an integer"),
        ({"width": "1" + "0" * 4000}, "width must be at most 2147483647"),
        ({"height": "3e9"}, "height must be at most 2147483647"),
    ],
)
def test_garbage_values_are_rejected_with_a_message_naming_the_parameter(query: dict[str, str], message: str) -> None:
    """A value that cannot be understood is a 400 that says which parameter and why."""
    with pytest.raises(BadRequest, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse(**query)


def test_unknown_model_lists_the_valid_ones() -> None:
    """The error names every model the client could have asked for."""
    with pytest.raises(UnknownModel) as caught:
        parse(model="flux")
    assert "procedural" in caught.value.message and "small" in caught.value.message
    assert caught.value.details["validModels"] == ["procedural", "small"]


def test_prompt_over_the_limit_is_rejected() -> None:
    """Prompts are capped; the error states the limit."""
    with pytest.raises(PromptTooLong, match="limit is 100"):
        parse("x" * 101)


class TestSeed:
    def test_minus_one_picks_a_random_seed_below_2_pow_32(self) -> None:
        """seed=-1 is random per request, as clients of the origin expect."""
        seeds = {parse(seed="-1").seed for _ in range(20)}
        assert len(seeds) > 1 and all(0 <= s < 2**32 for s in seeds)

    def test_explicit_seed_is_kept(self) -> None:
        assert parse(seed="7").seed == 7


class TestPrivacyFlags:
    def test_private_implies_nofeed(self) -> None:
        """A private image never reaches the public feed."""
        params = parse(private="true")
        assert params.private and params.nofeed

    def test_private_prompt_is_hidden_in_public_views(self) -> None:
        """public_prompt and public_dict never carry the private prompt."""
        params = parse("my secret", private="true")
        assert params.public_prompt == "[PRIVATE]"
        assert "my secret" not in str(params.public_dict())

    def test_logo_is_shown_unless_nologo_or_nofeed(self) -> None:
        assert parse().shows_logo
        assert not parse(nologo="true").shows_logo
        assert not parse(nofeed="true").shows_logo


class TestCacheKey:
    def test_key_is_a_full_sha256(self) -> None:
        assert len(parse().cache_key()) == 64

    @pytest.mark.parametrize(
        "change",
        [{"model": "small"}, {"width": "500"}, {"seed": "8"}, {"nologo": "true"}, {"private": "true"},
         {"quality": "hd"}, {"negative_prompt": "dark"}, {"enhance": "true"}, {"image": "http://a/b.png"}],
    )
    def test_every_output_changing_parameter_changes_the_key(self, change: dict[str, Any]) -> None:
        """Two requests that can produce different bytes never share an entry."""
        assert parse(**change).cache_key() != parse().cache_key()

    def test_identity_and_policy_fields_do_not_change_the_key(self) -> None:
        """token, referrer and safe do not split the cache."""
        assert parse(token="t", referrer="r", safe="true").cache_key() == parse().cache_key()

    def test_prompt_is_normalised_before_keying(self) -> None:
        """Control characters and repeated whitespace do not create new entries."""
        assert parse(" a \x00 fox\n").cache_key() == parse("a fox").cache_key()

    def test_control_characters_are_stripped_and_line_breaks_are_spaces(self) -> None:
        """As on the origin: 'a%00b' is 'ab', not two words; a tab or line break still separates words."""
        assert [parse(raw).prompt for raw in ("a\x00b\x7f\x9bc", "a\tb\r\nc\x85d", "\x1b[31mred")] == [
            "abc", "a b c d", "[31mred"]

    def test_bidi_overrides_are_stripped_but_joiners_kept(self) -> None:
        """An override would make the feed show the prompt in another order; a zero-width joiner is
        part of an emoji (a family) and a non-joiner part of Persian words."""
        assert parse("cat \u202egod\u202c").prompt == "cat god"
        assert parse("\u2067a\u2069 b").prompt == "a b"
        assert parse("👨\u200d👩\u200d👧 and \u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645").prompt == (
            "👨\u200d👩\u200d👧 and \u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645")

    def test_fields_cannot_run_into_each_other(self) -> None:
        """Length-prefixed hashing: moving text between fields changes the key."""
        assert parse("ab", negative_prompt="c").cache_key() != parse("a", negative_prompt="bc").cache_key()


def test_the_longest_valid_request_fits_the_http_parser_line() -> None:
    """Every character of prompt, negative prompt and reference URLs may take 12 bytes on the wire
    (four UTF-8 bytes, each percent-encoded): aiohttp's plain-text 400 must never meet a valid request."""
    emoji = quote("😀")
    images = "|".join("http://example.com/" + "😀" * (MAX_IMAGE_URL_LENGTH - 19) for _ in range(MAX_IMAGE_URLS))
    line = (f"GET /prompt/{emoji * 2000}?negative_prompt={emoji * MAX_NEGATIVE_PROMPT_LENGTH}&image={quote(images)}"
            "&width=1024&height=1024&seed=42&model=procedural&nologo=true&private=true&enhance=true&safe=true HTTP/1.1")
    assert len(line) <= longest_request_line(2000)


class TestParamsParser:
    def parser(self) -> ParamsParser:
        return ParamsParser(SETTINGS.models, SETTINGS.generation.default_model, 100)

    def test_repeated_url_returns_the_same_params_and_key(self) -> None:
        parser = self.parser()
        first = parser.parse("a fox", {"width": "64"}, "/prompt/a%20fox", "width=64")
        assert parser.parse("a fox", {"width": "64"}, "/prompt/a%20fox", "width=64") is first
        assert first[1] == first[0].cache_key()

    def test_random_seed_is_drawn_for_every_request(self) -> None:
        """seed=-1 must never be served from the memo."""
        parser = self.parser()
        seeds = {parser.parse("a fox", {"seed": "-1"}, "/prompt/a%20fox", "seed=-1")[0].seed for _ in range(10)}
        assert len(seeds) > 1

    def test_bad_input_is_rejected_every_time(self) -> None:
        parser = self.parser()
        for _ in range(2):
            with pytest.raises(BadRequest):
                parser.parse("a fox", {"width": "x"}, "/prompt/a%20fox", "width=x")

    def test_memo_stays_bounded(self) -> None:
        parser = ParamsParser(SETTINGS.models, "procedural", 100, memo_size=8)
        for n in range(50):
            parser.parse(f"fox {n}", {}, f"/prompt/fox%20{n}", "")
        assert len(parser._memo) == 8

    def test_long_urls_are_parsed_every_time_not_kept(self) -> None:
        """4,096 URLs of the longest valid size held a gigabyte, filled by requests that all failed."""
        parser = self.parser()
        negative = "n" * 900
        query = {"negative_prompt": negative}
        first = parser.parse("a fox", query, "/prompt/a%20fox", f"negative_prompt={negative}&pad={'x' * 4000}")
        again = parser.parse("a fox", query, "/prompt/a%20fox", f"negative_prompt={negative}&pad={'x' * 4000}")
        assert again == first and again is not first and parser._memo == {}
