"""The life of an async job, from the request that asks for one to its last step.

`submit` turns a request that passed every stage before the upstream call into a stored job and
a 202; `status` answers a poll of its status URL; `run_attempt` and `give_up` are the
orchestration's activities (jobs/orchestration.py). A job is finished like the synchronous path
would finish the request — the pipeline's way out (output guard, system prompt), then every
stage's `finish` (quota settlement, cache, one log record under the job's id) — through the two
callbacks the gateway hands over, so this module needs no stage of its own.
"""
from __future__ import annotations

import logging
import time
from typing import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response

from .. import errors
from ..context import RequestContext, UpstreamResult
from ..validation import refuse_control_characters
from ..errors import GatewayError
from ..policy.access import forbidden
from ..policy.policies import effective_policy
from ..records.credentials import carries_credentials
from ..store import PreconditionFailed, Store, StoreError
from . import documents
from .launch import JobLauncher

logger = logging.getLogger("sekisho.jobs")

_RETRIED_CODES = ("upstream_rate_limited", "upstream_error", "upstream_timeout")


class JobRunner:
    def __init__(self, store: Store, upstream, authenticator, resolver, builtin_policy, launcher: JobLauncher | None, *,
                 finish: Callable[[RequestContext], Awaitable[None]],
                 after: Callable[[RequestContext, UpstreamResult], Awaitable[UpstreamResult]], public_base_url: str = "") -> None:
        self._store = store
        self.public_base_url = public_base_url  # Settings.public_base_url: status URLs are built from it
        self._upstream = upstream
        self._authenticator = authenticator
        self._resolver = resolver
        self._builtin_policy = builtin_policy
        self._launcher = launcher
        self._finish = finish  # every stage's finish, in pipeline order
        self._after = after  # the pipeline's way out, in reverse order

    def takes(self, ctx: RequestContext, wanted: bool) -> bool:
        """Whether this request becomes a job. A preference, not an order (RFC 7240): without a
        job runner, for streams, for operations the gateway answers itself, or when the policy
        says no, the request is answered synchronously. A request carrying data-source
        credentials is never stored as a job: they would be at rest in the job document."""
        return (wanted and self._launcher is not None and not ctx.stream and not ctx.route.operation.answered_by_gateway
                and ctx.policy.async_jobs.enabled and not carries_credentials(ctx.route.operation, ctx.body))

    async def submit(self, ctx: RequestContext, reason: str) -> Response:
        documents.check_size(ctx)
        job = documents.new_job(ctx, reason)
        unavailable = GatewayError(503, "async_unavailable", "The job could not be queued; try again, or call without 'Prefer: respond-async'.",
                                   error_type="server_error")
        try:
            job["etag"] = await self._store.put_job(job)
        except Exception:
            logger.exception("job %s could not be stored", ctx.request_id)
            raise unavailable from None  # the reservation is still this request's: released as it ends
        ctx.quota = None  # from here on the job owns the reservation and settles it, once
        try:
            await self._launcher.launch(job)
        except Exception:
            logger.exception("job %s could not be queued", ctx.request_id)
            await self._end(job, documents.restore_context(job, ctx.policy), error=unavailable)
            raise unavailable from None
        ctx.job = documents.job_summary(job)
        ctx.status = 202
        ctx.finished_at = time.perf_counter()
        await self._finish(ctx)
        headers = dict(ctx.response_headers)
        if reason == "prefer":
            headers["Preference-Applied"] = "respond-async"
        return documents.accepted_response(job, documents.status_url(self.public_base_url, job["id"]), headers)

    async def status(self, request: Request, job_id: str) -> Response:
        """GET on a job's status URL, by the app (and, for delegated tokens, the user) that owns it."""
        try:
            identity = await self._authenticator.authenticate(request)
            refuse_control_characters(job_id, "job_id")
            try:
                job = await self._store.get_job(identity.app_id, job_id)
            except StoreError:
                raise GatewayError(503, "store_unavailable", "The job store is unavailable; poll again shortly.",
                                   error_type="server_error", headers={"Retry-After": str(documents.POLL_SECONDS)}) from None
            if job is None or (identity.delegated and job["user_id"] != identity.user_oid):
                raise errors.not_found(f"No job {job_id!r} for this application (jobs are kept for their retention time).")
        except GatewayError as exc:
            return Response(content=exc.body(), status_code=exc.status, headers=exc.headers, media_type="application/json")
        return documents.status_response(job, documents.status_url(self.public_base_url, job_id))

    async def _load(self, task: dict) -> tuple[dict | None, RequestContext | None, GatewayError | None]:
        """The job and a request context to finish it; a refusal when its app may no longer call."""
        job = await self._store.get_job(task["app_id"], task["job_id"])
        if job is None or job["status"] in documents.FINISHED:
            return job, None, None  # expired, or finished by an earlier run of this step (replay)
        try:
            policy = await self._resolver.resolve(job["app_id"], job["user_id"])
        except GatewayError as refusal:  # the app was removed meanwhile
            return job, documents.restore_context(job, effective_policy(job["app_id"], self._builtin_policy, None, None, None)), refusal
        ctx = documents.restore_context(job, policy)
        if not policy.enabled:
            return job, ctx, forbidden("This application or user was disabled on the gateway while the job waited.")
        return job, ctx, None

    async def run_attempt(self, task: dict) -> dict:
        """The attempt activity: one upstream call (failing over, never sleeping). Finishes the
        job, or reports how long to wait before the next attempt. Every change of the job is a
        conditional write, so that two runs of one step (Durable may run an activity twice)
        cannot both call the model on its behalf and both finish it."""
        job, ctx, refusal = await self._load(task)
        if ctx is None:
            return {"state": job["status"] if job else "missing"}
        if refusal is not None:
            return await self._end(job, ctx, error=refusal)
        documents.mark(job, documents.RUNNING, attempts=task["attempt"], waited_seconds=task["waited_seconds"])
        try:
            job["etag"] = await self._store.put_job(job, if_match=job["etag"])  # claim this attempt
        except PreconditionFailed:
            return {"state": "superseded"}
        ctx.job = documents.job_summary(job)
        try:
            result = await self._upstream.send(ctx, may_wait=False)
        except GatewayError as exc:
            if exc.code in _RETRIED_CODES:
                wait = documents.wait_before_next_attempt(exc, task["attempt"])
                documents.mark(job, documents.WAITING)
                try:
                    await self._store.put_job(job, if_match=job["etag"])
                except PreconditionFailed:
                    return {"state": "superseded"}
                return {"state": "retry", "retry_after_seconds": wait, "error": {"status": exc.status, "code": exc.code}}
            return await self._end(job, ctx, error=exc)
        return await self._end(job, ctx, result=await self._after(ctx, result))

    async def give_up(self, task: dict) -> dict:
        """The give-up activity: attempts or waiting time used up."""
        job, ctx, refusal = await self._load(task)
        if ctx is None:
            return {"state": job["status"] if job else "missing"}
        documents.mark(job, job["status"], attempts=task["attempt"], waited_seconds=task["waited_seconds"])
        last = task.get("last_error") or {}
        if refusal is not None:
            error = refusal
        elif last.get("code") == "upstream_rate_limited":
            error = GatewayError(429, "upstream_rate_limited",
                                 f"Azure OpenAI kept rate limiting this deployment: {task['attempt']} attempt(s) over {task['waited_seconds']:.0f} s of waiting did not get through.",
                                 error_type="rate_limit_error", headers={"Retry-After": "60"})
        else:
            error = GatewayError(last.get("status") or 502, last.get("code") or "upstream_error",
                                 f"Azure OpenAI kept failing: {task['attempt']} attempt(s) over {task['waited_seconds']:.0f} s did not get an answer.")
        return await self._end(job, ctx, error=error)

    async def _end(self, job: dict, ctx: RequestContext, *, result: UpstreamResult | None = None, error: GatewayError | None = None) -> dict:
        """Finish the job's request like the synchronous path would, at most once: the job is
        marked finished (conditionally) before the reservation is settled and the log written."""
        if error is not None:
            ctx.error, ctx.status = error, error.status
            documents.record_error(job, error)
        else:
            ctx.result, ctx.status = result, result.status
            documents.record_result(job, ctx, result)
        try:
            job["etag"] = await self._store.put_job(job, if_match=job.get("etag"))
        except PreconditionFailed:
            return {"state": "superseded"}  # another run of this step got there first
        ctx.finished_at = ctx.first_byte_at = time.perf_counter()
        ctx.job = documents.job_summary(job)
        await self._finish(ctx)  # settles the reservation, writes the log record under the job's id
        if job.get("result") and "x-sekisho-cost" in ctx.response_headers:
            job["result"]["headers"]["x-sekisho-cost"] = ctx.response_headers["x-sekisho-cost"]
            try:
                await self._store.put_job(job, if_match=job["etag"])
            except Exception:
                logger.warning("job %s: the cost header could not be added to its answer", job["id"])
        return {"state": job["status"]}
