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

import unicodedata
from dataclasses import dataclass
from functools import lru_cache

# Dropped from the skeleton: separators (Z*), punctuation (P*), symbols (S*), controls and format
# characters (C*), e.g. zero-width spaces inserted to dodge a rule.
_DROPPED = ("Z", "P", "S", "C")
# Half-width voiced marks combine with the preceding kana under NFKC; keep them with their base.
_COMBINING_EXTRA = {"\uff9e", "\uff9f"}


@dataclass(frozen=True)
class View:
    text: str
    origin: tuple[int, ...]  # origin[i] = index in the original text of view character i

    def span(self, start: int, end: int, original_length: int) -> tuple[int, int]:
        """The original span [a, b) covering view characters [start, end)."""
        if start >= len(self.origin):
            return original_length, original_length
        return self.origin[start], (self.origin[end - 1] + 1 if end > start else self.origin[start])


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
    if text.isascii():  # the common fast path: no NFKC work, one pass
        lowered = text.lower()
        for index, char in enumerate(lowered):
            folded_chars.append(char)
            folded_origin.append(index)
            if char.isalnum():
                skeleton_chars.append(char)
                skeleton_origin.append(index)
        return View("".join(folded_chars), tuple(folded_origin)), View("".join(skeleton_chars), tuple(skeleton_origin))
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
