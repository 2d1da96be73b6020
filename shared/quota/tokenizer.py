"""Token counts with the model's own tokenizer, offline, for answers that carry no usage.

Azure OpenAI reports usage on every answer, but not every upstream does: a stream cut short, a
stream on an api-version older than `stream_options`, an Azure-compatible server that never sends
usage. Then the gateway counts the tokens itself, so that the log, the quota settlement and the
cost header agree and nothing is free: with tiktoken (OpenAI's BPE tokenizer), the encoding the
model uses (tiktoken's model table: o200k_base for gpt-4o, gpt-4.1, o-series; cl100k_base for
gpt-4, gpt-35-turbo and the embeddings; o200k_base for a name it does not know).

Many company networks block the download tiktoken would do on first use, so the BPE rank files
ship with the package (`bpe/`, gzip) and are checked against the SHA-256 that tiktoken itself
pins for them before use; tiktoken reads them from a cache directory of this process's own
(tiktoken's documented TIKTOKEN_CACHE_DIR). An encoding is loaded on first need only — most
instances, in front of Azure, never need one (about 30 MB once loaded).

Prompts are counted as OpenAI documents for chat models: 3 tokens per message, 1 more for a
`name`, 3 for the reply's priming, plus the text of every field the model reads.
"""
from __future__ import annotations

import gzip
import hashlib
import logging
import os
import tempfile
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any

logger = logging.getLogger("sekisho.tokenizer")

_DATA = Path(__file__).with_name("bpe")
_SOURCES = {  # tiktoken's own URL for each file (its cache key) and the SHA-256 it pins
    "o200k_base": ("https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
                   "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"),
    "cl100k_base": ("https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
                    "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"),
}
_DEFAULT_ENCODING = "o200k_base"
_PER_MESSAGE, _PER_NAME, _REPLY_PRIMER = 3, 1, 3
_lock = threading.Lock()


def _cache_dir() -> Path:
    configured = os.environ.get("TIKTOKEN_CACHE_DIR")
    if configured:
        return Path(configured)
    directory = Path(tempfile.gettempdir()) / f"sekisho-tiktoken-{os.getuid()}"
    os.environ["TIKTOKEN_CACHE_DIR"] = str(directory)  # read by tiktoken at load time
    return directory


def _install(name: str) -> None:
    """The rank file where tiktoken looks for it, verified, written atomically."""
    url, expected = _SOURCES[name]
    directory = _cache_dir()
    target = directory / hashlib.sha1(url.encode()).hexdigest()
    if target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == expected:
        return
    data = gzip.decompress((_DATA / f"{name}.tiktoken.gz").read_bytes())
    if hashlib.sha256(data).hexdigest() != expected:
        raise RuntimeError(f"the bundled {name} rank file does not match tiktoken's pinned hash")
    directory.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".{os.getpid()}.partial")
    partial.write_bytes(data)
    os.replace(partial, target)


@lru_cache(maxsize=4)
def encoding(name: str):
    import tiktoken  # imported on first need: most instances never count tokens themselves

    with _lock:
        _install(name)
        return tiktoken.get_encoding(name)


def encoding_name(model: str | None) -> str:
    if not model:
        return _DEFAULT_ENCODING
    from tiktoken.model import encoding_name_for_model

    try:
        name = encoding_name_for_model(model)
    except KeyError:
        return _DEFAULT_ENCODING
    return name if name in _SOURCES else _DEFAULT_ENCODING


def count(text: str, model: str | None) -> int:
    if not text:
        return 0
    return len(encoding(encoding_name(model)).encode(text, disallowed_special=()))


def count_chat_prompt(messages: Any, read_text: str, model: str | None) -> int:
    """A chat prompt as the model counts it: every field it reads, and the messages' framing."""
    framing = _REPLY_PRIMER
    for message in messages if isinstance(messages, list) else ():
        framing += _PER_MESSAGE + (_PER_NAME if isinstance(message, dict) and message.get("name") else 0)
        if isinstance(message, dict) and isinstance(message.get("role"), str):
            framing += count(message["role"], model)
    return framing + count(read_text, model)
