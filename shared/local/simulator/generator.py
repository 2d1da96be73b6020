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


# Tools and structured outputs --------------------------------------------------------------------
def schema_instance(schema: Any, seed: bytes, defs: dict | None = None, depth: int = 0) -> Any:
    """A value valid for a JSON schema (the subset structured outputs use: objects with
    properties and required, arrays, strings, numbers, integers, booleans, null, enum, const,
    anyOf/oneOf, $ref to $defs), the same for the same seed."""
    if not isinstance(schema, dict) or depth > 12:
        return None
    defs = {**(defs or {}), **(schema.get("$defs") or {}), **(schema.get("definitions") or {})}
    if "$ref" in schema:
        name = str(schema["$ref"]).rsplit("/", 1)[-1]
        return schema_instance(defs.get(name, {}), seed, defs, depth + 1)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][seed[depth % len(seed)] % len(schema["enum"])]
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            options = [o for o in schema[key] if not (isinstance(o, dict) and o.get("type") == "null")] or schema[key]
            return schema_instance(options[0], seed, defs, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or (kind is None and "properties" in schema):
        properties = schema.get("properties") or {}
        return {name: schema_instance(sub, seed_of(seed, name), defs, depth + 1) for name, sub in properties.items()}
    if kind == "array":
        count = max(int(schema.get("minItems", 1)), 1)
        return [schema_instance(schema.get("items") or {}, seed_of(seed, i), defs, depth + 1) for i in range(count)]
    if kind == "integer":
        low = int(schema.get("minimum", 0))
        high = int(schema.get("maximum", low + 100))
        return low + seed[depth % len(seed)] % (high - low + 1)
    if kind == "number":
        low = float(schema.get("minimum", 0))
        return round(low + seed[depth % len(seed)] / 10, 1)
    if kind == "boolean":
        return bool(seed[depth % len(seed)] % 2)
    if kind == "null":
        return None
    words = reply_tokens(seed, 4, default_length=2)
    text = "".join(words).strip()
    if schema.get("format") == "date":
        return "2026-01-01"
    return text[: int(schema["maxLength"])] if "maxLength" in schema else text
