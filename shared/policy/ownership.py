"""What an app creates upstream belongs to it.

On a shared Azure OpenAI resource every stored response is visible to whoever holds the
resource's credentials; the gateway is the only door, so it records who created what and
enforces it. A stored response's id, app, user, backend and deployment are recorded when the
answer comes back (the operations table's `creates`); an operation about an object (`owned`:
retrieve, delete, input items, cancel) is answered only for the app that created it — and, for a
delegated token, the same user — and goes to the backend that holds it; another app's id is 404,
exactly as a missing one. A request naming another app's object in its body
(`previous_response_id`) is refused the same way before anything reaches the upstream.

A record is written once the answer is out; an id used again at once on this instance is found
in memory, and on another instance a miss is asked again for up to a second before it is a 404.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson

from .. import errors
from ..context import RequestContext, UpstreamResult
from ..operations import OPERATIONS, OWNERSHIP
from ..pipeline import Stage
from ..store import Store, StoreError
from ..validation import page_limit

logger = logging.getLogger("sekisho.ownership")

_RECENT_SECONDS = 30.0  # records this instance wrote, kept in memory while the store catches up
_RECENT_MAX = 5000
MAX_LIST_PAGE = 1000  # the most files or batches one page of a list answers (the document says so)
_RETRY_DELAYS = (0.1, 0.2, 0.3, 0.4)  # another instance's record may be a moment from the store
_NOT_SET = object()
_LISTED_KINDS = frozenset(op.lists for op in OPERATIONS if op.lists)  # lists answered from the records' `object`


class RecordOwnership(Stage):
    name = OWNERSHIP

    def __init__(self, store: Store, retention_days: int = 30) -> None:
        self._store = store
        self._ttl = retention_days * 86400  # Azure keeps stored responses 30 days
        self._recent: dict[tuple[str, str, str], tuple[float, dict[str, Any]]] = {}

    async def before(self, ctx: RequestContext) -> None:
        operation = ctx.route.operation
        if operation.owned is not None:
            kind, param = operation.owned
            object_id = ctx.path_params.get(param) or ""
            doc = await self._find(ctx, kind, object_id)
            ctx.owned = doc
            ctx.deployment = doc.get("deployment") or ctx.deployment
            ctx.upstream.pinned_backend = doc.get("backend")
        if operation.refers_to and ctx.body:
            for fields, kind in operation.refers_to:
                for location in fields.locations(ctx.body):
                    referred = await self._find(ctx, kind, location.text, location.path)
                    ctx.referred.append(referred)
                    if ctx.upstream.pinned_backend is None:
                        ctx.upstream.pinned_backend = referred.get("backend")  # what it names lives in one resource

    async def _find(self, ctx: RequestContext, kind: str, object_id: str, param: str | None = None) -> dict[str, Any]:
        missing = errors.not_found(f"No {kind.replace('_', ' ')} {object_id!r} for this application.", param)
        if not object_id:
            raise missing
        key = (ctx.app_id, kind, object_id)
        recent = self._recent.get(key)
        doc = recent[1] if recent is not None else None
        for delay in (0.0, *_RETRY_DELAYS):
            if doc is not None:
                break
            if delay:
                await asyncio.sleep(delay)
            try:
                doc = await self._store.get_owned(ctx.app_id, kind, object_id)
            except StoreError:
                raise errors.GatewayError(503, "store_unavailable", "Ownership records are unavailable; try again shortly.",
                                          error_type="server_error") from None
        if doc is None or (ctx.identity is not None and ctx.identity.delegated and doc.get("user_id") != ctx.user_id):
            raise missing
        return doc

    def after(self, ctx: RequestContext, result: UpstreamResult) -> UpstreamResult:
        doc = ctx.owned
        if doc is None or "instructions_shown" not in doc or not isinstance(result.json, dict):
            return result
        # A stored response echoes the instructions it ran with: the app's injected prompt is never
        # shown, only what the client itself sent (recorded when the response was made).
        if "instructions" in result.json and result.json["instructions"] != doc["instructions_shown"]:
            if ctx.model_response is None:
                ctx.model_response = result.json
            result.json = {**result.json, "instructions": doc["instructions_shown"]}
            result.body = orjson.dumps(result.json)
        return result

    @staticmethod
    def records_before_answer(ctx: RequestContext) -> bool:
        """Whether the record must be written before the answer goes out: objects whose lists are
        answered from the records (files, batches), so that the app's next list shows them."""
        return ctx.route.operation.creates in _LISTED_KINDS

    async def finish(self, ctx: RequestContext) -> None:
        operation = ctx.route.operation
        if ctx.status is None or ctx.status >= 400 or ctx.error is not None:
            return
        if operation.owned is not None and ctx.http.method == "DELETE" and ctx.owned is not None:
            kind, _ = operation.owned
            self._recent.pop((ctx.app_id, kind, ctx.owned["object_id"]), None)
            await self._store.delete_owned(ctx.app_id, kind, ctx.owned["object_id"])
            return
        if operation.creates is None or (ctx.body or {}).get("store") is False:
            return
        object_id = _created_id(ctx)
        if not object_id:
            return
        shown: Any = _NOT_SET
        if ctx.system_prompt is not None and ctx.system_prompt.place == "instructions":
            shown = ctx.system_prompt.client_instructions
        doc = {"app_id": ctx.app_id, "kind": operation.creates, "object_id": object_id, "user_id": ctx.user_id,
               "backend": ctx.upstream.backend, "deployment": ctx.deployment, "created_at": int(time.time()),
               "created_ms": time.time_ns() // 1_000_000,
               "request_id": ctx.request_id, "ttl": self._ttl}
        if shown is not _NOT_SET:
            doc["instructions_shown"] = shown
        answer = ctx.result.json if ctx.result is not None else None
        if operation.creates in _LISTED_KINDS and isinstance(answer, dict):
            doc["object"] = answer  # lists are answered from these records
        if ctx.batch_input is not None:
            doc["batch_input"] = ctx.batch_input  # a batch input file's lines, or what a batch runs
        if operation.still_running(answer):
            # Work that goes on upstream: settled when it ends (jobs/deferred.py), with the
            # reservation the request made (kept until then).
            doc["open"] = True
            doc["reservation"] = ctx.quota.to_document() if ctx.quota is not None else None
            ctx.quota = None
        now = time.monotonic()
        self._recent[(ctx.app_id, operation.creates, object_id)] = (now, doc)
        while self._recent:  # oldest first (insertion order): drop what the store has had long enough
            oldest = next(iter(self._recent))
            if now - self._recent[oldest][0] < _RECENT_SECONDS and len(self._recent) <= _RECENT_MAX:
                break
            del self._recent[oldest]
        try:
            await self._store.put_owned(doc)
        except Exception:
            logger.exception("ownership of %s %s could not be recorded", operation.creates, object_id)

    def record(self, ctx: RequestContext) -> dict[str, Any]:
        return {"owned_object": {"kind": ctx.owned["kind"], "id": ctx.owned["object_id"]}} if ctx.owned is not None else {}


