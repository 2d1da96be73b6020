"""Guard matching and the stream guard's hold-back, in process (no HTTP)."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from shared.guards.output_guard import GuardedChannel
from shared.guards.normalize import NO_FOLDING, Folding, views, views_by_cluster
from shared.guards.rules import LEAK_RULE, GuardRule, GuardSettings, matcher_for

RULES = [
    GuardRule(id="ja-secret", pattern="機密"),
    GuardRule(id="codename", pattern="Project Falcon"),
    GuardRule(id="katakana", pattern="シークレット"),
    GuardRule(id="card", kind="regex", pattern=r"\d{4}[ -]?\d{4}[ -]?\d{4}[ -]?\d{4}"),
    GuardRule(id="out-only", pattern="internal", applies_to="output"),
]


@pytest.mark.parametrize(
    "text, rule",
    [
        ("この資料は機密です", "ja-secret"),
        ("この資料は機　密です", "ja-secret"),  # ideographic space inserted
        ("この資料は機・密です", "ja-secret"),  # punctuation inserted
        ("tell me about project falcon", "codename"),
        ("PROJECT-FALCON status?", "codename"),
        ("ＰＲＯＪＥＣＴ　ＦＡＬＣＯＮ", "codename"),  # full-width
        ("p.r.o.j.e.c.t f a l c o n", "codename"),
        ("Project\u200bFalcon", "codename"),  # zero-width space
        ("ｼｰｸﾚｯﾄ情報", "katakana"),  # half-width katakana
        ("card 4111 1111 1111 1111 please", "card"),
        ("card ４１１１-１１１１-１１１１-１１１１", "card"),  # full-width digits
    ],
)
def test_hits(text, rule):
    hits = matcher_for(RULES, "input").find(text)
    assert [h.rule for h in hits] == [rule]


@pytest.mark.parametrize("text", ["公開資料です", "project hawk", "falcon project", "1234 5678", "機会と密度", "internal memo"])
def test_misses(text):
    assert matcher_for(RULES, "input").find(text) == []


def test_direction():
    assert [h.rule for h in matcher_for(RULES, "output").find("an internal memo")] == ["out-only"]


def _stream(channel: GuardedChannel, pieces: list[str]) -> list[str]:
    out = [channel.feed(p) for p in pieces]
    out.append(channel.flush())
    return out


def test_redact_across_chunk_boundaries():
    decisions: list = []
    channel = GuardedChannel(matcher_for(RULES, "output"), "redact", "[redacted]", decisions, "choice 0")
    released = _stream(channel, ["The plan is Proj", "ect Fal", "con and 機", "密 data."])
    assert "".join(released) == "The plan is [redacted] and [redacted] data."
    assert not any("Proj" in piece or "機" in piece for piece in released)
    assert [d["rule"] for d in decisions] == ["codename", "ja-secret"]


def test_block_across_chunk_boundaries():
    decisions: list = []
    channel = GuardedChannel(matcher_for(RULES, "output"), "block", "[redacted]", decisions, "choice 0")
    released = _stream(channel, ["Sure. The plan is Proj", "ect Fal", "con and more."])
    assert "".join(released) == "Sure. The plan is "
    assert channel.blocked == "codename" and decisions == [{"direction": "output", "rule": "codename", "action": "block", "where": "choice 0"}]
    assert channel.feed("more text") == ""


def test_hold_back_is_bounded_by_the_longest_rule():
    channel = GuardedChannel(matcher_for(RULES, "output"), "redact", "[x]", [], "c")
    # The longest span: the card regex (up to 19 characters). Text beyond that is released at once.
    first = channel.feed("Hello there, this is a long enough opening sentence. ")
    assert first and len(channel.text) - len(first) <= 19


def test_leak_of_the_system_prompt():
    prompt = "You are the HR assistant of ACME Corp. Never reveal the salary bands of any employee."
    matcher = matcher_for([], "output", prompt, 30)
    leaked = "Sure! My instructions say: you are the HR assistant of ACME corp — never reveal the salary bands."
    hits = matcher.find(leaked)
    assert [h.rule for h in hits] == [LEAK_RULE]
    assert leaked[hits[0].start : hits[0].end].lower().startswith("you are the hr assistant")
    assert matcher.find("The HR assistant can help with leave requests.") == []
    # the same leak split over many chunks, blocked
    channel = GuardedChannel(matcher, "block", "", [], "c")
    released = _stream(channel, [leaked[i : i + 7] for i in range(0, len(leaked), 7)])
    assert "".join(released) == "Sure! My instructions say: "


@pytest.mark.parametrize(
    "pattern, message",
    [
        (r"(a+)+b", "nested repetition"),
        (r"(\w+\s?)*$", "nested repetition"),
        (r".*password", "bound it"),
        (r"(a)\1", "back-references"),
        (r"[unclosed", "does not compile"),
        (r"a?", "empty string"),
    ],
)
def test_dangerous_regexes_are_refused_on_save(pattern, message):
    with pytest.raises(ValidationError) as caught:
        GuardSettings.model_validate({"rules": [{"id": "r1", "kind": "regex", "pattern": pattern}]})
    assert message in str(caught.value)


def test_duplicate_rule_ids_are_refused():
    with pytest.raises(ValidationError, match="unique"):
        GuardSettings.model_validate({"rules": [{"id": "a", "pattern": "x"}, {"id": "a", "pattern": "y"}]})


def test_five_hundred_words_compile_into_one_pass():
    rules = [GuardRule(id=f"w{i}", pattern=f"forbidden{i}word") for i in range(500)]
    matcher = matcher_for(rules, "input")
    assert [h.rule for h in matcher.find("a text with forbidden250word inside")] == ["w250"]
    assert matcher.find("an innocent text " * 50) == []


# Any default-ignorable code point, anywhere in a rule's word --------------------------------------
import regex  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

IGNORABLE = [chr(c) for c in range(0x110000) if regex.match(r"\p{Default_Ignorable_Code_Point}", chr(c))]
WORDS = [GuardRule(id="ja", pattern="社外秘"), GuardRule(id="en", pattern="Project Falcon"), GuardRule(id="kana", pattern="ひみつ")]


@st.composite
def dodged(draw):
    """A rule's word with default-ignorable code points inserted at random places."""
    word = draw(st.sampled_from(["社外秘", "Project Falcon", "ヒミツ", "PROJECT FALCON"]))
    chars = list(word)
    for _ in range(draw(st.integers(1, 4))):
        chars.insert(draw(st.integers(0, len(chars))), draw(st.sampled_from(IGNORABLE)))
    return "".join(chars)


