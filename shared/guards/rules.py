"""Guard rules: what they are, how they are checked on save, and how they are matched fast.

A rule is a forbidden `word` (matched on the skeleton view: case, width, spaces and punctuation
do not matter) or a `regex` (matched on the folded view: case and width do not matter). All the
rules of a policy compile into one `GuardMatcher`: the words into a single trie-shaped regular
expression (one pass over the text whatever the number of words), the regexes into one
alternation with a named group per rule. Leak protection adds the app's system prompt: any run
of `leak_min_chars` skeleton characters copied from it is a hit.

Regexes are checked when saved: they must compile, have no back-references, no nested unbounded
repetition (the classic catastrophic-backtracking shape), a bounded match width (so a stream
needs to hold back only that much text), and must finish quickly on adversarial input.
"""
from __future__ import annotations

import re
import subprocess
import sys
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import regex
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from .normalize import COMBINING_EXTRA, NO_FOLDING, Folding, View, skeleton, views

try:  # Python 3.11 keeps the parser here (re._parser from 3.11, sre_parse before)
    from re import _parser as sre_parse  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover
    import sre_parse  # type: ignore[no-redef]

MAX_REGEX_WIDTH = 500
_RULE_ID = r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,63}$"


class GuardRule(BaseModel):
    # In the schema too: a word rule needs a letter or digit; a regex rule is a regular expression.
    model_config = ConfigDict(extra="forbid", json_schema_extra={"allOf": [{
        "if": {"required": ["kind"], "properties": {"kind": {"const": "regex"}}},
        "then": {"properties": {"pattern": {"format": "regex"}}},
        "else": {"properties": {"pattern": {"pattern": "[^\\W_]"}}},
    }]})

    id: str = Field(pattern=_RULE_ID, description="Named in refusals and logs instead of the rule itself.")
    kind: Literal["word", "regex"] = "word"
    pattern: str = Field(min_length=1, max_length=500)
    applies_to: Literal["input", "output", "both"] = "both"

    @model_validator(mode="after")
    def _check_pattern(self, info: ValidationInfo) -> "GuardRule":
        if self.kind == "word":
            if not skeleton(self.pattern):
                raise ValueError(f"rule {self.id}: the word has no letters or digits once spaces and punctuation are ignored")
        else:
            # Rules read back from the store were checked when saved: skip the slow speed probe.
            check_regex(self.id, self.pattern, probe_speed=not (info.context or {}).get("stored"))
        return self


class LeakProtection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    min_chars: int = Field(default=40, ge=8, le=10_000, description="Consecutive normalised characters of the system prompt that count as a leak.")


class GuardSettings(BaseModel):
    """Guards of a policy layer. `rules` add up across layers (defaults + app + user; a later rule
    with the same id replaces an earlier one); the other fields override."""

    model_config = ConfigDict(extra="forbid")

    rules: list[GuardRule] | None = None
    output_action: Literal["redact", "block"] | None = None
    redaction: str | None = Field(default=None, max_length=64)
    leak_protection: LeakProtection | None = None
    fold_kana: bool | None = Field(default=None, description="Word rules and leak protection treat katakana and hiragana alike (ヒミツ = ひみつ). Default on.")
    fold_confusables: bool | None = Field(default=None, description="Word rules and leak protection treat look-alike characters as the letter they imitate (Unicode UTS #39 confusables: Cyrillic а = Latin a, rn = m). Default on.")

    @field_validator("rules")
    @classmethod
    def _unique_ids(cls, rules):
        if rules is not None:
            ids = [r.id for r in rules]
            duplicates = sorted({i for i in ids if ids.count(i) > 1})
            if duplicates:
                raise ValueError(f"rule ids must be unique: {duplicates}")
        return rules


