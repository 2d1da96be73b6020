"""The output guard: the same rules on what the model answers, plus system-prompt leak
protection, on every field the model writes (the operation's `writes`, and in streams its
`stream_writes` or `stream_events`:
content, refusals, tool-call names and arguments, Responses output items and function-call
arguments), on whole answers and inside streams.

A stream is guarded per channel: one written field of one choice, tool call or output part.
Each new piece of text is scanned together with the text still held back; everything is released
at once except the tail that a later character could still turn into a match: the longest end
that begins a word rule, a run copied from the system prompt or a regex match (rules.py), and the
last character (a combining mark may follow). Text that cannot begin a match is never held. On a hit the policy's action applies: `redact`
replaces the matched text, `block` ends the choice there with `finish_reason: "content_filter"`
(Responses: status `incomplete`, reason `content_filter`). Blocked streams are read to their end
without relaying, so the usage chunk still arrives and the cost stays exact.

Stream events arrive decoded once (`sse.Event`); an event the guard leaves alone goes out as the
upstream sent it.
"""
from __future__ import annotations

import copy
from typing import Any, AsyncIterator

import orjson

from .. import sse
from ..context import RequestContext, UpstreamResult
from ..field_paths import EACH, Location, replace
from ..operations import OUTPUT_GUARD, Operation, batch_line_operation
from ..policy.system_prompt import render
from ..pipeline import Stage
from .rules import GuardMatcher, leak_index


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


def _filter_result(rule: str) -> dict[str, Any]:
    return {"custom_blocklists": {"filtered": True, "details": [{"filtered": True, "id": rule}]}}


def _where(location: Location) -> str:
    """The field as the log names it: its path with the array positions filled in."""
    indexes = iter(location.indexes)
    return "".join(f"{part}[{next(indexes, '')}]" if number < location.path.count(EACH) else part
                   for number, part in enumerate(location.path.split(EACH)))


