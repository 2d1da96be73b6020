"""The gateway: the one application context (settings, store, upstream client, log writer)
and the handler that runs a request through the pipeline.

function_app.py creates one Gateway at import; everything that holds connections is created on
the first request, inside the event loop that serves it, and closed by `aclose()`.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import sys
import time
from typing import AsyncIterator
from zoneinfo import ZoneInfo

import orjson
from starlette.requests import Request
from starlette.responses import Response

from . import async_jobs, errors, telemetry
from .access import ApplyPolicy, PolicyCache, PolicyResolver, forbidden
from .admin_api import AdminApi, PolicyService
from .context import RequestContext, UpstreamResult, new_request_id
from .errors import GatewayError
from .identity import Authenticate, Authenticator
from .job_launch import JobLauncher, QueueJobLauncher
from .policy import effective_policy
from .input_guard import GuardInput
from .output_guard import GuardOutput
from .system_prompt import ApplySystemPrompt
from .model_list import list_models
from .credentials import carries_credentials
from .operations import OPERATIONS, Operation
from .pipeline import Stage
from .policy import builtin_defaults
from .pricing import PricingTable
from .quota import EnforceQuota, Windows
from .relay_response import RelayResponse
from .response_cache import CacheResponses
from .request_log import INSTANCE, LogSpool, LogWriter, build_record
from .routes import ModelRoute
from .settings import Settings
from .store import PreconditionFailed, Store, StoreError, open_store
from .tokens import JwksCache, TokenValidator
from .backends import BackendPool, Circuit
from .upstream import UpstreamClient
from .validation import RequestStreamUsage, ValidateRequest

logger = logging.getLogger("sekisho.gateway")

REQUEST_ID_HEADER = "x-sekisho-request-id"
_PROPERTY_PREFIX_BYTES = b"x-sekisho-property-"
_MAX_PROPERTIES = 20


class LogRequest(Stage):
    """Last stage: every request that reached the gateway leaves exactly one record."""

    name = "request_log"

    def __init__(self, writer: LogWriter, settings: Settings) -> None:
        self._writer = writer
        self._settings = settings

    async def finish(self, ctx: RequestContext) -> None:
        policy = ctx.policy
        content = policy.content_logging if policy else self._settings.log_content
        retention = policy.retention_days if policy else self._settings.log_retention_days
        record = build_record(ctx, content, retention)
        self._writer.submit(record)
        telemetry.emit(record)


class Gateway:
    def __init__(self, env=None) -> None:
        self._env = env
        self._started = False
        self._start_lock: asyncio.Lock | None = None
        self.settings: Settings | None = None
        self.store: Store | None = None
        self.upstream: UpstreamClient | None = None
        self.backends: BackendPool | None = None
        self.log_writer: LogWriter | None = None
        self.jwks: JwksCache | None = None
        self.policy_cache: PolicyCache | None = None
        self.admin: AdminApi | None = None
        self.pricing: PricingTable | None = None
        self.quota: EnforceQuota | None = None
        self.cache: CacheResponses | None = None
        self.authenticator: Authenticator | None = None
        self.resolver: PolicyResolver | None = None
        # Async jobs: a storage queue in Azure; the local host sets its in-process runtime here.
        self.job_launcher: JobLauncher | None = None
        self.stages: list[Stage] = []
        self._pipelines: dict[Operation, list[Stage]] = {}  # per operation: the stages its table entry names
        self._finishing: set[asyncio.Task] = set()  # requests answered, still being finished

    # Lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        if self._started:
            return
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._started:
                return
            settings = Settings.from_env(self._env)
            # Threads (SQLite, SDKs) hold the GIL for up to the switch interval before the event
            # loop gets it back; 1 ms instead of 5 ms takes ~2 ms off the latency tail (measured).
            sys.setswitchinterval(0.001)
            store = await open_store(settings)
            self.settings, self.store = settings, store
            self.backends = BackendPool(
                store, settings.azure_openai_endpoint, settings.azure_openai_api_key,
                Circuit(settings.circuit_failures, settings.circuit_open_seconds), settings.policy_cache_seconds,
                env=settings.raw,
            )
            self.upstream = UpstreamClient(settings, self.backends)
            store_key = f"{settings.store}:{settings.sqlite_path if settings.store == 'sqlite' else settings.cosmos_endpoint + '/' + settings.cosmos_database}"
            self.log_writer = LogWriter(store, settings.log_flush_interval, settings.log_batch_size, ZoneInfo(settings.quota_timezone),
                                        LogSpool(settings.log_spool_dir, store_key))
            telemetry.configure(settings)
            self.log_writer.start()
            validator = None
            if settings.auth_tenant_ids:
                self.jwks = JwksCache(settings.auth_authority, settings.jwks_min_refresh_seconds)
                validator = TokenValidator(self.jwks, settings.auth_tenant_ids, settings.auth_audiences, settings.auth_leeway_seconds)
            authenticator = self.authenticator = Authenticator(validator, settings.easy_auth_enabled)
            self.policy_cache = PolicyCache(store, settings.policy_cache_seconds)
            self._builtin_policy = builtin_defaults(settings.log_content, settings.log_retention_days)
            resolver = self.resolver = PolicyResolver(self.policy_cache, self._builtin_policy, settings.allow_unregistered_apps)
            if self.job_launcher is None:
                self.job_launcher = QueueJobLauncher.from_settings(settings)
            self.pricing = PricingTable(store, settings.policy_cache_seconds)
            windows = Windows(settings.quota_timezone)
            self.quota = EnforceQuota(store, self.pricing, windows, settings.currency, settings.quota_lease_share)
            self.cache = CacheResponses(store, self.pricing, windows, settings.cache_max_entry_bytes, settings.currency)
            self.admin = AdminApi(
                authenticator, settings.admin_role, PolicyService(store, self.policy_cache), store,
                resolver=resolver, pricing=self.pricing, windows=windows, currency=settings.currency, cache=self.cache,
                backends=self.backends,
            )
            self.admin.usage.on_reset = self.quota.leases.forget_subject
            self.stages = [
                Authenticate(authenticator),
                ValidateRequest(settings.max_body_bytes),
                ApplyPolicy(resolver),
                GuardInput(),
                ApplySystemPrompt(),
                RequestStreamUsage(),
                self.cache,
                self.quota,
                GuardOutput(),
                LogRequest(self.log_writer, settings),
            ]
            self._pipelines = {op: [stage for stage in self.stages if op.applies(stage.name)] for op in OPERATIONS}
            # Everything built so far lives as long as the process: keep the collector from
            # walking it again and again (full collections were a cause of the latency tail).
            gc.freeze()
            self._started = True

    async def aclose(self) -> None:
        if not self._started:
            return
        self._started = False
        if self.job_launcher is not None:
            await self.job_launcher.close()  # first: running jobs still write logs and settle quotas
        while self._finishing:
            await asyncio.gather(*self._finishing, return_exceptions=True)
        await self.quota.drain()
        await self.cache.drain()
        await self.log_writer.close()
        await self.upstream.close()
        if self.jwks is not None:
            await self.jwks.close()
        await self.store.close()

    # Requests --------------------------------------------------------------------
    async def handle(self, request: Request, route: ModelRoute) -> Response:
        """Run one model request through the pipeline; always answers, always logs."""
        request_id = new_request_id()
        not_started = await self._start_or_error()  # misconfiguration: say so, do not crash the worker
        if not_started is not None:
            not_started.headers[REQUEST_ID_HEADER] = request_id
            return not_started
        ctx = RequestContext(request_id=request_id, http=request, route=route)
        ctx.response_headers[REQUEST_ID_HEADER] = request_id
        ctx.properties = _custom_properties(request)
        entered: list[Stage] = []
        try:
            for stage in self._pipelines[route.operation]:
                # A stage that answers (a cache hit) sets ctx.result; the later stages still run
                # and decide for themselves (the quota counts a hit as a request).
                entered.append(stage)
                await stage.before(ctx)
            if route.operation.answered_by_gateway:
                ctx.result = list_models(ctx, self.settings.deployments)
            if ctx.result is None and self._takes_job(ctx, async_jobs.prefers_async(request)):
                return await self._submit_job(ctx, "prefer")
            if ctx.result is None:
                try:
                    ctx.result = await self.upstream.send(ctx)
                except GatewayError as exc:
                    # The policy may turn "still 429 when the retry budget ran out" into a job.
                    if exc.code == "upstream_rate_limited" and self._takes_job(ctx, ctx.policy.async_jobs.on_budget_exhausted):
                        try:
                            return await self._submit_job(ctx, "retry_budget")
                        except GatewayError:
                            raise exc from None  # the client asked for nothing async: it gets the 429
                    raise
            for stage in reversed(entered):
                ctx.result = stage.after(ctx, ctx.result)
        except GatewayError as exc:
            ctx.error, ctx.status = exc, exc.status
            ctx.finished_at = time.perf_counter()
            await self._finish(ctx)
            _backend_headers(ctx)
            return _error_response(exc, {**ctx.response_headers, **exc.headers})
        except asyncio.CancelledError:
            # The client went away (or the host timed out) before the answer: finish anyway, so
            # the log, the quota and the cache's waiting requests are not left hanging.
            ctx.status = ctx.status or 499
            ctx.extra["client_disconnected"] = True
            ctx.finished_at = time.perf_counter()
            if ctx.result is not None and ctx.result.events is not None:
                await asyncio.shield(ctx.result.events.aclose())
            await asyncio.shield(self._finish(ctx))
            raise
        except Exception as exc:
            logger.exception("request %s failed", request_id)
            error = GatewayError(500, "server_error", "The gateway failed to handle the request.")
            ctx.error, ctx.status = exc, 500
            ctx.finished_at = time.perf_counter()
            await self._finish(ctx)
            return _error_response(error, ctx.response_headers)

        result = ctx.result
        _backend_headers(ctx)
        if result.is_stream:
            ctx.status = 200
            headers = {**result.headers, **ctx.response_headers}
            media_type = headers.pop("content-type", "text/event-stream")
            return RelayResponse(self._stream(ctx, result), status_code=200, headers=headers, media_type=media_type)
        ctx.status = result.status
        ctx.finished_at = ctx.first_byte_at = time.perf_counter()
        # The quota stage prices the answer for its header; the other stages' finishing work
        # (cache entry, log record) runs once the answer is on its way, not before it.
        await self._finish_stage(self.quota, ctx)
        headers = {**result.headers, **ctx.response_headers}
        media_type = headers.pop("content-type", None)
        response = Response(content=result.body, status_code=result.status, headers=headers, media_type=media_type)
        self._finish_soon(ctx, done=self.quota)
        return response

    def _finish_soon(self, ctx: RequestContext, done: Stage) -> None:
        """Finish the request in a task of its own: it runs as soon as the handler has handed
        its response over. Tracked, so that shutdown waits for it (aclose)."""
        task = asyncio.get_running_loop().create_task(self._finish(ctx, done=done))
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)

    async def _stream(self, ctx: RequestContext, result: UpstreamResult) -> AsyncIterator[bytes]:
        try:
            async for event in result.events:
                if ctx.first_byte_at is None:
                    ctx.first_byte_at = time.perf_counter()
                yield event.encoded()
        except (asyncio.CancelledError, GeneratorExit):
            ctx.extra["client_disconnected"] = True
            ctx.status = 499  # the client went away mid-stream (nginx's convention)
            raise
        finally:
            ctx.finished_at = time.perf_counter()
            if ctx.stream_summary is not None and ctx.stream_summary.error and ctx.status == 200:
                ctx.status = 502
            # Closing the upstream iterator releases its connection at once.
            aclose = getattr(result.events, "aclose", None)
            if aclose is not None:
                await aclose()
            await asyncio.shield(self._finish(ctx))

    # Async jobs (async_jobs.py, job_orchestration.py) ----------------------------------------
    def _takes_job(self, ctx: RequestContext, wanted: bool) -> bool:
        # A preference, not an order (RFC 7240): without a job runner, for streams, or when
        # the policy says no, the request is answered synchronously.
        # A request carrying data-source credentials is never stored as a job: they would be at rest.
        return (wanted and self.job_launcher is not None and not ctx.stream and not ctx.route.operation.answered_by_gateway
                and ctx.policy.async_jobs.enabled and not carries_credentials(ctx.route.operation, ctx.body))

    async def _submit_job(self, ctx: RequestContext, reason: str) -> Response:
        async_jobs.check_size(ctx)
        job = async_jobs.new_job(ctx, reason)
        unavailable = GatewayError(503, "async_unavailable", "The job could not be queued; try again, or call without 'Prefer: respond-async'.",
                                   error_type="server_error")
        try:
            job["etag"] = await self.store.put_job(job)
        except Exception:
            logger.exception("job %s could not be stored", ctx.request_id)
            raise unavailable from None  # the reservation is still this request's: released as it ends
        ctx.quota = None  # from here on the job owns the reservation and settles it, once
        try:
            await self.job_launcher.launch(job)
        except Exception:
            logger.exception("job %s could not be queued", ctx.request_id)
            await self._end_job(job, async_jobs.restore_context(job, ctx.policy), error=unavailable)
            raise unavailable from None
        ctx.extra["job"] = async_jobs.job_summary(job)
        ctx.status = 202
        ctx.finished_at = time.perf_counter()
        await self._finish(ctx)
        headers = dict(ctx.response_headers)
        if reason == "prefer":
            headers["Preference-Applied"] = "respond-async"
        return async_jobs.accepted_response(job, async_jobs.status_url(ctx.http, job["id"]), headers)

    async def job_status(self, request: Request, job_id: str) -> Response:
        """GET on a job's status URL, by the app (and, for delegated tokens, the user) that owns it."""
        started = await self._start_or_error()
        if started is not None:
            return started
        try:
            identity = await self.authenticator.authenticate(request)
            try:
                job = await self.store.get_job(identity.app_id, job_id)
            except StoreError:
                raise GatewayError(503, "store_unavailable", "The job store is unavailable; poll again shortly.",
                                   error_type="server_error", headers={"Retry-After": str(async_jobs.POLL_SECONDS)}) from None
            if job is None or (identity.delegated and job["user_id"] != identity.user_oid):
                raise errors.not_found(f"No job {job_id!r} for this application (jobs are kept for their retention time).")
        except GatewayError as exc:
            return _error_response(exc, exc.headers)
        return async_jobs.status_response(job, async_jobs.status_url(request, job_id))

    async def _load_job(self, task: dict) -> tuple[dict | None, RequestContext | None, GatewayError | None]:
        """The job and a request context to finish it; a refusal when its app may no longer call."""
        job = await self.store.get_job(task["app_id"], task["job_id"])
        if job is None or job["status"] in async_jobs.FINISHED:
            return job, None, None  # expired, or finished by an earlier run of this step (replay)
        try:
            policy = await self.resolver.resolve(job["app_id"], job["user_id"])
        except GatewayError as refusal:  # the app was removed meanwhile
            return job, async_jobs.restore_context(job, effective_policy(job["app_id"], self._builtin_policy, None, None, None)), refusal
        ctx = async_jobs.restore_context(job, policy)
        if not policy.enabled:
            return job, ctx, forbidden("This application or user was disabled on the gateway while the job waited.")
        return job, ctx, None

    async def run_job_attempt(self, task: dict) -> dict:
        """The attempt activity: one upstream call (failing over, never sleeping). Finishes the
        job, or reports how long to wait before the next attempt. Every change of the job is a
        conditional write, so that two runs of one step (Durable may run an activity twice)
        cannot both call the model on its behalf and both finish it."""
        await self.start()
        job, ctx, refusal = await self._load_job(task)
        if ctx is None:
            return {"state": job["status"] if job else "missing"}
        if refusal is not None:
            return await self._end_job(job, ctx, error=refusal)
        async_jobs.mark(job, async_jobs.RUNNING, attempts=task["attempt"], waited_seconds=task["waited_seconds"])
        try:
            job["etag"] = await self.store.put_job(job, if_match=job["etag"])  # claim this attempt
        except PreconditionFailed:
            return {"state": "superseded"}
        ctx.extra["job"] = async_jobs.job_summary(job)
        try:
            result = await self.upstream.send(ctx, may_wait=False)
        except GatewayError as exc:
            if exc.code in ("upstream_rate_limited", "upstream_error", "upstream_timeout"):
                wait = async_jobs.wait_before_next_attempt(exc, task["attempt"])
                async_jobs.mark(job, async_jobs.WAITING)
                try:
                    await self.store.put_job(job, if_match=job["etag"])
                except PreconditionFailed:
                    return {"state": "superseded"}
                return {"state": "retry", "retry_after_seconds": wait, "error": {"status": exc.status, "code": exc.code}}
            return await self._end_job(job, ctx, error=exc)
        for stage in reversed(self._pipelines[ctx.route.operation]):
            result = stage.after(ctx, result)
        return await self._end_job(job, ctx, result=result)

    async def give_up_job(self, task: dict) -> dict:
        """The give-up activity: attempts or waiting time used up."""
        await self.start()
        job, ctx, refusal = await self._load_job(task)
        if ctx is None:
            return {"state": job["status"] if job else "missing"}
        async_jobs.mark(job, job["status"], attempts=task["attempt"], waited_seconds=task["waited_seconds"])
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
        return await self._end_job(job, ctx, error=error)

    async def _end_job(self, job: dict, ctx: RequestContext, *, result: UpstreamResult | None = None, error: GatewayError | None = None) -> dict:
        """Finish the job's request like the synchronous path would, at most once: the job is
        marked finished (conditionally) before the reservation is settled and the log written."""
        if error is not None:
            ctx.error, ctx.status = error, error.status
            async_jobs.record_error(job, error)
        else:
            ctx.result, ctx.status = result, result.status
            async_jobs.record_result(job, ctx, result)
        try:
            job["etag"] = await self.store.put_job(job, if_match=job.get("etag"))
        except PreconditionFailed:
            return {"state": "superseded"}  # another run of this step got there first
        ctx.finished_at = ctx.first_byte_at = time.perf_counter()
        ctx.extra["job"] = async_jobs.job_summary(job)
        await self._finish(ctx)  # settles the reservation, writes the log record under the job's id
        if job.get("result") and "x-sekisho-cost" in ctx.response_headers:
            job["result"]["headers"]["x-sekisho-cost"] = ctx.response_headers["x-sekisho-cost"]
            try:
                await self.store.put_job(job, if_match=job["etag"])
            except Exception:
                logger.warning("job %s: the cost header could not be added to its answer", job["id"])
        return {"state": job["status"]}

    async def _finish(self, ctx: RequestContext, done: Stage | None = None) -> None:
        # In pipeline order, so that the request log (last) sees what the others added.
        for stage in self._pipelines[ctx.route.operation]:
            if stage is not done:
                await self._finish_stage(stage, ctx)

    @staticmethod
    async def _finish_stage(stage: Stage, ctx: RequestContext) -> None:
        try:
            await stage.finish(ctx)
        except Exception:
            logger.exception("stage %s failed to finish request %s", stage.name, ctx.request_id)

    async def admin_policies(self, request: Request, kind: str | None, **ids: str) -> Response:
        started = await self._start_or_error()
        return started or await self.admin.policies(request, kind, **ids)

    async def admin_usage(self, request: Request, app_id: str, user_id: str | None = None, reset: bool = False) -> Response:
        started = await self._start_or_error()
        return started or await self.admin.usage_view(request, app_id, user_id, reset)

    async def admin_pricing(self, request: Request, model: str | None = None) -> Response:
        started = await self._start_or_error()
        return started or await self.admin.pricing(request, model)

    async def admin_cache(self, request: Request, app_id: str, purge: bool = False) -> Response:
        started = await self._start_or_error()
        return started or await self.admin.cache_view(request, app_id, purge)

    async def admin_deployments(self, request: Request, name: str | None = None) -> Response:
        started = await self._start_or_error()
        return started or await self.admin.deployments(request, name)

    async def admin_reports(self, request: Request, report: str) -> Response:
        started = await self._start_or_error()
        return started or await self.admin.reports(request, report)

    async def admin_page(self, request: Request) -> Response:
        started = await self._start_or_error()
        return started or await self.admin.page(request)

    async def admin_login(self, request: Request) -> Response:
        started = await self._start_or_error()
        return started or await self.admin.login(request)

    async def admin_logs(self, request: Request, request_id: str | None = None) -> Response:
        started = await self._start_or_error()
        return started or await self.admin.logs(request, request_id)

    async def _start_or_error(self) -> Response | None:
        try:
            await self.start()
        except Exception as exc:
            logger.exception("gateway failed to start")
            return _error_response(GatewayError(500, "server_error", f"The gateway is misconfigured: {exc}"), {})
        return None

    async def health(self) -> Response:
        try:
            await self.start()
        except Exception as exc:
            return Response(content=errors.error_body(f"unhealthy: {exc}", "server_error", "server_error"), status_code=503, media_type="application/json")
        writer = self.log_writer
        log = {"queued": writer.queued, "written": writer.written, "failed_writes": writer.failed_attempts,
               "spooled": writer.spooled, "replayed_from_spool": writer.replayed, "spilled_to_fallback": writer.spilled,
               "rollup_failures": writer.rollup_failures}
        return Response(content=orjson.dumps({"status": "ok", "instance": INSTANCE, "request_log": log}), media_type="application/json")


def _custom_properties(request: Request) -> dict[str, str]:
    properties = {}
    for name, value in request.scope["headers"]:  # raw (lower-case) names: only matches are decoded
        if name.startswith(_PROPERTY_PREFIX_BYTES) and len(properties) < _MAX_PROPERTIES:
            properties[name[len(_PROPERTY_PREFIX_BYTES) :][:64].decode("latin-1")] = value[:256].decode("latin-1")
    return properties


def _backend_headers(ctx: RequestContext) -> None:
    if ctx.backend:
        ctx.response_headers["x-sekisho-backend"] = ctx.backend
        ctx.response_headers["x-sekisho-retries"] = str(ctx.retries)


def _error_response(error: GatewayError, headers: dict[str, str]) -> Response:
    return Response(content=error.body(), status_code=error.status, headers=headers, media_type="application/json")

