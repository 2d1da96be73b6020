"""Async mode: a model request that runs as a job, waiting out Azure OpenAI's 429s on durable
timers instead of holding an HTTP connection open.

A client asks with `Prefer: respond-async` (RFC 7240), or its policy turns a request whose
synchronous retry budget ran out on 429s into a job (`async_jobs.on_budget_exhausted`). The
request passes every stage before the upstream call as usual (identity, validation, policy,
input guard, system prompt, cache lookup, quota reservation); then, instead of calling the
upstream, the gateway stores a job document (the final upstream request and the quota
reservation) and answers 202 with a status URL. The job runs in the Durable Functions
orchestration of `job_orchestration.py`; its activities call `run_attempt` and `give_up` here,
which finish the request exactly like the synchronous path (output guard, quota settlement,
log record with the same request id, so one logical request leaves one record).

This module owns the job document: building it from a request, rebuilding a request context
from it, and the status answers.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

import orjson
from starlette.requests import Request
from starlette.responses import Response

from ..cache.responses import CacheState
from ..context import RequestContext, UpstreamResult, internal_request
from ..errors import GatewayError
from ..policy.system_prompt import AppliedPrompt
from ..quota.enforce import Accounting, Reservation
from ..routes import ROUTES_BY_FUNCTION
from ..upstream.client import retry_after_seconds

PREFER_HEADER = "prefer"
JOB_STATUS_HEADER = "x-sekisho-job-status"
JOB_ROUTE = "sekisho/jobs/{job_id}"
POLL_SECONDS = 2  # the Retry-After suggested to pollers of a job that is not finished

# Job documents hold the whole upstream request; Cosmos items are limited to 2 MB.
MAX_JOB_REQUEST_BYTES = 1_500_000

QUEUED, RUNNING, WAITING, SUCCEEDED, FAILED = "queued", "running", "waiting", "succeeded", "failed"
FINISHED = (SUCCEEDED, FAILED)

# Request headers the job keeps for the upstream call and the log (never Authorization).
_KEPT_HEADERS = ("user-agent",)


def prefers_async(request: Request) -> bool:
    """True when a Prefer header carries the `respond-async` preference."""
    for value in request.headers.getlist(PREFER_HEADER):
        for preference in value.split(","):
            if preference.split(";", 1)[0].strip().lower() == "respond-async":
                return True
    return False


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def status_url(public_base_url: str, job_id: str) -> str:
    """Where the job is polled: under the configured public address, or a path relative to the
    one the client called (never built from the request's Host header, which a client sets)."""
    return public_base_url + "/" + JOB_ROUTE.replace("{job_id}", quote(job_id, safe=""))


def new_job(ctx: RequestContext, reason: str) -> dict[str, Any]:
    """The job document for a request that passed every stage before the upstream call. It
    carries the quota reservation, which the job settles when it ends."""
    settings = ctx.policy.async_jobs
    reservation: Reservation | None = ctx.quota
    http = ctx.http
    return {
        "id": ctx.request_id,
        "app_id": ctx.app_id,
        "user_id": ctx.user_id,
        "status": QUEUED,
        "reason": reason,  # prefer (the client asked) or retry_budget (the policy turned a 429 into a job)
        "created_at": _now(),
        "updated_at": _now(),
        "attempts": 0,
        "waited_seconds": 0.0,
        "max_attempts": settings.max_attempts,
        "max_wait_seconds": settings.max_wait_seconds,
        "ttl": settings.retention_hours * 3600,
        "request": {
            "route": ctx.route.function_name,
            "method": http.method,
            "path": http.url.path,
            "query": http.url.query,
            "headers": {name: http.headers[name] for name in _KEPT_HEADERS if name in http.headers},
            "client_ip": http.client.host if http.client else None,
            "received_at": ctx.received_at.isoformat(),
            "deployment": ctx.deployment,
            "api_version": ctx.api_version,
            "body": ctx.body,
            "request_bytes": len(ctx.raw_body),
            "app_name": ctx.app_name,
            "tenant_id": ctx.tenant_id,
            "properties": ctx.properties,
            # The stages' parts that the finished request's log record still reads.
            "system_prompt": asdict(ctx.system_prompt) if ctx.system_prompt is not None else None,
            "guard_decisions": ctx.guard_decisions,
            "claimed_user_ignored": ctx.claimed_user_ignored,
            "accounting": ctx.accounting.to_document() if ctx.accounting is not None else None,
            "cache": ctx.cache.outcome if ctx.cache is not None else None,
            "attempts": ctx.upstream.attempts,
            "retries": ctx.upstream.retries,
        },
        "reservation": None if reservation is None else reservation.to_document(),
        "result": None,
        "error": None,
    }


def check_size(ctx: RequestContext) -> None:
    if len(ctx.raw_body) > MAX_JOB_REQUEST_BYTES:
        raise GatewayError(413, "request_too_large", f"Async jobs take request bodies up to {MAX_JOB_REQUEST_BYTES} bytes.")


def restore_context(job: dict[str, Any], policy) -> RequestContext:
    """A request context equivalent to the one that submitted the job, for finishing it."""
    saved = job["request"]
    http = internal_request(saved["method"], saved["path"], saved["query"], saved["headers"], saved.get("client_ip"))
    received_at = datetime.fromisoformat(saved["received_at"])
    ctx = RequestContext(request_id=job["id"], http=http, route=ROUTES_BY_FUNCTION[saved["route"]], received_at=received_at)
    # Latency in the log covers the whole job, from the original request to its end.
    ctx.started = time.perf_counter() - max(0.0, (datetime.now(timezone.utc) - received_at).total_seconds())
    ctx.deployment, ctx.api_version = saved["deployment"], saved["api_version"]
    ctx.body, ctx.body_modified = saved["body"], True
    ctx.raw_body = b"\0" * saved["request_bytes"]  # only its length is read (the log's request_bytes)
    ctx.policy = policy
    ctx.app_id, ctx.user_id, ctx.app_name, ctx.tenant_id = job["app_id"], job["user_id"], saved["app_name"], saved["tenant_id"]
    ctx.properties = saved["properties"]
    ctx.system_prompt = AppliedPrompt(**saved["system_prompt"]) if saved.get("system_prompt") else None
    ctx.guard_decisions = list(saved["guard_decisions"])
    ctx.claimed_user_ignored = bool(saved.get("claimed_user_ignored"))
    ctx.accounting = Accounting.from_document(saved.get("accounting")) if saved.get("accounting") else None
    if saved.get("cache"):
        ctx.cache = CacheState(None, None, 0, status=saved["cache"].get("status", "MISS"), outcome=saved["cache"])
    ctx.upstream.attempts = list(saved.get("attempts") or ())
    ctx.upstream.retries = saved["retries"]
    if job.get("reservation"):
        ctx.quota = Reservation.from_document(job["reservation"])
    return ctx


def job_summary(job: dict[str, Any]) -> dict[str, Any]:
    """What the log record and the status answer say about a job."""
    return {k: job.get(k) for k in ("id", "status", "reason", "attempts", "waited_seconds", "created_at", "updated_at")}


def accepted_response(job: dict[str, Any], url: str, headers: dict[str, str]) -> Response:
    body = {"object": "sekisho.job", **job_summary(job), "status_url": url}
    return Response(
        content=orjson.dumps(body), status_code=202, media_type="application/json",
        headers={**headers, "Location": url, "Retry-After": str(POLL_SECONDS), JOB_STATUS_HEADER: job["status"]},
    )


def status_response(job: dict[str, Any], url: str) -> Response:
    """Pending: 202 with the job; succeeded: the answer as the synchronous call would have
    given it; failed: the error, with the status the synchronous call would have had."""
    headers = {"x-sekisho-request-id": job["id"], JOB_STATUS_HEADER: job["status"]}
    if job["status"] == SUCCEEDED:
        result = job["result"]
        return Response(content=orjson.dumps(result["body"]), status_code=result["status"], media_type="application/json",
                        headers={**headers, **result.get("headers", {})})
    if job["status"] == FAILED:
        error = job["error"]
        return Response(content=orjson.dumps(error["body"]), status_code=error["status"], media_type="application/json",
                        headers={**error.get("headers", {}), **headers, "x-should-retry": "false"})
    return accepted_response(job, url, headers)


def record_result(job: dict[str, Any], ctx: RequestContext, result: UpstreamResult) -> None:
    """Keep a finished answer (after the output guard) in the job."""
    body = result.json  # after the output guard, this is what the client may see
    if body is None:
        try:
            body = orjson.loads(result.body)
        except orjson.JSONDecodeError:
            body = {"error": {"message": result.body[:2000].decode("utf-8", "replace"), "type": "upstream_error", "code": "upstream_error", "param": None}}
    keep = {k: v for k, v in ctx.response_headers.items() if k.startswith("x-sekisho-") or k.startswith("x-ratelimit-")}
    if result.status < 400:
        job["status"], job["result"] = SUCCEEDED, {"status": result.status, "body": body, "headers": keep}
    else:
        job["status"], job["error"] = FAILED, {"status": result.status, "body": body}
    job["updated_at"] = _now()


def record_error(job: dict[str, Any], error: GatewayError) -> None:
    job["status"], job["error"] = FAILED, {"status": error.status, "body": orjson.loads(error.body()), "headers": dict(error.headers)}
    job["updated_at"] = _now()


def wait_before_next_attempt(error: GatewayError, attempt: int) -> float:
    """Seconds before a job's next attempt: the upstream's Retry-After hint, else back-off."""
    hint = retry_after_seconds({name.lower(): value for name, value in error.headers.items()})
    return hint if hint is not None else float(min(300, 2 ** attempt))


def mark(job: dict[str, Any], status: str, **fields: Any) -> None:
    job.update(fields, status=status, updated_at=_now())
