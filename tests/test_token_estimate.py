"""The quota's prompt estimate (shared/token_estimate.py): its fast paths count exactly what the
plain definitions count, for any text and any JSON."""
from __future__ import annotations

from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from shared.token_estimate import _TOKEN, count_tokens, image_parts

# Every class the pattern tells apart, and the ASCII controls that \s counts as spaces (\x1c-\x1f)
# while bytes.split() would not.
ASCII = st.text(st.characters(min_codepoint=0, max_codepoint=127), max_size=60)


@settings(max_examples=600, deadline=None)
@given(ASCII)
@example("abc123def 4.5e6 [x]\x1cy\x1f\x7f")
@example("")
@example("   \t\n")
def test_ascii_text_counts_as_the_pattern_does(text):
    assert count_tokens(text) == len(_TOKEN.findall(text))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
@example("社外秘の資料 abc 123")
def test_any_text_counts_as_the_pattern_does(text):
    assert count_tokens(text) == len(_TOKEN.findall(text))


def _images_by_definition(value: Any) -> int:
    if isinstance(value, list):
        return sum(_images_by_definition(v) for v in value)
    if isinstance(value, dict):
        own = 1 if value.get("type") in ("image_url", "input_image") else 0
        return own + sum(_images_by_definition(v) for v in value.values())
    return 0


JSON = st.recursive(
    st.none() | st.integers() | st.sampled_from(["image_url", "input_image", "text", "x"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(["type", "content", "image_url", "a"]), inner, max_size=4),
    max_leaves=30,
)


@settings(max_examples=400, deadline=None)
@given(JSON)
@example([{"type": "image_url", "content": [{"type": "input_image"}, {"a": {"type": "image_url"}}]}])
def test_image_parts_are_counted_wherever_they_are(value):
    assert image_parts(value) == 765 * _images_by_definition(value)