class GuardOutput(Stage):
    name = OUTPUT_GUARD

    def _matcher(self, ctx: RequestContext) -> GuardMatcher | None:
        policy = ctx.policy
        if policy is None:
            return None
        prompt = ctx.system_prompt.text if ctx.system_prompt is not None else None
        if prompt is None and _batch_output(ctx) and policy.system_prompt is not None:
            prompt = render(policy.system_prompt.text, ctx)  # what went into the batch's lines
        leak = prompt if policy.leak_protection.enabled else None
        if not policy.guard_rules and not leak:
            return None
        leaks = leak_index(leak, policy.leak_protection.min_chars, policy.folding) if leak else None
        matcher = GuardMatcher(policy.rule_set("output"), leaks)
        return None if matcher.empty else matcher

    def _channel(self, ctx: RequestContext, matcher: GuardMatcher, where: str) -> GuardedChannel:
        return GuardedChannel(matcher, ctx.policy.output_action, ctx.policy.redaction, ctx.guard_decisions, where)

    def after(self, ctx: RequestContext, result: UpstreamResult) -> UpstreamResult:
        if result.status != 200:
            return result
        matcher = self._matcher(ctx)
        if matcher is None:
            return result
        operation = ctx.route.operation
        batch = _batch_output(ctx) if result.is_stream else None
        if batch is not None:
            line_operation = batch_line_operation(batch.get("endpoint") or "/v1/chat/completions")
            result.events = self._batch_output_lines(ctx, matcher, line_operation, result.events)
            return result
        if result.is_stream:
            guard = _STREAM_GUARDS.get(operation.stream_shape)
            if guard is not None:
                result.events = guard(self, ctx, matcher, result.events)
            return result
        if result.json is None and result.body and result.headers.get("content-type", "").startswith("text/") and operation.writes:
            # A text answer (a transcript as text, srt or vtt) is one written field.
            text = result.body.decode("utf-8", "replace")
            channel = self._channel(ctx, matcher, "text")
            channel.feed(text, final=True)
            if channel.text != text:
                result.body = channel.text.encode("utf-8")
            return result
        if not isinstance(result.json, dict):
            return result
        if not any(matcher.find(text) for text in operation.writes.texts(result.json)):
            return result  # the common case: nothing to change, so no copy of the answer
        body = copy.deepcopy(result.json)
        self._guard_whole(ctx, matcher, operation, body)
        if ctx.guard_decisions:
            ctx.model_response = result.json
            result.json, result.body = body, orjson.dumps(body)
        return result

    # A batch's output file -------------------------------------------------------------------
    async def _batch_output_lines(self, ctx: RequestContext, matcher: GuardMatcher, operation: Operation,
                                  events: AsyncIterator[sse.Event]) -> AsyncIterator[sse.Event]:
        """Each line's answer guarded as the same answer sent on its own would be, line by line as
        the file arrives (a line is held until it is whole)."""
        pending = bytearray()
        async for event in events:
            pending += event.encoded()
            end = pending.rfind(b"\n")
            if end >= 0:
                whole, pending = bytes(pending[: end + 1]), pending[end + 1 :]
                yield sse.Event(b"".join(self._guard_line(ctx, matcher, operation, raw) + b"\n" for raw in whole.split(b"\n")[:-1]))
        if pending:
            yield sse.Event(self._guard_line(ctx, matcher, operation, bytes(pending)))

    def _guard_line(self, ctx: RequestContext, matcher: GuardMatcher, operation: Operation, raw: bytes) -> bytes:
        try:
            line = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return raw
        response = line.get("response") if isinstance(line, dict) else None
        body = response.get("body") if isinstance(response, dict) else None
        if not isinstance(body, dict) or not any(matcher.find(text) for text in operation.writes.texts(body)):
            return raw
        body = copy.deepcopy(body)
        decided = len(ctx.guard_decisions)
        self._guard_whole(ctx, matcher, operation, body)
        for decision in ctx.guard_decisions[decided:]:
            decision["where"] = f"{line.get('custom_id')}: {decision.get('where')}"
        response["body"] = body
        return orjson.dumps(line)

    # Whole answers --------------------------------------------------------------------------
    def _guard_whole(self, ctx: RequestContext, matcher: GuardMatcher, operation: Operation, body: dict) -> None:
        blocked_choices: set[int] = set()  # ids of the choices a block ended
        response_blocked = False
        for location in operation.writes.locations(body):
            # Chat and completions answers end per choice; others (Responses, transcripts, images) as a whole.
            per_choice = location.path.startswith("choices" + EACH)
            choice = body["choices"][_position(body["choices"], location.indexes[0])] if per_choice else None
            if choice is not None and id(choice) in blocked_choices:
                continue  # the choice ended at an earlier block
            channel = self._channel(ctx, matcher, _where(location))
            channel.feed(location.text, final=True)
            if channel.text != location.text:
                replace(location, channel.text)
                if choice is not None:
                    choice["logprobs"] = None  # they would carry what was redacted or cut
            if not channel.blocked:
                continue
            if choice is None:
                response_blocked = True
                continue
            blocked_choices.add(id(choice))
            message = choice.get("message")
            if isinstance(message, dict):
                # The choice ends at the block: tool calls (written after the text, or cut by the
                # block) are not made.
                message.pop("tool_calls", None)
                message.pop("function_call", None)
            choice["finish_reason"] = "content_filter"
            choice["content_filter_results"] = {**(choice.get("content_filter_results") or {}), **_filter_result(channel.blocked)}
        if response_blocked and body.get("object") == "response":  # other answers (transcripts, images) are cut at the block
            body["status"] = "incomplete"
            body["incomplete_details"] = {"reason": "content_filter"}

    # Chat and completions streams -----------------------------------------------------------
    async def _choice_stream(self, ctx: RequestContext, matcher: GuardMatcher, events: AsyncIterator[sse.Event]) -> AsyncIterator[sse.Event]:
        writes = ctx.route.operation.stream_writes
        channels: dict[tuple, GuardedChannel] = {}
        blocked: dict[int, str] = {}  # choice index → the rule that ended it
        ended: set[int] = set()  # blocked choices whose content_filter finish went out
        try:
            async for event in events:
                payload = event.payload
                choices = payload.get("choices") if isinstance(payload, dict) else None
                if not choices or not isinstance(choices, list):
                    yield event
                    continue
                # The payload is this event's own (decoded for it alone): changed in place.
                changed = False
                for location in writes.locations(payload):
                    index = location.indexes[0]
                    if index in blocked:
                        replace(location, "")  # the choice ended at a block: nothing after it goes out
                        changed = True
                        continue
                    key = (location.path, location.indexes)
                    channel = channels.get(key)
                    if channel is None:
                        channel = channels[key] = self._channel(ctx, matcher, _where(location))
                    released = channel.feed(location.text)
                    if released != location.text:
                        replace(location, released)
                        changed = True
                    if channel.blocked:
                        blocked[index] = channel.blocked
                kept = []
                for position, choice in enumerate(choices):
                    if not isinstance(choice, dict):
                        kept.append(choice)
                        continue
                    index = choice.get("index", position)
                    if index in ended:
                        changed = True
                        continue  # the choice ended at the block: drop what follows
                    if choice.get("finish_reason") and index not in blocked:
                        for (path, indexes), channel in channels.items():
                            if indexes[0] == index and (rest := channel.flush()):
                                append_text(choice, path, indexes[1:], rest)
                                changed = True
                            if indexes[0] == index and channel.blocked and index not in blocked:
                                blocked[index] = channel.blocked  # found only once the text was whole
                    if index in blocked:
                        delta = choice.get("delta")
                        if isinstance(delta, dict):  # a tool call the block cut short is not made
                            delta.pop("tool_calls", None)
                            delta.pop("function_call", None)
                        choice["finish_reason"] = "content_filter"
                        choice["content_filter_results"] = _filter_result(blocked[index])
                        ended.add(index)
                        changed = True
                    if changed and "logprobs" in choice:
                        choice.pop("logprobs", None)  # logprobs carry the raw tokens the guard may hold back
                    if changed and _only_empty_pieces(choice):
                        continue  # all of this piece is held back for now
                    kept.append(choice)
                if not changed:
                    yield event
                elif kept:
                    payload["choices"] = kept
                    event.changed(payload)
                    yield event
        finally:
            await sse.close(events)

    # Responses API streams ---------------------------------------------------------------------
    async def _response_stream(self, ctx: RequestContext, matcher: GuardMatcher, events: AsyncIterator[sse.Event]) -> AsyncIterator[sse.Event]:
        writes, fields = ctx.route.operation.writes, ctx.route.operation.stream_events
        channels: dict[tuple, GuardedChannel] = {}
        blocked: str | None = None  # the rule that ended the answer

        def channel_for(key: tuple, where: str) -> GuardedChannel:
            channel = channels.get(key)
            if channel is None:
                channel = channels[key] = self._channel(ctx, matcher, where)
            return channel

        def guard_object(holder: dict, member: str, output_index: int) -> str | None:
            """Texts inside an item, part or response object, as the channels guarded them; the
            rule that blocked one of them, if any."""
            value = holder.get(member)
            final = holder.get("type", "").endswith(".done") or holder.get("type") in _FINAL_RESPONSE_EVENTS
            hit = None
            if member == "item":
                wrapped = {"output": [value]}
            elif member == "part":
                wrapped = {"output": [{"content": [value]}]}
            else:
                wrapped = value
            for location in writes.locations(wrapped):
                if member == "item":
                    indexes = (output_index, *location.indexes[1:])
                elif member == "part":
                    indexes = (output_index, holder.get("content_index", 0))
                else:
                    indexes = location.indexes
                key = (location.path.rsplit(".", 1)[-1], indexes)
                channel = channels.get(key)
                if channel is not None and final:
                    channel.flush()  # the object holds the whole text: nothing is held back any more
                else:
                    if not location.text:
                        continue
                    # Text that no delta carried (or a partial object): guarded on its own.
                    channel = channel_for(key, _where(location)) if final else self._channel(ctx, matcher, _where(location))
                    channel.feed(location.text, final=True)
                hit = hit or channel.blocked
                if channel.text != location.text:
                    replace(location, channel.text)
            return hit

        try:
            async for event in events:
                payload = event.payload
                kind = payload.get("type") if isinstance(payload, dict) else None
                field = fields.get(kind) if kind else None
                if field is not None:
                    key = (field, _response_indexes(payload, field))
                    channel = channel_for(key, f"output[{key[1][0]}].{field}")
                    if kind.endswith(".delta"):
                        released = channel.feed(payload.get("delta") or "")
                        blocked = blocked or channel.blocked
                        if released != (payload.get("delta") or ""):
                            if not released:
                                continue
                            event.changed({**payload, "delta": released})
                        yield event
                        continue
                    rest = channel.flush()
                    blocked = blocked or channel.blocked
                    if rest:
                        delta_kind = kind[: -len(".done")] + ".delta"
                        yield sse.Event.of({**payload, "type": delta_kind, "delta": rest}, delta_kind)
                    if payload.get(field) != channel.text:
                        event.changed({**payload, field: channel.text})
                    yield event
                    continue
                member = "response" if isinstance(payload, dict) and isinstance(payload.get("response"), dict) else \
                    "item" if kind in ("response.output_item.added", "response.output_item.done") else \
                    "part" if kind in ("response.content_part.added", "response.content_part.done") else None
                if member is None:
                    yield event
                    continue
                changed = copy.deepcopy(payload)
                blocked = guard_object(changed, member, payload.get("output_index", 0)) or blocked
                if member == "response" and blocked and kind in _FINAL_RESPONSE_EVENTS:
                    changed["response"]["status"] = "incomplete"
                    changed["response"]["incomplete_details"] = {"reason": "content_filter"}
                if changed != payload:
                    event.changed(changed)
                yield event
        finally:
            await sse.close(events)