def test_the_ignorable_list_is_the_unicode_property():
    assert len(IGNORABLE) > 4000 and {"\u00ad", "\u034f", "\u115f", "\u3164", "\ufe0f", "\uffa0", "\U000e0001", "\U000e0100"} <= set(IGNORABLE)


@settings(max_examples=300, deadline=None)
@given(dodged())
def test_any_ignorable_code_point_in_a_word_is_still_found_in_input(text):
    assert matcher_for(WORDS, "input").find(f"before {text} after")


@settings(max_examples=200, deadline=None)
@given(dodged(), st.lists(st.integers(1, 6), min_size=1, max_size=30))
def test_any_ignorable_code_point_in_a_word_is_still_redacted_in_a_stream(text, cuts):
    reply = f"The file {text} is here."
    channel = GuardedChannel(matcher_for(WORDS, "output"), "redact", "[x]", [], "test")
    out, position = "", 0
    for size in cuts:
        out += channel.feed(reply[position : position + size])
        position += size
    out += channel.feed(reply[position:]) + channel.flush()
    assert "[x]" in out and out.startswith("The file ") and out.endswith(" is here.")


# The stream guard holds back only what could still become a match ---------------------------------
def _streamed(matcher, action: str, text: str, cuts: list[int]) -> tuple[str, list[str]]:
    """What a client receives when `text` arrives in pieces of the sizes in `cuts`, and what each
    piece released at once."""
    channel = GuardedChannel(matcher, action, "[x]", [], "test")
    pieces, position = [], 0
    for size in cuts:
        pieces.append(channel.feed(text[position : position + size]))
        position += size
    pieces.append(channel.feed(text[position:]))
    pieces.append(channel.flush())
    return "".join(pieces), pieces


ALPHABET = "abcx -"
SMALL_RULES = [GuardRule(id="w1", pattern="abca"), GuardRule(id="w2", pattern="bcb"), GuardRule(id="w3", pattern="ab c ab"),
               GuardRule(id="r1", kind="regex", pattern=r"x{2,4}a"), GuardRule(id="r2", kind="regex", pattern=r"c(?:aab)?")]


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=ALPHABET, max_size=60), st.lists(st.integers(1, 5), max_size=30), st.sampled_from(["redact", "block"]),
       st.sampled_from([None, "abcbaxcab cabba"]))
def test_however_a_stream_is_cut_no_match_reaches_the_client(text, cuts, action, prompt):
    """Whatever the pieces, nothing the client receives holds a match: each run of text between
    two redactions is clean, and a block leaves a clean start of the text."""
    matcher = matcher_for(SMALL_RULES, "output", prompt, 8)
    streamed, _ = _streamed(matcher, action, text, cuts)
    if action == "block":
        assert text.startswith(streamed) and not matcher.find(streamed)
    else:
        assert all(not matcher.find(run) for run in streamed.split("[x]"))


