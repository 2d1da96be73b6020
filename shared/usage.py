"""What a finished request consumed: tokens from the upstream's answer (whole body or stream),
and the other units some operations are priced by (audio seconds, characters, images)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the context module imports the operations table, which imports this one
    from .context import RequestContext

# Audio whose length the answer does not say is sized by its bytes at this rate (128 kbit/s, the
# common rate of compressed speech); the record marks such units estimated.
_AUDIO_BYTES_PER_SECOND = 16_000


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int = 0
    reported: bool = False  # the upstream said so (vs. nothing known)
    estimated: bool = False  # counted by the gateway (a stream with no usage chunk): what the quota was charged
    units: dict[str, float] = field(default_factory=dict)  # audio_seconds, characters, images:<size>/<quality>

    def as_dict(self) -> dict[str, Any]:
        figures: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "cached_tokens": self.cached_tokens,
        }
        if self.estimated:
            figures["estimated"] = True
        if self.units:
            figures["units"] = dict(self.units)
        return figures


def usage_of(ctx: RequestContext) -> Usage:
    """What the upstream consumed for this request: nothing for a cache hit."""
    if ctx.cache is not None and ctx.cache.status == "HIT":
        return Usage(reported=True)
    raw: dict[str, Any] | None = None
    answer = None
    if ctx.stream_summary is not None:
        raw = ctx.stream_summary.usage
    elif ctx.result is not None and isinstance(ctx.result.json, dict):
        answer = ctx.model_response if isinstance(ctx.model_response, dict) else ctx.result.json
        raw = answer.get("usage")
    usage = parse_usage(raw) if isinstance(raw, dict) else Usage()
    operation = ctx.route.operation if ctx.route is not None else None
    if operation is not None and operation.units is not None and ctx.body is not None and _answered(ctx):
        units = operation.units(ctx.body, answer)
        if units:
            usage = replace(usage, units=units, reported=True)
    return usage


def parse_usage(raw: dict[str, Any]) -> Usage:
    """An answer's `usage` object, in either naming (chat: prompt/completion; Responses, audio,
    images: input/output)."""
    prompt = _int(raw.get("prompt_tokens", raw.get("input_tokens", 0)))
    completion = _int(raw.get("completion_tokens", raw.get("output_tokens", 0)))
    details = raw.get("prompt_tokens_details") or raw.get("input_tokens_details") or {}
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=_int(raw.get("total_tokens", prompt + completion)),
                 cached_tokens=_int(details.get("cached_tokens", 0)) if isinstance(details, dict) else 0, reported=True)


def _answered(ctx: RequestContext) -> bool:
    return ctx.result is not None and ctx.result.status == 200 and ctx.error is None


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


# What the operations table prices besides tokens ------------------------------------------------
def audio_units(body: dict[str, Any], answer: Any) -> dict[str, float]:
    """Seconds of audio transcribed or translated: as the answer says (`usage.seconds`, or a
    verbose answer's `duration`), else sized by the upload's bytes."""
    if isinstance(answer, dict):
        usage = answer.get("usage")
        if isinstance(usage, dict) and usage.get("type") == "duration" and isinstance(usage.get("seconds"), (int, float)):
            return {"audio_seconds": float(usage["seconds"])}
        if isinstance(answer.get("duration"), (int, float)):
            return {"audio_seconds": float(answer["duration"])}
    upload = body.get("file")
    size = upload.get("bytes") if isinstance(upload, dict) else None
    return {"audio_seconds": round((size or 0) / _AUDIO_BYTES_PER_SECOND, 3), "audio_seconds_estimated": 1.0}


def speech_units(body: dict[str, Any], answer: Any) -> dict[str, float]:
    """Characters of text read aloud."""
    text = body.get("input")
    return {"characters": float(len(text))} if isinstance(text, str) else {}


def image_units(body: dict[str, Any], answer: Any) -> dict[str, float]:
    """Images made, by size and quality (how per-image prices are set)."""
    count = len(answer.get("data") or ()) if isinstance(answer, dict) else _int(body.get("n")) or 1
    size = body.get("size") if isinstance(body.get("size"), str) else "1024x1024"
    quality = body.get("quality") if isinstance(body.get("quality"), str) else "standard"
    return {f"images:{size}/{quality}": float(count)} if count else {}
