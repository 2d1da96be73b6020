"""Work that ends after its request: batches and background responses, settled when they end.

Creating a batch, or a response with `background: true`, answers at once with work still running
upstream. The request's quota reservation is then kept with the object's ownership record, which
is marked open (policy/ownership.py). When the work ends, it is settled here, exactly once:

- a background response leaves one log record with its usage and cost, under the response's
  operation, and the reservation is brought to that usage;
- a batch leaves one log record per line, from its output and error files (each line's usage at
  the batch price, its status, the batch id and custom_id in `settles`), and the reservation is
  brought to the lines' total: what a cancelled or expired batch did not use is released. Its
  output and error files become the app's own (ownership records), so that only it may read them.

The end is noticed in two ways: when the app polls the object (retrieve, cancel: this stage's
`finish`, after the answer is sent), and by `reconcile`, which a timer-triggered function runs
every few minutes over every open record (function_app.py; the local host runs the timer too).
Two instances noticing one end at once cannot both settle it: the record is closed with a
conditional write (its ETag) before anything is counted.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import orjson

from ..context import RequestContext, UpstreamResult, internal_request, new_request_id
from ..errors import GatewayError
from ..operations import BATCH, DEFERRED, STORED_RESPONSE
from ..pipeline import Stage
from ..policy.policies import effective_policy
from ..quota.enforce import Reservation
from ..routes import ROUTES_BY_FUNCTION, ModelRoute
from ..store import PreconditionFailed, Store
from .batches import line_route

logger = logging.getLogger("sekisho.deferred")

# Per kind of object with work that goes on: the route that reads it upstream, and the operation
# whose answers say whether it is still running (the operations table's).
_READ_ROUTE = {"batch": "azure_batch", "response": "azure_stored_response"}
_READ_OPERATION = {"batch": BATCH, "response": STORED_RESPONSE}
_FILE_CONTENT_ROUTE, _FILE_ROUTE = "azure_file_content", "azure_file"


class SettleDeferredWork(Stage):
    name = DEFERRED

    def __init__(self, store: Store, upstream, quota, log_request, resolver, builtin_policy, retention_days: int = 30) -> None:
        self._store = store
        self._upstream = upstream
        self._quota = quota  # quota.enforce.EnforceQuota: prices each line, settles the reservation
        self._log = log_request  # records.request_log.LogRequest
        self._resolver = resolver
        self._builtin_policy = builtin_policy
        self._file_ttl = retention_days * 86400

    async def finish(self, ctx: RequestContext) -> None:
        """A poll (retrieve, cancel) of an object whose work was open when the request began."""
        doc = ctx.owned
        if doc is None or not doc.get("open") or ctx.status is None or ctx.status >= 400 or ctx.error is not None:
            return
        answer = ctx.model_response if isinstance(ctx.model_response, dict) else (ctx.result.json if ctx.result else None)
        if isinstance(answer, dict):
            await self.observe(doc, answer, ctx.policy)

    async def reconcile(self, limit: int = 200) -> dict[str, int]:
        """The timer's round: read every open object upstream and settle those that ended."""
        outcome = {"open": 0, "settled": 0, "failed": 0}
        for doc in await self._store.list_open_owned(limit):
            try:
                policy = await self._policy(doc)
                result = await self._read(doc, _READ_ROUTE[doc["kind"]], {"batch_id" if doc["kind"] == "batch" else "response_id": doc["object_id"]}, policy)
                if result.status == 404:
                    # Gone upstream (deleted, or expired): nothing more will be used.
                    answer = {"id": doc["object_id"], "status": "gone"}
                elif result.status >= 400 or not isinstance(result.json, dict):
                    outcome["failed"] += 1
                    continue
                else:
                    answer = result.json
                state = await self.observe(doc, answer, policy)
                outcome["settled" if state == "settled" else "open"] += 1
            except Exception:
                logger.exception("reconciling %s %s failed; the next round tries again", doc.get("kind"), doc.get("object_id"))
                outcome["failed"] += 1
        return outcome

    async def observe(self, doc: dict[str, Any], answer: dict[str, Any], policy=None) -> str:
        """An object's current state, however it was seen: settled when its work has ended; else
        its record follows its status (lists are answered from it). Returns open or settled."""
        fresh = await self._store.get_owned(doc["app_id"], doc["kind"], doc["object_id"])
        if fresh is None or not fresh.get("open"):
            return "settled"
        if _READ_OPERATION[doc["kind"]].still_running(answer):
            if isinstance(fresh.get("object"), dict) and fresh["object"].get("status") != answer.get("status"):
                try:
                    await self._store.put_owned({**fresh, "object": answer}, if_match=fresh["etag"])
                except PreconditionFailed:
                    pass  # another poll wrote it first
            return "open"
        await self._settle(fresh, answer, policy or await self._policy(fresh))
        return "settled"

    async def _settle(self, doc: dict[str, Any], answer: dict[str, Any], policy) -> None:
        # Read what the work produced before closing the record: if the upstream cannot be read
        # now, the record stays open and the next poll or timer round tries again.
        if doc["kind"] == "batch":
            await self._own_result_files(doc, answer)
            lines = await self._batch_lines(doc, answer, policy)
        else:
            lines = [self._response_line(doc, answer, policy)]
        closed = {**doc, "open": False, "settled_at": int(time.time())}
        if isinstance(doc.get("object"), dict):
            closed["object"] = answer
        try:
            await self._store.put_owned(closed, if_match=doc["etag"])
        except PreconditionFailed:
            return  # settled by another instance (or a poll) meanwhile
        tokens = cost = 0
        for ctx in lines:
            cost += await self._quota.price(ctx)
            tokens += ctx.usage.total_tokens
            await self._log.finish(ctx)
        if doc.get("reservation"):
            self._quota.settle(Reservation.from_document(doc["reservation"]), tokens, cost)
        logger.info("settled %s %s: %s record(s), %s tokens", doc["kind"], doc["object_id"], len(lines), tokens)

    # Background responses ------------------------------------------------------------------------
    def _response_line(self, doc: dict[str, Any], answer: dict[str, Any], policy) -> RequestContext:
        route = ROUTES_BY_FUNCTION["v1_responses"]
        status = 200 if answer.get("status") != "gone" else 404
        ctx = self._line_context(doc, route, {"model": doc.get("deployment"), "background": True}, policy, status, answer)
        ctx.settles = {"kind": "response", "id": doc["object_id"], "request_id": doc.get("request_id"), "status": answer.get("status")}
        return ctx

    # Batches -------------------------------------------------------------------------------------
    async def _own_result_files(self, doc: dict[str, Any], answer: dict[str, Any]) -> None:
        """A batch's output and error files are its app's: recorded before anything else, so that
        the app may read them as soon as it sees the batch ended."""
        for file_id in (answer.get("output_file_id"), answer.get("error_file_id")):
            if not file_id or await self._store.get_owned(doc["app_id"], "file", file_id) is not None:
                continue
            meta = await self._read(doc, _FILE_ROUTE, {"file_id": file_id}, None)
            obj = meta.json if meta.status == 200 and isinstance(meta.json, dict) else {"id": file_id, "object": "file", "purpose": "batch_output"}
            now = time.time()
            await self._store.put_owned({
                "app_id": doc["app_id"], "kind": "file", "object_id": file_id, "user_id": doc.get("user_id"), "backend": doc.get("backend"),
                "deployment": None, "created_at": int(now), "created_ms": int(now * 1000), "request_id": doc.get("request_id"),
                "ttl": self._file_ttl, "object": obj, "batch_output": {"batch_id": doc["object_id"], "endpoint": (doc.get("batch_input") or {}).get("endpoint")},
            })

    async def _batch_lines(self, doc: dict[str, Any], answer: dict[str, Any], policy) -> list[RequestContext]:
        summary = doc.get("batch_input") or {}
        route = line_route(summary.get("endpoint") or "/chat/completions")
        bodies: dict[str, dict[str, Any]] = {}
        if summary.get("input_file_id"):
            for line in await self._jsonl(doc, summary["input_file_id"]):
                if isinstance(line.get("body"), dict) and isinstance(line.get("custom_id"), str):
                    bodies[line["custom_id"]] = line["body"]
        contexts = []
        for file_id in (answer.get("output_file_id"), answer.get("error_file_id")):
            for line in await self._jsonl(doc, file_id) if file_id else ():
                custom_id = line.get("custom_id")
                response = line.get("response") if isinstance(line.get("response"), dict) else {}
                body = response.get("body") if isinstance(response.get("body"), dict) else None
                error = line.get("error") if isinstance(line.get("error"), dict) else None
                status = response.get("status_code") if isinstance(response.get("status_code"), int) else (200 if error is None else 500)
                if body is None and error is not None:
                    body = {"error": error}
                request = bodies.get(custom_id) or {"model": doc.get("deployment")}
                ctx = self._line_context(doc, route, request, policy, status, body)
                ctx.upstream.request_id = response.get("request_id")
                ctx.settles = {"kind": "batch", "id": doc["object_id"], "custom_id": custom_id, "request_id": doc.get("request_id")}
                contexts.append(ctx)
        return contexts

    async def _jsonl(self, doc: dict[str, Any], file_id: str) -> list[dict[str, Any]]:
        result = await self._read(doc, _FILE_CONTENT_ROUTE, {"file_id": file_id}, None)
        if result.events is not None:
            content = b"".join([event.raw or event.encoded() async for event in result.events])
        else:
            content = result.body
        if result.status != 200:
            raise GatewayError(502, "upstream_error", f"file {file_id} could not be read ({result.status})")
        lines = []
        for raw in content.splitlines():
            if raw.strip():
                try:
                    line = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(line, dict):
                    lines.append(line)
        return lines

    # Shared ---------------------------------------------------------------------------------------
    def _line_context(self, doc: dict[str, Any], route: ModelRoute, body: dict[str, Any], policy, status: int, answer: Any) -> RequestContext:
        """A request context for one settled request, as the request log and the pricing read it."""
        ctx = RequestContext(request_id=new_request_id(), http=internal_request("POST", "/" + route.template), route=route)
        ctx.app_id, ctx.user_id, ctx.policy = doc["app_id"], doc.get("user_id"), policy
        ctx.deployment = body.get("model") if isinstance(body.get("model"), str) else doc.get("deployment")
        ctx.body = body
        ctx.status = status
        ctx.result = UpstreamResult(status=status, headers={}, body=b"", json=answer)
        ctx.upstream.backend = doc.get("backend")
        ctx.finished_at = time.perf_counter()
        ctx.started = ctx.finished_at
        return ctx

    async def _read(self, doc: dict[str, Any], function_name: str, params: dict[str, str], policy) -> UpstreamResult:
        """GET an object at the backend that holds it."""
        route = ROUTES_BY_FUNCTION[function_name].for_method("GET")
        # The upstream client fills the route's template from path_params (url_for).
        ctx = RequestContext(request_id=new_request_id(), http=internal_request("GET", "/" + route.template), route=route)
        ctx.path_params = dict(params)
        ctx.app_id, ctx.user_id = doc["app_id"], doc.get("user_id")
        ctx.policy = policy or await self._policy(doc)
        ctx.deployment = doc.get("deployment") if route.operation.needs_deployment else None
        ctx.upstream.pinned_backend = doc.get("backend")
        return await self._upstream.send(ctx)

    async def _policy(self, doc: dict[str, Any]):
        try:
            return await self._resolver.resolve(doc["app_id"], doc.get("user_id"))
        except GatewayError:  # the app was removed meanwhile: its work is still settled
            return effective_policy(doc["app_id"], self._builtin_policy, None, None, None)