# Events whose response object is the answer's last word (its whole text, and its status).
_FINAL_RESPONSE_EVENTS = ("response.completed", "response.incomplete", "response.failed")


def _response_indexes(payload: dict, field: str) -> tuple:
    output_index = payload.get("output_index", 0)
    if field in ("arguments", "input"):
        return (output_index,)
    return (output_index, payload.get("content_index", payload.get("summary_index", 0)))


def _position(items: list, identity: int) -> int:
    for position, item in enumerate(items):
        if isinstance(item, dict) and item.get("index") == identity:
            return position
    return identity


def append_text(choice: dict, path: str, indexes: tuple, text: str) -> None:
    """Add `text` at `path` (a stream-write path) inside `choice`, creating what is missing: the
    held-back rest of a channel goes out in the choice's finishing chunk."""
    segments = path.split(EACH, 1)[1].lstrip(".") if path.startswith("choices" + EACH) else path
    node: Any = choice
    pending = list(indexes)
    parts = [p for p in segments.replace(EACH, "." + EACH).split(".") if p]
    for position, part in enumerate(parts):
        last = position == len(parts) - 1
        if part == EACH:
            identity = pending.pop(0)
            entry = next((e for e in node if isinstance(e, dict) and e.get("index") == identity), None)
            if entry is None:
                entry = {"index": identity}
                node.append(entry)
            node = entry
            continue
        if last:
            node[part] = (node.get(part) or "") + text
            return
        nxt = parts[position + 1]
        if part not in node or node[part] is None:
            node[part] = [] if nxt == EACH else {}
        node = node[part]


