"""Server-sent events: splitting a byte stream into events, and reading what a stream said.

Azure OpenAI streams are `data: {json}` events separated by blank lines, ending in `data: [DONE]`;
the Responses API adds `event:` lines. Events are relayed whole and as soon as they are complete.
"""
from __future__ import annotations

from typing import Any, AsyncIterator

import orjson

from .context import StreamSummary

DONE = b"[DONE]"


class Event:
    """One SSE event on its way to the client: the bytes as the upstream sent them, and its JSON
    payload decoded once (by the relay). A stage that changes the payload calls `changed`; the
    event is then encoded again on the way out, and only then."""

    __slots__ = ("raw", "payload", "name")

    def __init__(self, raw: bytes | None, payload: Any = None, name: str | None = None) -> None:
        self.raw = raw
        self.payload = payload  # a dict, or None for [DONE], comments and non-JSON data
        self.name = name  # the `event:` line, if it had one

    @classmethod
    def of(cls, payload: dict[str, Any], name: str | None = None) -> "Event":
        return cls(None, payload, name)

    def changed(self, payload: dict[str, Any]) -> None:
        self.payload, self.raw = payload, None

    def encoded(self) -> bytes:
        return self.raw if self.raw is not None else encode_event(self.payload, self.name)


async def close(events: Any) -> None:
    """Close a stream of events now: its upstream connection is released, not left to the collector."""
    closer = getattr(events, "aclose", None)
    if closer is not None:
        await closer()


