"""The output guard: the same rules on what the model answers, plus system-prompt leak
protection, on whole answers and inside streams.

A stream is guarded per text channel (a choice, or a Responses output part). Each new piece of
text is scanned together with the text still held back; everything is released at once except
the shortest tail that a later character could still turn into a match (the longest rule's span,
or the leak threshold). On a hit the policy's action applies: `redact` replaces the matched text,
`block` ends the channel there with `finish_reason: "content_filter"` (Responses: status
`incomplete`, reason `content_filter`). Blocked streams are read to their end without relaying,
so the usage chunk still arrives and the cost stays exact.
"""
from __future__ import annotations

import copy
from typing import Any, AsyncIterator

import orjson

from . import sse
from .context import RequestContext, UpstreamResult
from .guard_rules import GuardMatcher, leak_index
from .pipeline import Stage
from .routes import Operation


class GuardedChannel:
    def __init__(self, matcher: GuardMatcher, action: str, redaction: str, decisions: list, where: str) -> None:
        self._matcher = matcher
        self._action = action
        self._redaction = redaction
        self._decisions = decisions
        self._where = where
        self.text = ""  # the guarded text so far (redactions applied, cut at a block)
        self.released = 0
        self._settled = 0  # text before this index is final (released, or a redaction)
        self.blocked: str | None = None

    def feed(self, piece: str, final: bool = False) -> str:
        """Add text; returns what may be sent to the client now."""
        if self.blocked:
            return ""
        self.text += piece
        start = max(self.released, self._settled)
        region = self.text[start:]
        # Only the unreleased tail is scanned: a match cannot start in text already released.
        hits, region_cut = self._matcher.scan(region, release=not final) if region else ([], 0)
        cut = len(self.text) if final else start + region_cut
        if not final:
            pending = [h for h in hits if start + h.end > cut]  # could still grow: decide later
            hits = [h for h in hits if start + h.end <= cut]
            if pending:
                cut = min(cut, start + min(h.start for h in pending))
        if hits and self._action == "block":
            hit = hits[0]
            self._decide(hit.rule, "block")
            self.text = self.text[: start + hit.start]
            self.blocked = hit.rule
            out, self.released = self.text[self.released :], len(self.text)
            return out
        if hits:
            pieces, position = [], 0
            for hit in hits:
                if hit.start < position:
                    continue  # overlaps an earlier hit
                pieces.append(region[position : hit.start])
                pieces.append(self._redaction)
                position = hit.end
                self._decide(hit.rule, "redact")
            pieces.append(region[position:])
            before = len(self.text)
            self.text = self.text[:start] + "".join(pieces)
            self._settled = start + len("".join(pieces[:-1]))
            cut = max(self._settled, cut + (len(self.text) - before)) if not final else len(self.text)
        cut = max(self.released, min(cut, len(self.text)))
        out, self.released = self.text[self.released : cut], cut
        return out

    def flush(self) -> str:
        return self.feed("", final=True)

    def _decide(self, rule: str, action: str) -> None:
        self._decisions.append({"direction": "output", "rule": rule, "action": action, "where": self._where})


def _answer_texts(body: dict) -> list[str]:
    """The texts of a whole answer that the guard reads (chat, completions, Responses)."""
    texts = []
    for choice in body.get("choices") or ():
        if isinstance(choice, dict):
            message = choice.get("message")
            text = message.get("content") if isinstance(message, dict) else choice.get("text")
            if isinstance(text, str) and text:
                texts.append(text)
    for item in body.get("output") or ():
        for part in item.get("content") or () if isinstance(item, dict) else ():
            if isinstance(part, dict) and part.get("type") == "output_text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
    return texts


def _filter_result(rule: str) -> dict[str, Any]:
    return {"custom_blocklists": {"filtered": True, "details": [{"filtered": True, "id": rule}]}}


