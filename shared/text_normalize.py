"""Text normalisation for the guards, with a map back to the original text.

Two views of a text, both NFKC-normalised (full-width and half-width forms unified, e.g.
"ＳＥＣＲＥＴ" and "ｼｰｸﾚｯﾄ" become "secret" and "シークレット") and case-folded:
- `folded`: every character kept; regular-expression rules match here;
- `skeleton`: spaces, punctuation and symbols dropped as well, so "s e-c.r e t" and "機 密" match the
  word rules "secret" and "機密".
Each view keeps, for every character, the index of the original character it came from, so a
match can be redacted in the original text.
"""
from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

# Dropped from the skeleton: separators (Z*), punctuation (P*), symbols (S*), controls and format
# characters (C*), e.g. zero-width spaces inserted to dodge a rule.
_DROPPED = ("Z", "P", "S", "C")
# Half-width voiced marks combine with the preceding kana under NFKC; keep them with their base.
_COMBINING_EXTRA = {"\uff9e", "\uff9f"}


_ASCII_ALNUM = re.compile(r"[a-z0-9]")
_ASCII_NOT_ALNUM = re.compile(r"[^a-z0-9]+")


class View:
    """A normalised view of a text: `text`, and `origin[i]` = the index in the original text of
    view character i. For ASCII skeletons the origins are worked out only when asked for (on a
    match, or to hold back a stream's tail): most texts match nothing."""

    __slots__ = ("text", "_origin", "_lowered")

    def __init__(self, text: str, origin: "tuple[int, ...] | range | None", lowered: str | None = None) -> None:
        self.text = text
        self._origin = origin
        self._lowered = lowered  # the ASCII text the skeleton came from, when origin is lazy

    @property
    def origin(self) -> "tuple[int, ...] | range":
        if self._origin is None:
            self._origin = tuple(m.start() for m in _ASCII_ALNUM.finditer(self._lowered))
        return self._origin

    def tail_origin(self, keep: int) -> int | None:
        """origin[-keep] (where the last `keep` view characters start), or None if shorter;
        for a lazy ASCII skeleton found from the end, without working out every origin."""
        if self._origin is not None:
            return self._origin[-keep] if len(self._origin) >= keep else None
        if len(self.text) < keep:
            return None
        seen = 0
        for index in range(len(self._lowered) - 1, -1, -1):
            char = self._lowered[index]
            if ("a" <= char <= "z") or ("0" <= char <= "9"):
                seen += 1
                if seen == keep:
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
    return unicodedata.normalize("NFKC", cluster).casefold()


@lru_cache(maxsize=4096)
def _keep_in_skeleton(char: str) -> bool:
    return not unicodedata.category(char).startswith(_DROPPED)


def _clusters(text: str):
    """(start index, cluster) with combining marks kept on their base character."""
    start = 0
    for index in range(1, len(text) + 1):
        if index == len(text) or not (unicodedata.combining(text[index]) or text[index] in _COMBINING_EXTRA):
            yield start, text[start:index]
            start = index


def views(text: str) -> tuple[View, View]:
    """(folded, skeleton) views of `text`."""
    folded_chars: list[str] = []
    folded_origin: list[int] = []
    skeleton_chars: list[str] = []
    skeleton_origin: list[int] = []
    if text.isascii():  # the common fast path: no NFKC work, and no Python loop per character
        lowered = text.lower()
        skeleton_text = _ASCII_NOT_ALNUM.sub("", lowered)
        skeleton_positions = range(len(lowered)) if len(skeleton_text) == len(lowered) else None
        return View(lowered, range(len(lowered))), View(skeleton_text, skeleton_positions, lowered)
    for start, cluster in _clusters(text):
        for char in _fold(cluster):
            folded_chars.append(char)
            folded_origin.append(start)
            if _keep_in_skeleton(char):
                skeleton_chars.append(char)
                skeleton_origin.append(start)
    return View("".join(folded_chars), tuple(folded_origin)), View("".join(skeleton_chars), tuple(skeleton_origin))


def skeleton(text: str) -> str:
    return views(text)[1].text


def folded(text: str) -> str:
    return views(text)[0].text
