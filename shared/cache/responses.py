"""The response cache: exact-match answers for cost, and record/replay for end-to-end tests.

Key: SHA-256 of the final upstream request (after the system prompt; `stream`, `stream_options`
and `user` left out, so a streamed and a whole request share an entry), the operation and the
deployment — and the end user when the policy keeps entries per user — within a scope: the app,
unless its policy names a shared scope. What is stored is
the model's whole answer (a stream is assembled once complete; a cut stream is never stored); a
hit is replayed whole, or as a valid SSE stream in Azure's chunk shape, and passes the output
guard like a fresh answer. Concurrent identical misses in one instance wait for the first one
(request coalescing) instead of each calling the model.

Per request: `x-sekisho-cache: no-store` (neither read nor write), `refresh` (do not read,
write), `replay-only` (when the policy allows the header), `x-sekisho-cache-ttl: <seconds>` (it can
shorten an entry's life below the policy's TTL, never lengthen it).
The answer says `x-sekisho-cache: HIT | MISS | BYPASS`.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

import orjson

from .. import sse
from ..context import RequestContext, UpstreamResult
from ..errors import GatewayError
from ..pipeline import Stage
from ..quota.pricing import PricingTable, usage_cost
from ..store import CounterCharge, Store, StoreError
from ..store.counter_batch import CounterBatcher
from ..usage import Usage, parse_usage

logger = logging.getLogger("sekisho.cache")

CACHE_HEADER = "x-sekisho-cache"
TTL_HEADER = "x-sekisho-cache-ttl"
_MAX_TTL = 30 * 86400
_COALESCE_WAIT_SECONDS = 30.0
_STATS_TTL = 400 * 86400
_WRITE_INTERVAL = 0.1  # entries wait at most this long to be written together (served from memory meanwhile)
_KEY_EXCLUDED = ("stream", "stream_options", "user")


@dataclass
class CacheState:
    """The cache stage's part of a request."""

    scope: str | None
    key: str | None
    ttl: int
    status: str = "MISS"  # HIT, MISS, BYPASS
    entry: dict[str, Any] | None = None
    leader: asyncio.Future | None = None
    coalesced: bool = False
    outcome: dict[str, Any] | None = None  # what the log record says about the cache


def cache_key(ctx: RequestContext, per_user: bool = False) -> str:
    body = {k: v for k, v in ctx.body.items() if k not in _KEY_EXCLUDED}
    material = {"operation": ctx.route.operation.name, "deployment": ctx.deployment, "body": body}
    if per_user:
        material["user"] = ctx.user_id or ctx.app_id
    return hashlib.sha256(orjson.dumps(material, option=orjson.OPT_SORT_KEYS)).hexdigest()


def deterministic(ctx: RequestContext) -> bool:
    if ctx.route.operation.always_deterministic:
        return True
    n = ctx.body.get("n")
    return ctx.body.get("temperature") == 0 and n in (None, 1)


def cache_miss() -> GatewayError:
    return GatewayError(409, "cache_miss", "No recorded answer for this request, and this app is in replay-only mode.")