async def split_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Re-cut arbitrary byte chunks into complete SSE events (each ending in a blank line)."""
    buffer = b""
    async for chunk in chunks:
        if not chunk:
            continue
        buffer += chunk
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        while True:
            end = buffer.find(b"\n\n")
            if end < 0:
                break
            event, buffer = buffer[: end + 2], buffer[end + 2 :]
            if event.strip():
                yield event
    if buffer.strip():
        yield buffer.rstrip(b"\n") + b"\n\n"


_FIELDS = (b"data:", b"event:", b"id:", b"retry:", b":", b"[DONE]")


def looks_like_events(first: bytes) -> bool:
    """Whether the first bytes of an answer are an event stream rather than a JSON body."""
    return first.lstrip(b"\r\n\xef\xbb\xbf").startswith(_FIELDS)


def finish_reason_out_of_delta(payload: dict[str, Any]) -> bool:
    """Some Azure-compatible servers put `finish_reason` inside `delta`; Azure and the SDKs
    expect it on the choice. Moved there; True when the chunk changed."""
    moved = False
    for choice in payload.get("choices") or ():
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if isinstance(delta, dict) and "finish_reason" in delta:
            reason = delta.pop("finish_reason")
            if reason is not None and not choice.get("finish_reason"):
                choice["finish_reason"] = reason
            moved = True
    return moved


def event_data(event: bytes) -> bytes | None:
    """The joined `data:` payload of one event, or None when it has none."""
    data = None
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            value = line[5:]
            if value.startswith(b" "):
                value = value[1:]
            data = value if data is None else data + b"\n" + value
    return data


def encode_event(payload: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + orjson.dumps(payload) + b"\n\n"


def is_usage_only_chunk(payload: dict[str, Any]) -> bool:
    """The chunk that `stream_options.include_usage` adds: no choices, usage set."""
    return not payload.get("choices") and bool(payload.get("usage"))


def _slot(summary: StreamSummary, index: int) -> dict[str, Any]:
    """What a stream wrote for one choice (Responses and transcripts: choice 0), started on first use."""
    slot = summary.choices.get(index)
    if slot is None:
        slot = summary.choices[index] = {"index": index, "text": [], "tool_calls": {}, "finish_reason": None}
    return slot


def absorb(summary: StreamSummary, payload: dict[str, Any]) -> None:
    """Fold one decoded stream chunk into the summary (chat, completions and Responses API)."""
    summary.chunks += 1
    if "error" in payload and payload.get("error"):
        summary.error = payload["error"]
    kind = payload.get("type")
    if isinstance(kind, str) and kind.startswith("response."):
        _absorb_responses_event(summary, kind, payload)
        return
    if isinstance(kind, str) and kind.startswith("transcript.text."):
        slot = _slot(summary, 0)
        if kind == "transcript.text.delta":
            slot["text"].append(payload.get("delta") or "")
        elif kind == "transcript.text.done":
            slot["finish_reason"] = "stop"
            if isinstance(payload.get("usage"), dict):
                summary.usage = payload["usage"]
        return
    if payload.get("model"):
        summary.model = payload["model"]
    if payload.get("id"):
        summary.response_id = payload["id"]
    if payload.get("usage"):
        summary.usage = payload["usage"]
    for choice in payload.get("choices") or ():
        index = choice.get("index", 0)
        slot = _slot(summary, index)
        delta = choice.get("delta")
        if isinstance(delta, dict):
            if delta.get("content"):
                slot["text"].append(delta["content"])
            if delta.get("refusal"):
                slot.setdefault("refusal", []).append(delta["refusal"])
            for call in delta.get("tool_calls") or ():
                entry = slot["tool_calls"].setdefault(call.get("index", 0), {"id": None, "name": "", "arguments": []})
                if call.get("id"):
                    entry["id"] = call["id"]
                function = call.get("function") or {}
                if function.get("name"):
                    entry["name"] += function["name"]
                if function.get("arguments"):
                    entry["arguments"].append(function["arguments"])
        elif choice.get("text"):  # legacy completions
            slot["text"].append(choice["text"])
        if choice.get("finish_reason"):
            slot["finish_reason"] = choice["finish_reason"]


def _absorb_responses_event(summary: StreamSummary, kind: str, payload: dict[str, Any]) -> None:
    if kind in ("response.output_text.delta", "response.refusal.delta", "response.function_call_arguments.delta"):
        slot = _slot(summary, 0)
        piece = payload.get("delta") or ""
        if kind == "response.output_text.delta":
            slot["text"].append(piece)
        elif kind == "response.refusal.delta":
            slot.setdefault("refusal", []).append(piece)
        else:
            call = slot["tool_calls"].setdefault(payload.get("output_index", 0), {"id": payload.get("item_id"), "name": "", "arguments": []})
            call["arguments"].append(piece)
    elif kind in ("response.created", "response.completed", "response.failed", "response.incomplete"):
        response = payload.get("response") or {}
        summary.response_id = response.get("id") or summary.response_id
        summary.model = response.get("model") or summary.model
        if response.get("usage"):
            summary.usage = response["usage"]
        if kind != "response.created":
            summary.final_response = response
            slot = _slot(summary, 0)
            slot["finish_reason"] = response.get("status")


def streamed_text(summary: StreamSummary) -> str:
    """Everything the model wrote in a stream so far: texts, refusals and tool calls."""
    parts = []
    for slot in summary.choices.values():
        parts.extend(slot["text"])
        parts.extend(slot.get("refusal") or ())
        for call in slot["tool_calls"].values():
            parts.append(call["name"])
            parts.extend(call["arguments"])
    return "\n".join(p for p in parts if p)


def assembled_response(summary: StreamSummary) -> dict[str, Any]:
    """The streamed answer as one object, for the request log."""
    choices = []
    for index in sorted(summary.choices):
        slot = summary.choices[index]
        choice: dict[str, Any] = {"index": index, "text": "".join(slot["text"]), "finish_reason": slot["finish_reason"]}
        if slot.get("refusal"):
            choice["refusal"] = "".join(slot["refusal"])
        if slot["tool_calls"]:
            choice["tool_calls"] = [
                {"id": c["id"], "name": c["name"], "arguments": "".join(c["arguments"])}
                for _, c in sorted(slot["tool_calls"].items())
            ]
        choices.append(choice)
    out: dict[str, Any] = {"id": summary.response_id, "model": summary.model, "choices": choices}
    if summary.error:
        out["error"] = summary.error
    return out