class GuardOutput(Stage):
    name = "output_guard"

    def _matcher(self, ctx: RequestContext) -> GuardMatcher | None:
        policy = ctx.policy
        if policy is None or ctx.route.operation in (Operation.EMBEDDINGS, Operation.MODELS):
            return None
        leak = ctx.system_prompt if policy.leak_protection.enabled else None
        if not policy.guard_rules and not leak:
            return None
        matcher = GuardMatcher(policy.rule_set("output"), leak_index(leak, policy.leak_protection.min_chars) if leak else None)
        return None if matcher.empty else matcher

    def _channel(self, ctx: RequestContext, matcher: GuardMatcher, where: str) -> GuardedChannel:
        return GuardedChannel(matcher, ctx.policy.output_action, ctx.policy.redaction, ctx.guard_decisions, where)

    def after(self, ctx: RequestContext, result: UpstreamResult) -> UpstreamResult:
        matcher = self._matcher(ctx)
        if matcher is None or result.status != 200:
            return result
        if result.is_stream:
            wrap = self._responses_stream if ctx.route.operation is Operation.RESPONSES else self._chat_stream
            result.events = wrap(ctx, matcher, result.events)
            return result
        if not isinstance(result.json, dict):
            return result
        if not any(matcher.find(text) for text in _answer_texts(result.json)):
            return result  # the common case: nothing to change, so no copy of the answer
        body = copy.deepcopy(result.json)
        if ctx.route.operation is Operation.RESPONSES:
            self._guard_response_object(ctx, matcher, body)
        else:
            for choice in body.get("choices") or ():
                self._guard_choice(ctx, matcher, choice)
        if ctx.guard_decisions:
            ctx.model_response = result.json
            result.json, result.body = body, orjson.dumps(body)
        return result

    # Whole answers --------------------------------------------------------------------------
    def _guard_choice(self, ctx, matcher, choice: dict) -> None:
        message = choice.get("message")
        field_owner, field = (message, "content") if isinstance(message, dict) else (choice, "text")
        text = field_owner.get(field)
        if not isinstance(text, str) or not text:
            return
        channel = self._channel(ctx, matcher, f"choice {choice.get('index', 0)}")
        channel.feed(text, final=True)
        field_owner[field] = channel.text
        if channel.text != text:
            choice["logprobs"] = None  # they would carry what was redacted or cut
        if channel.blocked:
            choice["finish_reason"] = "content_filter"
            choice["content_filter_results"] = {**(choice.get("content_filter_results") or {}), **_filter_result(channel.blocked)}

    def _guard_response_object(self, ctx, matcher, response: dict) -> None:
        blocked = None
        for item in response.get("output") or ():
            for part in item.get("content") or () if isinstance(item, dict) else ():
                if isinstance(part, dict) and part.get("type") == "output_text" and isinstance(part.get("text"), str):
                    channel = self._channel(ctx, matcher, "output_text")
                    channel.feed(part["text"], final=True)
                    part["text"] = channel.text
                    blocked = blocked or channel.blocked
        if blocked:
            response["status"] = "incomplete"
            response["incomplete_details"] = {"reason": "content_filter"}

    # Chat and completions streams -----------------------------------------------------------
    async def _chat_stream(self, ctx: RequestContext, matcher: GuardMatcher, events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        channels: dict[int, GuardedChannel] = {}
        chat = ctx.route.operation is Operation.CHAT
        try:
            async for event in events:
                data = sse.event_data(event)
                if data is None or data == sse.DONE:
                    yield event
                    continue
                try:
                    payload = orjson.loads(data)
                except orjson.JSONDecodeError:
                    yield event
                    continue
                choices = payload.get("choices") if isinstance(payload, dict) else None
                if not choices:
                    yield event
                    continue
                kept = []
                changed = False  # an event the guard leaves as it is goes out as it came, not re-encoded
                for choice in choices:
                    index = choice.get("index", 0)
                    channel = channels.get(index)
                    if channel is None:
                        channel = channels[index] = self._channel(ctx, matcher, f"choice {index}")
                    if channel.blocked:
                        changed = True
                        continue  # the choice ended at the block: drop what follows
                    if chat:
                        delta = choice.get("delta")
                        piece = delta.get("content") if isinstance(delta, dict) else None
                    else:
                        piece = choice.get("text")
                    has_piece = isinstance(piece, str)
                    released = channel.feed(piece) if has_piece and piece else ""
                    finishing = bool(choice.get("finish_reason"))
                    if finishing and not channel.blocked:
                        released += channel.flush()
                    if channel.blocked or released != (piece if has_piece else "") or choice.get("logprobs") is not None:
                        changed = True
                    choice = dict(choice)
                    choice.pop("logprobs", None)  # logprobs carry the raw tokens the guard may hold back
                    if channel.blocked:
                        choice["finish_reason"] = "content_filter"
                        choice["content_filter_results"] = _filter_result(channel.blocked)
                    if has_piece or released or channel.blocked:
                        if chat:
                            choice["delta"] = {**(choice.get("delta") or {}), "content": released}
                        else:
                            choice["text"] = released
                    if has_piece and not released and not channel.blocked and not finishing and _only_content(choice, chat):
                        changed = True
                        continue  # all of this piece is held back for now
                    kept.append(choice)
                if kept:
                    yield sse.encode_event({**payload, "choices": kept}) if changed else event
        finally:
            closer = getattr(events, "aclose", None)
            if closer is not None:
                await closer()

    # Responses API streams ---------------------------------------------------------------------
    async def _responses_stream(self, ctx: RequestContext, matcher: GuardMatcher, events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        channels: dict[tuple[int, int], GuardedChannel] = {}

        def channel_for(payload) -> GuardedChannel:
            key = (payload.get("output_index", 0), payload.get("content_index", 0))
            if key not in channels:
                channels[key] = self._channel(ctx, matcher, f"output {key[0]}.{key[1]}")
            return channels[key]

        try:
            async for event in events:
                data = sse.event_data(event)
                try:
                    payload = orjson.loads(data) if data and data != sse.DONE else None
                except orjson.JSONDecodeError:
                    payload = None
                kind = payload.get("type") if isinstance(payload, dict) else None
                if kind == "response.output_text.delta":
                    channel = channel_for(payload)
                    released = channel.feed(payload.get("delta") or "")
                    if released:
                        yield sse.encode_event({**payload, "delta": released}, kind)
                    continue
                if kind == "response.output_text.done":
                    channel = channel_for(payload)
                    rest = channel.flush()
                    if rest:
                        yield sse.encode_event({**payload, "type": "response.output_text.delta", "delta": rest}, "response.output_text.delta")
                    yield sse.encode_event({**payload, "text": channel.text}, kind)
                    continue
                if kind in ("response.content_part.done", "response.output_item.done", "response.completed", "response.incomplete"):
                    yield sse.encode_event(self._rewrite_texts(kind, payload, channels), kind)
                    continue
                yield event
        finally:
            closer = getattr(events, "aclose", None)
            if closer is not None:
                await closer()

    @staticmethod
    def _rewrite_texts(kind: str, payload: dict, channels: dict) -> dict:
        payload = copy.deepcopy(payload)
        blocked = any(c.blocked for c in channels.values())

        def fix_item(output_index: int, item: dict) -> None:
            for content_index, part in enumerate(item.get("content") or ()):
                channel = channels.get((output_index, content_index))
                if channel is not None and isinstance(part, dict) and "text" in part:
                    part["text"] = channel.text

        if kind == "response.content_part.done":
            channel = channels.get((payload.get("output_index", 0), payload.get("content_index", 0)))
            if channel is not None and isinstance(payload.get("part"), dict):
                payload["part"]["text"] = channel.text
        elif kind == "response.output_item.done" and isinstance(payload.get("item"), dict):
            fix_item(payload.get("output_index", 0), payload["item"])
        elif isinstance(payload.get("response"), dict):
            for output_index, item in enumerate(payload["response"].get("output") or ()):
                if isinstance(item, dict):
                    fix_item(output_index, item)
            if blocked:
                payload["response"]["status"] = "incomplete"
                payload["response"]["incomplete_details"] = {"reason": "content_filter"}
        return payload


def _only_content(choice: dict, chat: bool) -> bool:
    """A streamed choice that carries nothing but its text piece."""
    if not chat:
        return not choice.get("logprobs")
    delta = choice.get("delta") or {}
    return set(delta) <= {"content"} and not choice.get("logprobs")