class CacheResponses(Stage):
    name = "cache"

    def __init__(self, store: Store, pricing: PricingTable, windows, max_entry_bytes: int, currency: str) -> None:
        self._store = store
        self._pricing = pricing
        self._windows = windows
        self._max_bytes = max_entry_bytes
        self._currency = currency
        self._inflight: dict[tuple[str, str], asyncio.Future] = {}
        self._stats = CounterBatcher(store, what="cache statistics")
        self._to_write: list[tuple[str, str, dict[str, Any], bytes, int]] = []
        self._write_task: asyncio.Task | None = None
        # Entries being written in the background: served from here until the store has them,
        # so "record, then replay at once" works on this instance.
        self._pending: dict[tuple[str, str], dict[str, Any]] = {}

    # Lookup -------------------------------------------------------------------------------------
    async def before(self, ctx: RequestContext) -> None:
        # The headers are checked whether or not this request turns out cacheable: a malformed one
        # is refused the same way every time, not only when it would have mattered.
        header = (ctx.http.headers.get(CACHE_HEADER) or "").strip().lower()
        if header not in ("", "no-store", "refresh", "replay-only"):
            raise GatewayError(400, "invalid_request", f"{CACHE_HEADER} must be no-store, refresh or replay-only.", param=CACHE_HEADER)
        asked_ttl = self._asked_ttl(ctx)
        if ctx.result is not None:
            return
        settings = ctx.policy.cache
        if ctx.keep_out_of_cache:  # personal data the app keeps out of storage (mask_in_log)
            self._bypass(ctx)
            return
        if header == "replay-only" and not settings.allow_replay_header:
            raise GatewayError(403, "forbidden", "This app's policy does not allow replay-only requests by header.", error_type="permission_error")
        replay_only = bool(settings.replay_only) or header == "replay-only"
        if not replay_only and (not settings.enabled or header == "no-store" or not (deterministic(ctx) or settings.cache_nondeterministic)):
            self._bypass(ctx)
            return
        ttl = settings.ttl_seconds if asked_ttl is None else min(asked_ttl, settings.ttl_seconds)  # shorter, never longer
        state = ctx.cache = CacheState(cache_scope(settings.shared_scope, ctx.app_id), cache_key(ctx, bool(settings.per_user)), ttl)
        if header != "refresh":
            entry = await self._lookup(state)
            if entry is None and not replay_only:
                entry = await self._wait_for_leader(state)
            if entry is not None:
                self._serve(ctx, state, entry)
                return
        if replay_only:
            state.outcome = {"status": "MISS", "replay_only": True}
            raise cache_miss()
        ctx.response_headers[CACHE_HEADER] = "MISS"
        if (state.scope, state.key) not in self._inflight:
            state.leader = self._inflight[(state.scope, state.key)] = asyncio.get_running_loop().create_future()

    def _bypass(self, ctx: RequestContext) -> None:
        ctx.response_headers[CACHE_HEADER] = "BYPASS"
        ctx.cache = CacheState(None, None, 0, status="BYPASS", outcome={"status": "BYPASS"})

    def record(self, ctx: RequestContext) -> dict[str, Any]:
        state: CacheState | None = ctx.cache
        return {"cache": state.outcome} if state is not None and state.outcome is not None else {}

    @staticmethod
    def _asked_ttl(ctx: RequestContext) -> int | None:
        """The life the client asks for (it may shorten the policy's, never lengthen it)."""
        text = ctx.http.headers.get(TTL_HEADER)
        if text is None:
            return None
        text = text.strip()
        if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= _MAX_TTL:
            raise GatewayError(400, "invalid_request", f"{TTL_HEADER} must be a whole number of seconds from 1 to {_MAX_TTL}.", param=TTL_HEADER)
        return int(text)

    async def _lookup(self, state: CacheState) -> dict[str, Any] | None:
        pending = self._pending.get((state.scope, state.key))
        if pending is not None:
            return pending
        try:
            return await self._store.cache_get(state.scope, state.key)
        except StoreError as exc:
            logger.warning("cache read failed, treated as a miss: %s", exc)
            return None

    async def _wait_for_leader(self, state: CacheState) -> dict[str, Any] | None:
        leader = self._inflight.get((state.scope, state.key))
        if leader is None:
            return None
        try:
            entry = await asyncio.wait_for(asyncio.shield(leader), timeout=_COALESCE_WAIT_SECONDS)
        except asyncio.TimeoutError:
            if self._inflight.get((state.scope, state.key)) is leader:
                del self._inflight[(state.scope, state.key)]  # a leader that never finished
            return None
        state.coalesced = entry is not None
        return entry

    def _serve(self, ctx: RequestContext, state: CacheState, entry: dict[str, Any]) -> None:
        state.status, state.entry = "HIT", entry
        ctx.response_headers[CACHE_HEADER] = "HIT"
        response = entry["response"]
        ctx.model_response = response
        if ctx.stream:
            ctx.result = UpstreamResult(200, {"content-type": "text/event-stream; charset=utf-8"}, events=replay_stream(ctx, response))
        else:
            ctx.result = UpstreamResult(200, {"content-type": "application/json"}, body=orjson.dumps(response), json=response)

    # Store --------------------------------------------------------------------------------------
    async def finish(self, ctx: RequestContext) -> None:
        state: CacheState | None = ctx.cache
        if state is None or state.status == "BYPASS" or state.outcome is not None:
            return  # nothing to store, or settled already (a replay-only miss)
        if state.status == "HIT":
            usage = _entry_usage(state.entry)
            _, price = await self._pricing.price_for(state.entry["response"].get("model") or ctx.deployment)
            saved = usage_cost(price, usage)
            state.outcome = {"status": "HIT", "coalesced": state.coalesced, "saved_tokens": usage.total_tokens,
                                  "saved_cost": saved / 1e9, "currency": self._currency}
            self._count(ctx.app_id, {"hits": 1, "saved_cost": saved, "saved_tokens": usage.total_tokens})
            return
        entry, stored = None, False
        try:
            entry = entry_from(ctx)
            if entry is not None and _holds_personal_data(ctx, entry):
                entry = None  # an answer with personal data the app keeps out of storage (mask_in_log)
            blob = orjson.dumps(entry) if entry else b""
            size = len(blob)
            stored = entry is not None and size <= self._max_bytes
            state.outcome = {"status": "MISS", "stored": stored, **({"too_large": size} if entry and not stored else {})}
            self._count(ctx.app_id, {"misses": 1})
            if stored:
                self._pending[(state.scope, state.key)] = entry
                self._queue_write(state, entry, blob)
        finally:
            # Whatever happened, release the requests waiting on this one.
            if state.leader is not None:
                self._inflight.pop((state.scope, state.key), None)
                if not state.leader.done():
                    state.leader.set_result(entry if stored else None)

    def _queue_write(self, state: CacheState, entry: dict[str, Any], blob: bytes) -> None:
        """Entries are written in batches, every few milliseconds: one store call carries many."""
        self._to_write.append((state.scope, state.key, entry, blob, state.ttl))
        if self._write_task is None:
            self._write_task = asyncio.get_running_loop().create_task(self._write_soon())

    async def _write_soon(self) -> None:
        try:
            await asyncio.sleep(_WRITE_INTERVAL)
            batch, self._to_write = self._to_write, []
            try:
                await self._store.cache_put_many(batch)
            except Exception:
                logger.exception("cache write of %s entries failed", len(batch))
            finally:
                for scope, key, entry, _, _ in batch:
                    if self._pending.get((scope, key)) is entry:
                        del self._pending[(scope, key)]
        finally:
            self._write_task = None  # only now: drain() waits for a write in flight
            if self._to_write:  # queued while this batch was being written
                self._write_task = asyncio.get_running_loop().create_task(self._write_soon())

    def _count(self, app_id: str, amounts: dict[str, int]) -> None:
        month = self._windows.around(time.time())["month"][0]
        charges = [CounterCharge(f"cache:{app_id}", f"{name}:{month}", amount, None, _STATS_TTL) for name, amount in amounts.items() if amount]
        self._stats.add(charges)

    async def flush_writes(self) -> None:
        """Write the entries still waiting (an admin purge must not miss them)."""
        while self._write_task is not None:
            await asyncio.gather(self._write_task, return_exceptions=True)

    async def drain(self) -> None:
        await self.flush_writes()
        await self._stats.drain()

    async def stats(self, app_id: str) -> dict[str, Any]:
        month = self._windows.key("month", self._windows.now())
        names = [f"{n}:{month}" for n in ("hits", "misses", "saved_cost", "saved_tokens")]
        values = await self._store.read_counters(f"cache:{app_id}", names)
        hits, misses = values[names[0]], values[names[1]]
        return {"app_id": app_id, "month": month, "hits": hits, "misses": misses,
                "hit_rate": round(hits / (hits + misses), 4) if hits + misses else None,
                "saved_cost": values[names[2]] / 1e9, "currency": self._currency, "saved_tokens": values[names[3]]}