async def list_owned_answer(store: Store, ctx: RequestContext) -> UpstreamResult:
    """A list of the caller's own objects of the operation's kind, newest first, from the records
    (never the upstream's list, which shows every app's): `limit`, `after` (an id), and for files
    `purpose`, as the OpenAI list API takes them."""
    kind = ctx.route.operation.lists
    query = ctx.http.query_params
    limit = page_limit(query, MAX_LIST_PAGE)
    before = None
    if query.get("after"):
        anchor = await store.get_owned(ctx.app_id, kind, query["after"])
        if anchor is None:
            raise errors.not_found(f"No {kind} {query['after']!r} for this application.", "after")
        before = anchor["sort_key"]
    purpose = query.get("purpose")
    found: list[dict[str, Any]] = []
    while len(found) <= limit:
        page = await store.list_owned(ctx.app_id, kind, limit + 1, before)
        found.extend(doc for doc in page if purpose is None or (doc.get("object") or {}).get("purpose") == purpose)
        if len(page) < limit + 1:
            break
        before = page[-1]["sort_key"]
    data = [doc.get("object") or {"id": doc["object_id"], "object": kind} for doc in found[:limit]]
    payload = {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
               "last_id": data[-1]["id"] if data else None, "has_more": len(found) > limit}
    return UpstreamResult(status=200, headers={"content-type": "application/json"}, body=orjson.dumps(payload), json=payload)


def _created_id(ctx: RequestContext) -> str | None:
    if ctx.stream_summary is not None:
        return ctx.stream_summary.response_id
    answer = ctx.model_response if isinstance(ctx.model_response, dict) else (ctx.result.json if ctx.result is not None else None)
    return answer.get("id") if isinstance(answer, dict) and isinstance(answer.get("id"), str) else None
