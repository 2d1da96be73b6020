"""The token usage of a finished request, from the upstream's answer (whole body or stream)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .context import RequestContext


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int = 0
    reported: bool = False  # the upstream said so (vs. nothing known)
    estimated: bool = False  # counted by the gateway (a stream with no usage chunk): what the quota was charged

    def as_dict(self) -> dict[str, int | bool]:
        figures: dict[str, int | bool] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "cached_tokens": self.cached_tokens,
        }
        if self.estimated:
            figures["estimated"] = True
        return figures


def usage_of(ctx: RequestContext) -> Usage:
    """What the upstream consumed for this request: nothing for a cache hit."""
    if ctx.cache is not None and ctx.cache.status == "HIT":
        return Usage(reported=True)
    raw: dict[str, Any] | None = None
    if ctx.stream_summary is not None:
        raw = ctx.stream_summary.usage
    elif ctx.result is not None and isinstance(ctx.result.json, dict):
        raw = ctx.result.json.get("usage")
    if not isinstance(raw, dict):
        return Usage()
    prompt = int(raw.get("prompt_tokens", raw.get("input_tokens", 0)) or 0)
    completion = int(raw.get("completion_tokens", raw.get("output_tokens", 0)) or 0)
    details = raw.get("prompt_tokens_details") or raw.get("input_tokens_details") or {}
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=int(raw.get("total_tokens", prompt + completion) or 0),
        cached_tokens=int(details.get("cached_tokens", 0) or 0),
        reported=True,
    )