def _entry_usage(entry: dict[str, Any]) -> Usage:
    raw = entry["response"].get("usage")
    return parse_usage(raw) if isinstance(raw, dict) else Usage(reported=True)


def _holds_personal_data(ctx: RequestContext, entry: dict[str, Any]) -> bool:
    kept_private = ctx.personal_data
    if getattr(kept_private, "mode", None) != "mask_in_log" or not isinstance(entry.get("response"), dict):
        return False
    from ..guards.personal_data import find

    return any(find(text, kept_private.kinds) for text in ctx.route.operation.writes.texts(entry["response"]))


def cache_scope(shared_scope: str | None, app_id: str) -> str:
    """Whose entries a request reads and writes: the app's own, or a shared scope's. Shared scopes
    live in a namespace of their own ("~" is in no app id), so a scope named like an app can
    never read that app's entries."""
    return f"shared~{shared_scope}" if shared_scope else app_id


def entry_from(ctx: RequestContext) -> dict[str, Any] | None:
    """The model's complete answer, or None when there is nothing whole to keep."""
    if ctx.status != 200 or ctx.error is not None or ctx.client_disconnected:
        return None
    summary = ctx.stream_summary
    if summary is None:
        body = ctx.model_response if ctx.model_response is not None else (ctx.result.json if ctx.result else None)
        return {"response": body, "cached_at": int(time.time())} if isinstance(body, dict) else None
    if summary.error:
        return None
    shape = ctx.route.operation.stream_shape
    if shape == "response_events":
        final = summary.final_response
        if not final or final.get("status") != "completed":
            return None
        return {"response": final, "cached_at": int(time.time())}
    if not summary.choices or any(c["finish_reason"] is None for c in summary.choices.values()):
        return None  # a stream that did not finish is never cached
    chat = shape == "chat_chunks"
    choices = []
    for index in sorted(summary.choices):
        slot = summary.choices[index]
        text = "".join(slot["text"])
        if chat:
            message: dict[str, Any] = {"role": "assistant", "content": text or None}
            if slot.get("refusal"):
                message["refusal"] = "".join(slot["refusal"])
            if slot["tool_calls"]:
                message["tool_calls"] = [
                    {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": "".join(c["arguments"])}}
                    for _, c in sorted(slot["tool_calls"].items())
                ]
            choices.append({"index": index, "message": message, "finish_reason": slot["finish_reason"], "logprobs": None})
        else:
            choices.append({"index": index, "text": text, "finish_reason": slot["finish_reason"], "logprobs": None})
    response = {
        "id": summary.response_id, "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()), "model": summary.model, "choices": choices, "usage": summary.usage,
    }
    return {"response": response, "cached_at": int(time.time())}


_PIECES = re.compile(r"\s*\S+|\s+$")


def _pieces(text: str) -> list[str]:
    return _PIECES.findall(text) or [text]


async def replay_stream(ctx: RequestContext, response: dict[str, Any]) -> AsyncIterator[sse.Event]:
    """A cached answer as the SSE stream Azure would have sent."""
    async for event in _replay_events(ctx, response):
        yield event if isinstance(event, sse.Event) else sse.Event(event, None)


async def _replay_events(ctx: RequestContext, response: dict[str, Any]) -> AsyncIterator[Any]:
    shape = ctx.route.operation.stream_shape
    if shape == "response_events":
        for event in _responses_events(response):
            yield event
        return
    chat = shape == "chat_chunks"
    base = {"id": response.get("id"), "object": "chat.completion.chunk" if chat else "text_completion",
            "created": response.get("created"), "model": response.get("model")}
    for choice in response.get("choices") or ():
        index = choice.get("index", 0)
        if chat:
            message = choice.get("message") or {}
            yield sse.Event.of({**base, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
            for piece in _pieces(message.get("content") or ""):
                yield sse.Event.of({**base, "choices": [{"index": index, "delta": {"content": piece}, "finish_reason": None}]})
            if message.get("refusal"):
                yield sse.Event.of({**base, "choices": [{"index": index, "delta": {"refusal": message["refusal"]}, "finish_reason": None}]})
            for position, call in enumerate(message.get("tool_calls") or ()):
                yield sse.Event.of({**base, "choices": [{"index": index, "delta": {"tool_calls": [{**call, "index": position}]}, "finish_reason": None}]})
            yield sse.Event.of({**base, "choices": [{"index": index, "delta": {}, "finish_reason": choice.get("finish_reason")}]})
        else:
            for piece in _pieces(choice.get("text") or ""):
                yield sse.Event.of({**base, "choices": [{"index": index, "text": piece, "finish_reason": None}]})
            yield sse.Event.of({**base, "choices": [{"index": index, "text": "", "finish_reason": choice.get("finish_reason")}]})
    if ctx.client_wants_usage and response.get("usage"):
        yield sse.Event.of({**base, "choices": [], "usage": response["usage"]})
    yield b"data: [DONE]\n\n"


def _responses_events(response: dict[str, Any]):
    sequence = iter(range(100_000))

    def event(kind: str, **fields) -> bytes:
        return sse.Event.of({"type": kind, "sequence_number": next(sequence), **fields}, kind)

    yield event("response.created", response={**response, "status": "in_progress", "output": [], "usage": None})
    for output_index, item in enumerate(response.get("output") or ()):
        if not isinstance(item, dict):
            continue
        yield event("response.output_item.added", output_index=output_index, item={**item, "status": "in_progress", "content": []})
        for content_index, part in enumerate(item.get("content") or ()):
            if isinstance(part, dict) and part.get("type") == "output_text":
                for piece in _pieces(part.get("text") or ""):
                    yield event("response.output_text.delta", item_id=item.get("id"), output_index=output_index, content_index=content_index, delta=piece)
                yield event("response.output_text.done", item_id=item.get("id"), output_index=output_index, content_index=content_index, text=part.get("text") or "")
        yield event("response.output_item.done", output_index=output_index, item=item)
    yield event("response.completed", response=response)
