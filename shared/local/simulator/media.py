"""The simulator's audio and images: transcripts from the uploaded bytes, speech as audio bytes,
and small generated PNGs, each the same for the same input.

Transcription models: whisper-class answers carry no token usage (priced by audio length;
`verbose_json` says the duration), gpt-4o-transcribe-class answers carry token usage and can
stream (`transcript.text.delta` / `.done` events). Image models: dall-e-3 answers with URLs by
default and a `revised_prompt`; gpt-image-1 with base64 and token usage.
"""
from __future__ import annotations

import base64
import hashlib
import struct
import time
import zlib
from typing import Any

import orjson

from . import generator as gen

TRANSCRIBE_MODELS = {"whisper": "whisper", "gpt-4o-transcribe": "gpt-4o-transcribe", "gpt-4o-mini-transcribe": "gpt-4o-mini-transcribe"}
SPEECH_MODELS = {"tts": "tts", "tts-hd": "tts-hd", "gpt-4o-mini-tts": "gpt-4o-mini-tts"}
IMAGE_MODELS = {"dall-e-3": "dall-e-3", "gpt-image-1": "gpt-image-1"}
_BYTES_PER_SECOND = 16_000  # the simulated audio's bit rate, both ways (128 kbit/s)
_AUDIO_TYPES = {"mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac", "flac": "audio/flac", "wav": "audio/wav", "pcm": "audio/pcm"}


def token_usage(model: str) -> bool:
    return not model.startswith("whisper")


def transcript(audio: bytes, controls: dict[str, Any]) -> tuple[str, float]:
    """(text, seconds) for an upload: the text from its bytes (or x_sim reply), its length by size."""
    if isinstance(controls.get("reply"), str):
        text = controls["reply"]
    else:
        text = "".join(gen.reply_tokens(hashlib.sha256(audio).digest(), None, default_length=10))
    return text, round(len(audio) / _BYTES_PER_SECOND, 2)


def _timestamp(seconds: float, separator: str) -> str:
    whole = int(seconds)
    return f"{whole // 3600:02d}:{whole // 60 % 60:02d}:{whole % 60:02d}{separator}{int(round((seconds - whole) * 1000)):03d}"


def transcription_answer(model: str, task: str, text: str, seconds: float, prompt: str, response_format: str) -> tuple[bytes, str]:
    """The answer body and its content type, in the requested format."""
    end = max(seconds, 0.5)
    if response_format == "text":
        return (text + "\n").encode(), "text/plain; charset=utf-8"
    if response_format == "srt":
        return f"1\n{_timestamp(0, ',')} --> {_timestamp(end, ',')}\n{text}\n\n".encode(), "text/plain; charset=utf-8"
    if response_format == "vtt":
        return f"WEBVTT\n\n{_timestamp(0, '.')} --> {_timestamp(end, '.')}\n{text}\n\n".encode(), "text/vtt; charset=utf-8"
    if response_format == "verbose_json":
        payload: dict[str, Any] = {
            "task": task, "language": "english", "duration": seconds, "text": text,
            "segments": [{"id": 0, "seek": 0, "start": 0.0, "end": end, "text": text, "tokens": [], "temperature": 0.0,
                          "avg_logprob": -0.2, "compression_ratio": 1.2, "no_speech_prob": 0.01}],
        }
        return orjson.dumps(payload), "application/json"
    payload = {"text": text}
    if token_usage(model):
        payload["usage"] = transcription_usage(text, seconds, prompt)
    return orjson.dumps(payload), "application/json"


def transcription_usage(text: str, seconds: float, prompt: str) -> dict[str, Any]:
    audio_tokens = max(1, int(seconds * 10))
    text_tokens = gen.count_tokens(prompt or "")
    output = gen.count_tokens(text)
    return {"type": "tokens", "input_tokens": audio_tokens + text_tokens, "output_tokens": output,
            "total_tokens": audio_tokens + text_tokens + output,
            "input_token_details": {"audio_tokens": audio_tokens, "text_tokens": text_tokens}}


def transcription_events(text: str, seconds: float, prompt: str, chunks: int | None) -> list[bytes]:
    events = [b"data: " + orjson.dumps({"type": "transcript.text.delta", "delta": piece}) + b"\n\n" for piece in gen.split_reply(text, chunks)]
    events.append(b"data: " + orjson.dumps({"type": "transcript.text.done", "text": text, "usage": transcription_usage(text, seconds, prompt)}) + b"\n\n")
    return events


def speech(text: str, response_format: str) -> tuple[bytes, str]:
    """Bytes standing for the spoken text: as many as its reading would last, the same each time."""
    seconds = max(0.2, len(text) / 15)  # about 15 characters a second
    size = int(seconds * _BYTES_PER_SECOND)
    seed = hashlib.sha256(text.encode()).digest()
    body = (seed * (size // len(seed) + 1))[:size]
    if response_format == "wav":
        body = b"RIFF" + struct.pack("<I", 36 + len(body)) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, 16000, 32000, 2, 16) + b"data" + struct.pack("<I", len(body)) + body
    elif response_format == "mp3":
        body = b"ID3" + body
    return body, _AUDIO_TYPES.get(response_format, "application/octet-stream")


def png(seed: bytes, side: int = 8) -> bytes:
    """A small solid PNG whose colour comes from the seed."""
    row = b"\x00" + bytes(seed[:3]) * side
    raw = row * side

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def images_answer(model: str, body: dict[str, Any], controls: dict[str, Any], base_url: str) -> dict[str, Any]:
    prompt = body.get("prompt") if isinstance(body.get("prompt"), str) else ""
    try:
        count = max(1, min(10, int(body.get("n") or 1)))
    except (TypeError, ValueError):
        count = 1
    wants = body.get("response_format") or ("b64_json" if model.startswith("gpt-image") else "url")
    data = []
    for index in range(count):
        seed = gen.seed_of(prompt, body.get("size"), index)
        item: dict[str, Any] = {"b64_json": base64.b64encode(png(seed)).decode()} if wants == "b64_json" else {
            "url": f"{base_url}/_sim/images/{seed.hex()[:32]}.png"}
        if model.startswith("dall-e"):
            item["revised_prompt"] = controls.get("revised_prompt") if isinstance(controls.get("revised_prompt"), str) else f"A detailed picture of {prompt}"
        data.append(item)
    answer: dict[str, Any] = {"created": int(time.time()), "data": data}
    if model.startswith("gpt-image"):
        text_tokens = gen.count_tokens(prompt)
        answer["usage"] = {"input_tokens": text_tokens, "output_tokens": 272 * count, "total_tokens": text_tokens + 272 * count,
                           "input_tokens_details": {"text_tokens": text_tokens, "image_tokens": 0}}
    return answer