def _nested_unbounded(parsed, inside_repeat: bool = False) -> bool:
    for op, value in parsed:
        name = str(op)
        if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            low, high, sub = value
            unbounded = high == sre_parse.MAXREPEAT or high > 1000
            if inside_repeat and high > 1:
                return True
            if _nested_unbounded(sub, inside_repeat or unbounded):
                return True
        elif name == "SUBPATTERN":
            if _nested_unbounded(value[-1], inside_repeat):
                return True
        elif name == "BRANCH":
            if any(_nested_unbounded(branch, inside_repeat) for branch in value[1]):
                return True
        elif name in ("GROUPREF", "GROUPREF_EXISTS"):
            return True
    return False


def check_regex(rule_id: str, pattern: str, probe_speed: bool = True) -> None:
    try:
        parsed = sre_parse.parse(pattern)
        re.compile(pattern)
    except (re.error, OverflowError, RecursionError) as exc:
        raise ValueError(f"rule {rule_id}: the regex does not compile: {exc}") from None
    if re.search(r"\\[1-9]|\(\?P=", pattern):
        raise ValueError(f"rule {rule_id}: back-references are not allowed")
    if _nested_unbounded(parsed):
        raise ValueError(f"rule {rule_id}: nested repetition like (a+)+ can take exponential time; rewrite it")
    low, high = parsed.getwidth()
    if high > MAX_REGEX_WIDTH:
        width = "unboundedly many" if high >= sre_parse.MAXREPEAT else str(high)
        raise ValueError(f"rule {rule_id}: the regex can match {width} characters; bound it to {MAX_REGEX_WIDTH} (use {{m,n}} instead of + or *)")
    if low == 0:
        raise ValueError(f"rule {rule_id}: the regex can match the empty string")
    if probe_speed:
        _check_speed(rule_id, pattern)


@lru_cache(maxsize=1024)
def _check_speed(rule_id: str, pattern: str) -> None:
    """Run the regex on adversarial inputs in a child process; too slow → refused. Only when an
    admin saves a rule, never on the request path."""
    probe = (
        "import re, sys\n"
        "p = re.compile(sys.argv[1])\n"
        "chars = set(c for c in sys.argv[1] if c.isalnum()) | set('a0 -_.')\n"
        "for c in chars:\n"
        "    for text in (c * 3000 + '\\x00', (c + ' ') * 1500 + '!'):\n"
        "        p.search(text)\n"
    )
    try:
        subprocess.run([sys.executable, "-c", probe, pattern], timeout=2, check=True, capture_output=True)
    except subprocess.TimeoutExpired:
        raise ValueError(f"rule {rule_id}: the regex is too slow on adversarial input (catastrophic backtracking)") from None
    except subprocess.CalledProcessError as exc:
        raise ValueError(f"rule {rule_id}: the regex failed on test input: {exc.stderr.decode()[-200:]}") from None


# Matching ---------------------------------------------------------------------------------
def trie_regex(words: list[str]) -> str:
    """One regex for many literal words, shaped as a trie so the engine shares prefixes."""
    trie: dict = {}
    for word in words:
        node = trie
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}

    def emit(node: dict) -> str:
        ends = "" in node
        branches = [re.escape(char) + emit(child) for char, child in sorted(node.items()) if char]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return f"(?:{body})?" if ends else body

    return emit(trie)


@dataclass(frozen=True)
class Hit:
    start: int  # in the original text
    end: int
    rule: str  # rule id, or "system_prompt_leak"
    view_end: int  # end in its view (to tell whether more text could extend it)
    view: str  # "skeleton" or "folded"


LEAK_RULE = "system_prompt_leak"


