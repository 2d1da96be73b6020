"""Deterministic model output: the same request always gets the same reply and usage."""
from __future__ import annotations

import base64
import hashlib
import math
import re
import struct
from typing import Any

_WORDS = (
    "the gateway keeps every request inside the company tenant while models answer quickly and "
    "each team gets clear usage figures so costs stay visible limits stay fair prompts stay safe "
    "and logs stay complete for audits reviews and reproducible tests across regions"
).split()

# The simulator counts tokens with the gateway's own estimator, so a test knows what usage to expect.
from ...token_estimate import count_tokens, prompt_tokens_for_messages, text_of  # noqa: E402,F401


def seed_of(*parts: Any) -> bytes:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(repr(part).encode("utf-8"))
    return digest.digest()


def reply_tokens(seed: bytes, limit: int | None, default_length: int = 24) -> list[str]:
    """The reply as a list of token strings (each word with its leading space)."""
    length = default_length + seed[0] % 8
    if limit is not None:
        length = max(1, min(length, limit))
    words = [_WORDS[(seed[i % len(seed)] + i * 7) % len(_WORDS)] for i in range(length)]
    if words:
        words[0] = words[0].capitalize()
    return [w if i == 0 else " " + w for i, w in enumerate(words)]


def split_reply(text: str, chunks: int | None) -> list[str]:
    """A fixed reply cut into pieces: by words, or into `chunks` even parts."""
    if chunks is None:
        pieces = re.findall(r"\s*\S+", text) or [text]
        return pieces
    chunks = max(1, chunks)
    size = math.ceil(len(text) / chunks) or 1
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def embedding(text: str, dimensions: int) -> list[float]:
    """A unit vector derived from the text."""
    values: list[float] = []
    counter = 0
    while len(values) < dimensions:
        block = hashlib.sha256(f"{counter}:{text}".encode("utf-8")).digest()
        values.extend((b - 127.5) / 127.5 for b in block)
        counter += 1
    values = values[:dimensions]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def encode_base64(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
