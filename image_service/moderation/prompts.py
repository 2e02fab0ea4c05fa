"""Prompt checks before generation: normalise the text, then match word lists on word boundaries.

Normalisation defeats the cheap evasions (full-width letters, accents, case, `s3xy`, `s.e.x`,
`n a k e d`, invisible characters inside a word, Cyrillic or Greek look-alike letters, digits of
other scripts, ages in English words, a minor term and a sexual term run together);
matching whole words (plurals are listed, never guessed: "sexes" is not "sex") avoids the substring traps that flag
"class", "Sussex", "document" or the German "Nudeln". The lists live in config/moderation.toml;
a term listed under `minor_sexual` counts as both a minor and a sexual term.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

# Digits and symbols read as letters, only inside a word that also has a real letter.
_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s", "!": "i", "|": "i"})
_WORD = re.compile(r"[a-zñ0-9@$!|]+")
_HAS_LETTER = re.compile(r"[a-zñ]")
# Single letters joined by separators: "s.e.x", "n-u-d-e", "k_i_d", "n a k e d".
_SPELLED = re.compile(r"(?<![a-zñ0-9])(?:[a-zñ0-9@$][.\-_* ]){2,}[a-zñ0-9@$](?![a-zñ0-9])")
_SEPARATORS = re.compile(r"[.\-_* ]")
# Cyrillic and Greek letters that look like Latin ones (after case folding). A word written with
# only such letters and Latin ones reads as Latin: "nаked" with a Cyrillic "а" is "naked".
_LOOK_ALIKES = str.maketrans({
    "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p", "с": "c",
    "т": "t", "у": "y", "х": "x", "і": "i", "ї": "i", "ј": "j", "ѕ": "s", "ԁ": "d", "һ": "h", "ԛ": "q",
    "ԝ": "w", "α": "a", "β": "b", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p",
    "τ": "t", "υ": "u", "χ": "x", "ω": "w",
})
_LETTERS = re.compile(r"[^\W\d_]+")
# Ages in English words, read as digits before the age pattern runs. A number from twenty up
# ("twenty-two", "a hundred and two") is an adult's whatever its last word: it is read whole first.
_UNITS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen"
).split()
_NUMBER_WORDS = {word: str(value) for value, word in enumerate(_UNITS)}
_ADULT_NUMBER = re.compile(
    rf"(?<![a-z])(?:twenty|thirty|forty|fifty|sixty|seventy|eighty|ninety|hundred)"
    rf"(?:[\s-]+(?:and[\s-]+)?(?:{'|'.join(_UNITS)}))?(?![a-z])"
)
_NUMBER_WORD = re.compile(rf"(?<![a-z])({'|'.join(_UNITS)})(?=\s*-?\s*(?:y/?o|yrs?|years?)(?![a-z]))")
# An explicit age below 18 is a minor term in every language: "12 year old", "12yo", "12 años", "12 ans",
# "12 jahre alt", "12-jährige", "12 anni", "12 anos".
_AGE = re.compile(
    r"(?<![0-9])(?P<age>[0-9]{1,2})\s*-?\s*"
    r"(?:y/?o|yrs?\s*-?\s*old|years?\s*-?\s*old|a[nñ]os|ans|anni|jahre\s+alt|jahrige[nrs]?|jahrig)(?![a-z])"
)
ADULT_AGE = 18


def fold(text: str, invisible: str = "") -> str:
    """NFKC, invisible characters replaced by `invisible`, case-folded, look-alike letters read as
    Latin, accents stripped, digits of any script as ASCII, spelled-out words joined; numbers left alone."""
    text = unicodedata.normalize("NFKC", text)
    if not text.isascii():
        text = "".join(invisible if unicodedata.category(ch) == "Cf" else ch for ch in text)
    text = text.casefold().replace("ß", "ss")
    text = _LETTERS.sub(_as_latin, "".join(_base_letter(ch) for ch in text))
    return _SPELLED.sub(lambda m: _SEPARATORS.sub("", m.group()), text)


def _as_latin(match: re.Match[str]) -> str:
    word = match.group()
    if word.isascii():
        return word
    latin = word.translate(_LOOK_ALIKES)
    return latin if latin.isascii() else word  # a word of another script keeps its letters


@functools.lru_cache(maxsize=4096)
def _base_letter(ch: str) -> str:
    # ñ keeps its tilde: without it "niña" would become the name "Nina".
    if ch == "ñ" or ch.isascii():
        return ch
    if ch.isdecimal():
        return str(unicodedata.decimal(ch))
    return "".join(c for c in unicodedata.normalize("NFKD", ch) if not unicodedata.combining(c))


def normalise(text: str) -> str:
    """`fold`, then leetspeak undone: the form the word lists are matched against."""
    return _WORD.sub(_unleet, fold(text))


def _unleet(match: re.Match[str]) -> str:
    word = match.group()
    if not _HAS_LETTER.search(word):
        return word  # a number stays a number ("12 year old")
    stripped = word.rstrip("!|")
    return stripped.translate(_LEET) + word[len(stripped):]


def _pattern(terms: Iterable[str]) -> re.Pattern[str] | None:
    alternatives = sorted(
        {r"\s+".join(re.escape(part) for part in normalise(term).split()) for term in terms if term.strip()},
        key=len, reverse=True,
    )
    if not alternatives:
        return None
    return re.compile(rf"(?<![a-zñ0-9])(?:{'|'.join(alternatives)})(?![a-zñ0-9])")


@dataclass(frozen=True, slots=True)
class PromptFindings:
    minor: bool = False
    sexual: bool = False

    @property
    def labels(self) -> tuple[str, ...]:
        """Which lists fired, never the words themselves: a private prompt must not leak through labels."""
        return tuple(label for label, fired in (("prompt:minor", self.minor), ("prompt:sexual", self.sexual)) if fired)

    @property
    def sexual_minor(self) -> bool:
        return self.minor and self.sexual


MEMO_SIZE = 4096


class PromptChecker:
    """Matches the minor and sexual word lists (every language at once) against a normalised prompt."""

    def __init__(
        self,
        minor: dict[str, list[str]],
        sexual: dict[str, list[str]],
        minor_sexual: dict[str, list[str]] | None = None,
    ) -> None:
        both = [term for terms in (minor_sexual or {}).values() for term in terms]
        minor_terms = [term for terms in minor.values() for term in terms] + both
        sexual_terms = [term for terms in sexual.values() for term in terms] + both
        self._minor = _pattern(minor_terms)
        self._sexual = _pattern(sexual_terms)
        # One-word terms, for words that run a minor term and a sexual term together ("nakedchild").
        self._minor_words = _single_words(minor_terms)
        self._sexual_words = _single_words(sexual_terms)
        self.languages = tuple(sorted(set(minor) | set(sexual)))
        self._memo: dict[str, PromptFindings] = {}

    def check(self, prompt: str) -> PromptFindings:
        """Findings for `prompt`, memoised: popular prompts repeat on every cache hit."""
        found = self._memo.get(prompt)
        if found is None:
            found = self._check(prompt)
            if len(self._memo) >= MEMO_SIZE:
                del self._memo[next(iter(self._memo))]
            self._memo[prompt] = found
        return found

    def _check(self, prompt: str) -> PromptFindings:
        found = self._check_folded(fold(prompt))
        if not prompt.isascii():
            # An invisible character (zero-width space, soft hyphen) may hide a word inside another
            # ("na<ZWSP>ked") or join two words into one ("naked<ZWSP>little girl"): read it both ways.
            spaced = self._check_folded(fold(prompt, invisible=" "))
            found = PromptFindings(minor=found.minor or spaced.minor, sexual=found.sexual or spaced.sexual)
        return found

    def _check_folded(self, folded: str) -> PromptFindings:
        text = _WORD.sub(_unleet, folded)
        if self._run_together(text):
            return PromptFindings(minor=True, sexual=True)
        ages = _NUMBER_WORD.sub(lambda m: _NUMBER_WORDS[m.group()], _ADULT_NUMBER.sub("99", folded))
        return PromptFindings(
            minor=_matches(self._minor, text) or any(int(m["age"]) < ADULT_AGE for m in _AGE.finditer(ages)),
            sexual=_matches(self._sexual, text),
        )

    def _run_together(self, text: str) -> bool:
        """Whether a word is a minor term and a sexual term written as one ("nakedchild", "kidporn")."""
        minor, sexual = self._minor_words, self._sexual_words
        for word in _WORD.findall(text):
            for cut in range(2, len(word) - 1):
                head, tail = word[:cut], word[cut:]
                if (head in minor and tail in sexual) or (head in sexual and tail in minor):
                    return True
        return False


def _single_words(terms: Iterable[str]) -> frozenset[str]:
    """The terms that are one word as `_WORD` reads words ("pre-teen" is two)."""
    return frozenset(word for word in (normalise(term) for term in terms) if _WORD.fullmatch(word))


def _matches(pattern: re.Pattern[str] | None, text: str) -> bool:
    return pattern is not None and pattern.search(text) is not None