class RuleSet:
    """The rules of one policy for one direction, compiled once: the words into one trie-shaped
    regex over the skeleton view, the regexes into one alternation over the folded view."""

    def __init__(self, rules: list[GuardRule], folding: Folding = NO_FOLDING) -> None:
        self.folding = folding
        words = [r for r in rules if r.kind == "word"]
        regexes = [r for r in rules if r.kind == "regex"]
        self.word_rule: dict[str, str] = {}
        for rule in words:
            self.word_rule.setdefault(skeleton(rule.pattern, folding), rule.id)
        self.words = re.compile(trie_regex(sorted(self.word_rule, key=len, reverse=True))) if self.word_rule else None
        self.regex_ids = {f"r{i}": r.id for i, r in enumerate(regexes)}
        self.regex = re.compile("|".join(f"(?P<r{i}>{r.pattern})" for i, r in enumerate(regexes))) if regexes else None
        self.word_span = max((len(w) for w in self.word_rule), default=0)
        self.regex_span = max((sre_parse.parse(r.pattern).getwidth()[1] for r in regexes), default=0)
        # For a stream's hold-back: every proper prefix of a word, and the regexes in an engine that
        # tells whether a text could still grow into a match (partial matching).
        self.word_prefixes = frozenset(word[:k] for word in self.word_rule for k in range(1, len(word)))
        self.partial_regex = _partial(self.regex.pattern) if self.regex is not None else None


def _partial(pattern: str):
    """The pattern in the `regex` engine, which can match partially (a text that a later character
    could still turn into a match); None if that engine reads the pattern differently."""
    try:
        return regex.compile(pattern, flags=regex.VERSION0)
    except regex.error:
        return None