def _only_empty_pieces(choice: dict) -> bool:
    """A streamed choice that carries nothing but empty pieces of held-back text."""
    if choice.get("finish_reason") or choice.get("logprobs"):
        return False
    if "text" in choice:
        return choice["text"] == "" and set(choice) <= {"index", "text", "finish_reason", "logprobs"}
    delta = choice.get("delta")
    if not isinstance(delta, dict) or set(choice) - {"index", "delta", "finish_reason", "logprobs", "content_filter_results"}:
        return False
    if set(delta) - {"content", "refusal", "tool_calls", "function_call"}:
        return False
    for name in ("content", "refusal"):
        if delta.get(name):
            return False
    for call in delta.get("tool_calls") or ():
        if not isinstance(call, dict) or call.get("id") or set(call) - {"index", "function"}:
            return False
        function = call.get("function") or {}
        if function.get("name") or function.get("arguments"):
            return False
    function_call = delta.get("function_call")
    if isinstance(function_call, dict) and (function_call.get("name") or function_call.get("arguments")):
        return False
    return True


def _batch_output(ctx: RequestContext) -> dict[str, Any] | None:
    """The batch a file being read is the output of (its ownership record says), if any."""
    return ctx.owned.get("batch_output") if ctx.owned is not None else None


_STREAM_GUARDS = {
    "chat_chunks": GuardOutput._choice_stream,
    "text_chunks": GuardOutput._choice_stream,
    "response_events": GuardOutput._response_stream,
}