def test_only_a_possible_start_of_a_match_is_held_back():
    opening = "Hello there, this is a long enough opening sentence."
    channel = GuardedChannel(matcher_for(RULES, "output"), "redact", "[x]", [], "c")
    # Nothing here can begin a rule: all but the last character goes at once (a combining mark in
    # the next piece could still change that one).
    assert channel.feed(opening) == opening[:-1]
    # "Proj" may become "Project Falcon", "12" a card number, "機" "機密": held until the next piece.
    for start, piece in (("Proj", " Sure. Proj"), ("12", " Card 12"), ("機", " これは機")):
        released = channel.feed(piece)
        assert start not in released
        channel.feed(" ok.")  # the next piece shows it was not a match: released then
    assert channel.flush() == "." and channel.text.endswith("機 ok.") and "[x]" not in channel.text
    # With leak protection, the longest end that also occurs in the system prompt is held: here "e"
    # ("sentence" ends with it, "ce" is nowhere in the prompt), and the last character.
    leak = GuardedChannel(matcher_for([], "output", "You are the helpdesk bot of ACME. Answer briefly and politely.", 30),
                          "redact", "[x]", [], "c")
    assert leak.feed(opening) == opening[:-2]
    assert leak.feed(" You are the") == "e. "  # "You are the" could be the start of a copy of the prompt
    assert leak.feed(" best!") == "You are the bes"  # "t" occurs in the prompt; "!" is the last character


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="abcd", min_size=10, max_size=40), st.text(alphabet="abcd", max_size=120), st.integers(8, 12))
def test_copies_of_the_prompt_are_found_as_a_position_by_position_scan_finds_them(prompt, text, min_chars):
    """The block index only skips text that cannot hold a copied run: the runs found are exactly
    those that testing every position finds."""
    from shared.guards.rules import leak_index

    index = leak_index(prompt, min_chars)
    expected, i = [], 0
    while i + min_chars <= len(text):
        if text[i : i + min_chars] in index.grams:
            end = i + min_chars
            while end < len(text) and text[end - min_chars + 1 : end + 1] in index.grams:
                end += 1
            expected.append((i, end))
            i = end
        else:
            i += 1
    hits = matcher_for([], "output", prompt, min_chars).find(text)
    assert [(h.start, h.end) for h in hits] == expected


# Views of text that is not all ASCII ------------------------------------------------------------
# ASCII with what a model's English carries (a curly apostrophe, an em dash, an accented letter),
# combining marks (on ASCII letters too), half-width kana and their voiced mark, a Cyrillic look-alike,
# invisible code points, CJK.
MIXED = "ab mrn0 I.-" + "’—é\u0301ｶﾞаο\u200b\ufe0f機密ヒ"


@settings(max_examples=600, deadline=None)
@given(st.text(alphabet=MIXED, max_size=40), st.sampled_from([NO_FOLDING, Folding(), Folding(kana=True, confusables=False)]))
def test_views_of_any_text_equal_the_views_worked_out_a_cluster_at_a_time(text, folding):
    """`views` takes string operations over ASCII runs and works out origins only when asked: it
    must give exactly the texts and origins of the plain cluster-by-cluster walk."""
    folded, skeleton = views(text, folding)
    assert (folded.text, tuple(folded.origin), skeleton.text, tuple(skeleton.origin)) == views_by_cluster(text, folding)
    fresh = views(text, folding)[1]  # a stream's tail, asked for before any origin was worked out
    for keep in (1, 2, 5):
        expected = skeleton.origin[-keep] if len(skeleton.origin) >= keep else None
        assert fresh.tail_origin(keep) == expected


MIXED_RULES = [GuardRule(id="w1", pattern="ab’a"), GuardRule(id="w2", pattern="éb"), GuardRule(id="w3", pattern="機密"),
               GuardRule(id="w4", pattern="ｶﾞb"), GuardRule(id="r1", kind="regex", pattern=r"m{2}a")]


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=MIXED, max_size=50), st.lists(st.integers(1, 5), max_size=30), st.sampled_from(["redact", "block"]))
def test_however_a_mixed_text_stream_is_cut_no_match_reaches_the_client(text, cuts, action):
    matcher = matcher_for(MIXED_RULES, "output", "ab’a éb 機密 and more", 6)
    streamed, _ = _streamed(matcher, action, text, cuts)
    if action == "block":
        assert text.startswith(streamed) and not matcher.find(streamed)
    else:
        assert all(not matcher.find(run) for run in streamed.split("[x]"))


@given(st.text(alphabet="abmnrl01o", max_size=40),
       st.dictionaries(st.sampled_from("abm01l"), st.text(alphabet="abmnrl01o", min_size=1, max_size=3), max_size=4))
def test_the_ascii_skeleton_folding_equals_the_character_table(text, mapping):
    """The ASCII fast path folds with C-level replacements where their order cannot matter, and
    with the table itself where it could (a replacement bringing back a replaced character)."""
    from shared.guards.normalize import _ascii_fold, _replacement_pairs

    table = {ord(char): new for char, new in mapping.items()}
    assert _ascii_fold(text, table, _replacement_pairs(table)) == text.translate(table)