class LeakIndex:
    """Every run of `min_chars` skeleton characters of the system prompt."""

    def __init__(self, source: str, min_chars: int, folding: Folding = NO_FOLDING) -> None:
        text = skeleton(source, folding)
        self.text = text  # a stream's tail found in it could still become a copied run
        self.min_chars = min_chars
        # Every run of min_chars holds a whole aligned block of half that length: looking up blocks
        # first skips most of a text that copies nothing, instead of testing every position.
        self.block = max(1, min_chars // 2)
        self.blocks = frozenset(text[i : i + self.block] for i in range(len(text) - self.block + 1))
        self.grams = frozenset(text[i : i + min_chars] for i in range(len(text) - min_chars + 1))


@lru_cache(maxsize=256)
def leak_index(source: str, min_chars: int, folding: Folding = NO_FOLDING) -> LeakIndex:
    return LeakIndex(source, min_chars, folding)


class GuardMatcher:
    """Finds hits of a rule set (and, optionally, leaks of a system prompt) in a text."""

    def __init__(self, rules: RuleSet, leak: LeakIndex | None = None) -> None:
        self._rules = rules
        self._leak = leak if leak is not None and leak.grams else None
        self.word_span = max(rules.word_span, self._leak.min_chars if self._leak else 0)
        self.regex_span = rules.regex_span

    @property
    def empty(self) -> bool:
        return self._rules.words is None and self._rules.regex is None and self._leak is None

    def find(self, text: str) -> list[Hit]:
        return self.scan(text, release=False)[0]

    def scan(self, text: str, release: bool = True) -> tuple[list[Hit], int]:
        """Hits in `text`, and the release point: the index up to which `text` may be released
        (everything before the shortest tail a later character could turn into a match). A
        whole text (`release=False`) has no later characters: its release point is its end."""
        folded, skel = views(text, self._rules.folding)
        rules, hits = self._rules, []
        if rules.words is not None:
            for match in rules.words.finditer(skel.text):
                if match.end() > match.start():
                    start, end = skel.span(match.start(), match.end(), len(text))
                    hits.append(Hit(start, end, rules.word_rule[match.group()], match.end(), "skeleton"))
        if rules.regex is not None:
            for match in rules.regex.finditer(folded.text):
                if match.end() > match.start():
                    start, end = folded.span(match.start(), match.end(), len(text))
                    hits.append(Hit(start, end, rules.regex_ids[match.lastgroup], match.end(), "folded"))
        if self._leak is not None:
            hits.extend(self._leaks(skel, len(text)))
        hits.sort(key=lambda h: (h.start, -h.end))
        return hits, (self._release_point(text, folded, skel) if release else len(text))

    def _leaks(self, skel: View, length: int) -> list[Hit]:
        leak = self._leak
        n, grams, text, found = leak.min_chars, leak.grams, skel.text, []
        block, blocks, size = leak.block, leak.blocks, len(text)
        i = 0
        while i + n <= size:
            # The first aligned block at or after i that the prompt holds: a copied run starting at
            # i or later must contain one (a run starting before p + block - n would contain an
            # earlier aligned block, and none of those is in the prompt).
            p = -(-i // block) * block
            while p + block <= size and text[p : p + block] not in blocks:
                p += block
            if p + block > size:
                break
            start = next((j for j in range(max(i, p + block - n), min(p, size - n) + 1) if text[j : j + n] in grams), None)
            if start is None:
                i = p + 1
                continue
            end = start + n
            while end < size and text[end - n + 1 : end + 1] in grams:
                end += 1  # extend over the whole copied run
            first, stop = skel.span(start, end, length)
            found.append(Hit(first, stop, LEAK_RULE, end, "skeleton"))
            i = end
        return found

    def _release_point(self, text: str, folded: View, skel: View) -> int:
        """Where the text must stop being released: the start of the longest tail that a later
        character could still turn into a match — a tail that is the beginning of a word, of a
        run copied from the system prompt, or of a regex match. Everything before it can never
        be part of a match, so it goes now. The last character is always kept: a combining mark
        in the next piece would change it."""
        cut = _last_cluster_start(text)
        rules = self._rules
        keep = _longest_suffix_in(skel.text, rules.word_prefixes, rules.word_span - 1) if rules.word_prefixes else 0
        if self._leak is not None:
            keep = max(keep, _longest_suffix_within(skel.text, self._leak.text, self._leak.min_chars - 1))
        if keep:
            at = skel.tail_origin(keep)
            cut = min(cut, at if at is not None else 0)
        if rules.regex is not None and rules.regex_span > 1:
            cut = min(cut, self._regex_release_point(folded, len(text)))
        return cut

    def _regex_release_point(self, folded: View, length: int) -> int:
        viewed = folded.text
        first = max(0, len(viewed) - (self.regex_span - 1))  # a match is at most regex_span long
        partial = self._rules.partial_regex
        if partial is None:  # hold the whole span back, as if anything could still match
            return folded.origin[first] if first < len(viewed) else length
        # Where anything (a match, or the beginning of one) starts at all, found at the engine's speed:
        # no position before it needs a closer look.
        found = partial.search(viewed, first, partial=True)
        if found is None:
            return length
        for start in range(found.start(), len(viewed)):
            # A match (which more text could extend), or the beginning of one, from `start` to the end.
            if partial.fullmatch(viewed, start, partial=True) is not None:
                return folded.origin[start]
        return length


def _last_cluster_start(text: str) -> int:
    """Where the text's last character begins, with the combining marks that follow it."""
    index = len(text) - 1
    while index > 0 and (unicodedata.combining(text[index]) or text[index] in COMBINING_EXTRA):
        index -= 1
    return max(index, 0)


def _longest_suffix_in(text: str, prefixes: frozenset[str], most: int) -> int:
    """The length of the longest end of `text` (at most `most`) that is in `prefixes`."""
    for length in range(min(most, len(text)), 0, -1):
        if text[-length:] in prefixes:
            return length
    return 0


def _longest_suffix_within(text: str, source: str, most: int) -> int:
    """The length of the longest end of `text` (at most `most`) found anywhere in `source`. A
    shorter end of a found end is found too, so a binary search over the length suffices."""
    low, high = 0, min(most, len(text))
    while low < high:
        middle = (low + high + 1) // 2
        if text[-middle:] in source:
            low = middle
        else:
            high = middle - 1
    return low


def matcher_for(rules: list[GuardRule], direction: str, leak_source: str | None = None, leak_min_chars: int = 40,
                folding: Folding = Folding()) -> GuardMatcher:
    """A matcher compiled on the spot (tests, tools). The gateway keeps compiled rule sets on
    the effective policy instead (`EffectivePolicy.rule_set`)."""
    chosen = [r for r in rules if r.applies_to in (direction, "both")]
    return GuardMatcher(RuleSet(chosen, folding), leak_index(leak_source, leak_min_chars, folding) if leak_source else None)
