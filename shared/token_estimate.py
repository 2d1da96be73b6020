"""A rough token count, used before the upstream call to reserve quota (and by the simulator).

The estimate counts words, numbers and punctuation as one token each and every CJK character as
one token. Against cl100k/o200k tokenizers it is within about ±30 % for English prose and tends
to over-count Japanese slightly (real tokenizers merge some kana/kanji pairs). It only sizes the
reservation: the request is settled with the upstream's exact usage afterwards, so the error
affects how close to a limit a request may start, never what is finally counted.
"""
from __future__ import annotations

import re
from typing import Any

_TOKEN = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uff00-\uffef]|[A-Za-z]+|\d+|[^\sA-Za-z\d]")
_PER_MESSAGE = 4  # role and framing tokens that chat models add per message
_REPLY_PRIMER = 3
_IMAGE_TOKENS = 765  # a high-detail 512x512 tile set; images are not measured here


def count_tokens(text: str) -> int:
    return len(_TOKEN.findall(text))


def text_of(value: Any) -> str:
    """All text inside a prompt value: strings, content-part arrays, message lists."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(text_of(v) for v in value)
    if isinstance(value, dict):
        parts = []
        for key in ("content", "text", "input_text", "output", "arguments"):
            if key in value:
                parts.append(text_of(value[key]))
        return "\n".join(p for p in parts if p)
    return ""


def _images(value: Any) -> int:
    if isinstance(value, list):
        return sum(_images(v) for v in value)
    if isinstance(value, dict):
        own = 1 if value.get("type") in ("image_url", "input_image") else 0
        return own + sum(_images(v) for v in value.values() if isinstance(v, (list, dict)))
    return 0


def prompt_tokens_for_messages(messages: list[Any]) -> int:
    return sum(_PER_MESSAGE + count_tokens(text_of(m)) for m in messages) + _REPLY_PRIMER


def message_overhead(messages: int) -> int:
    """Tokens chat models add around messages (role and framing), beyond their text."""
    return _PER_MESSAGE * messages + _REPLY_PRIMER


def image_parts(value: Any) -> int:
    """Tokens reserved for the images a prompt value carries (not measured: a high-detail tile set each)."""
    return _images(value) * _IMAGE_TOKENS
