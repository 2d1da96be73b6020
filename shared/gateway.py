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

from . import errors, sse
from .admin.api import AdminApi, PolicyService
from .cache.responses import CacheResponses
from .context import RequestContext, UpstreamResult, new_request_id
from .errors import GatewayError
from .guards.content_safety import CheckContentSafety, ContentSafetyClient, checks_passed
from .guards.input_guard import GuardInput
from .guards.personal_data import MaskPersonalData
from .guards.output_guard import GuardOutput
from .identity.authenticate import Authenticate, Authenticator
from .identity.gateway_keys import KeyService, KeyVerifier
from .identity.tokens import JwksCache, TokenValidator
from .jobs import documents as job_documents
from .jobs.batches import CheckBatchInput
from .jobs.deferred import SettleDeferredWork
from .jobs.launch import JobLauncher, QueueJobLauncher
from .jobs.runner import JobRunner
from .operations import OPERATIONS, Operation
from .pipeline import Hooks, Stage
from .policy.access import ApplyPolicy, PolicyCache, PolicyResolver
from .policy.model_list import list_models
from .policy.ownership import RecordOwnership, list_owned_answer
from .policy.policies import builtin_defaults
from .policy.system_prompt import ApplySystemPrompt
from .quota.alerts import AlertWebhook, BudgetAlerts
from .quota.enforce import EnforceQuota, Windows
from .quota.pricing import PricingTable
from .records import telemetry
from .records.request_log import INSTANCE, LogRequest, LogSpool, LogWriter
from .routes import ModelRoute
from .settings import Settings
from .store import Store, open_store
from .upstream.backends import BackendPool, Circuit
from .upstream.client import UpstreamClient
from .upstream.relay_response import AnswerResponse, RelayResponse, mark_sent
from .validation import RequestStreamUsage, ValidateRequest

logger = logging.getLogger("sekisho.gateway")

REQUEST_ID_HEADER = "x-sekisho-request-id"
_PROPERTY_PREFIX_BYTES = b"x-sekisho-property-"
_MAX_PROPERTIES = 20
_YOUNG_COLLECTION_THRESHOLD = 50_000  # allocations of container objects (net) between young collections
# How long an answer's finishing work waits for the answer to go out before it runs anyway.
_UNSENT_ANSWER_GRACE_SECONDS = 1.0


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
        self.jobs: JobRunner | None = None
        self.ownership: RecordOwnership | None = None
        self.deferred: SettleDeferredWork | None = None  # batches and background responses, settled when they end
        self.stages: list[Stage] = []
        self._pipelines: dict[Operation, list[Stage]] = {}  # per operation: the stages its table entry names
        self._hooks: dict[Operation, Hooks] = {}  # per operation: the stages acting in each hook
        self._finishing: set[asyncio.Task] = set()  # requests answered, still being finished
        self._unsent: dict[asyncio.Future, float] = {}  # answers handed over, not yet sent → since when
        self._unsent_sweeper: asyncio.Task | None = None

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
                env=settings.raw, default_v1_routes=settings.azure_openai_v1_routes, known_deployments=settings.deployments,
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
            pepper = settings.gateway_key_pepper.encode() if settings.gateway_key_pepper else None
            key_verifier = KeyVerifier(store, pepper, settings.policy_cache_seconds) if pepper else None
            authenticator = self.authenticator = Authenticator(validator, settings.easy_auth_enabled, key_verifier)
            self.policy_cache = PolicyCache(store, settings.policy_cache_seconds)
            self._builtin_policy = builtin_defaults(settings.log_content, settings.log_retention_days)
            resolver = self.resolver = PolicyResolver(self.policy_cache, self._builtin_policy, settings.allow_unregistered_apps)
            if self.job_launcher is None:
                self.job_launcher = QueueJobLauncher.from_settings(settings)
            self.pricing = PricingTable(store, settings.policy_cache_seconds)
            windows = Windows(settings.quota_timezone)
            self.quota = EnforceQuota(store, self.pricing, windows, settings.currency, settings.quota_lease_share)
            webhook = AlertWebhook(settings.alert_webhook_url, settings.alert_webhook_secret) if settings.alert_webhook_url else None
            self.quota.alerts = BudgetAlerts(store, settings.currency, webhook, emit=telemetry.emit_alert)
            self.cache = CacheResponses(store, self.pricing, windows, settings.cache_max_entry_bytes, settings.currency)
            self.admin = AdminApi(
                authenticator, settings.admin_role, PolicyService(store, self.policy_cache), store,
                resolver=resolver, pricing=self.pricing, windows=windows, currency=settings.currency, cache=self.cache,
                backends=self.backends, keys=KeyService(store, pepper, key_verifier) if pepper else None,
                billing_account=billing_account_id(settings),
            )
            self.admin.usage.on_reset = self.quota.leases.forget_subject
            log_request = LogRequest(self.log_writer, settings.log_content, settings.log_retention_days)
            batch_input = CheckBatchInput()
            self.content_safety = CheckContentSafety(ContentSafetyClient(settings.content_safety_endpoint, settings.content_safety_api_key))
            self.ownership = RecordOwnership(store)
            self.deferred = SettleDeferredWork(store, self.upstream, self.quota, log_request, resolver, self._builtin_policy)
            self.stages = [
                Authenticate(authenticator),
                ValidateRequest(settings.max_body_bytes, settings.max_upload_bytes),
                ApplyPolicy(resolver),
                # Before ownership, so that its `finish` (settling work that ended) sees the record
                # that ownership's `finish` removes when the object is deleted.
                self.deferred,
                self.ownership,
                batch_input,
                GuardInput(),
                # Before Content Safety: with mask_upstream, only placeholders leave the gateway.
                MaskPersonalData(),
                # Its input checks run on while the stages after it work; the gateway waits for
                # them (checks_passed) before any answer leaves or the upstream is called.
                self.content_safety,
                ApplySystemPrompt(),
                RequestStreamUsage(settings.azure_openai_api_version),
                self.cache,
                self.quota,
                GuardOutput(),
                log_request,
            ]
            self._pipelines = log_request.pipelines = {op: [stage for stage in self.stages if op.applies(stage.name)] for op in OPERATIONS}
            self._hooks = {op: Hooks.of(stages) for op, stages in self._pipelines.items()}
            batch_input.stages = self.stages  # a batch input file's lines pass the stages their operation has
            self.jobs = JobRunner(store, self.upstream, authenticator, resolver, self._builtin_policy, self.job_launcher,
                                  finish=self._finish, after=self._after, public_base_url=settings.public_base_url)
            # Everything built so far lives as long as the process: keep the collector from
            # walking it again and again (full collections were a cause of the latency tail).
            gc.freeze()
            # The requests in flight hold thousands of objects: at the default threshold (2,000)
            # a young collection ran every ~50 requests at c=64, scanning objects that were all
            # still alive (~2 ms each, ~3 % of the worker's CPU). Above what concurrent requests
            # hold, their objects are freed by reference counting before a collection comes.
            gc.set_threshold(_YOUNG_COLLECTION_THRESHOLD, *gc.get_threshold()[1:])
            self._started = True

    async def aclose(self) -> None:
        if not self._started:
            return
        self._started = False
        if self.job_launcher is not None:
            await self.job_launcher.close()  # first: running jobs still write logs and settle quotas
        while self._finishing:
            await asyncio.gather(*self._finishing, return_exceptions=True)
        if self._unsent_sweeper is not None:
            self._unsent_sweeper.cancel()
        await self.quota.drain()
        await self.quota.alerts.close()
        await self.cache.drain()
        await self.log_writer.close()
        await self.upstream.close()
        await self.content_safety.client.close()
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
        route = route.for_method(request.method)
        ctx = RequestContext(request_id=request_id, http=request, route=route)
        ctx.response_headers[REQUEST_ID_HEADER] = request_id
        ctx.properties = _custom_properties(request)
        hooks = self._hooks[route.operation]
        try:
            for stage in hooks.before:
                # A stage that answers (a cache hit) sets ctx.result; the later stages still run
                # and decide for themselves (the quota counts a hit as a request).
                await stage.before(ctx)
            await checks_passed(ctx)
            if route.operation.answered_by_gateway == "models":
                ctx.result = list_models(ctx, self.settings.deployments)
            elif route.operation.answered_by_gateway == "owned_list":
                ctx.result = await list_owned_answer(self.store, ctx)
            if ctx.result is None and self.jobs.takes(ctx, job_documents.prefers_async(request)):
                return await self.jobs.submit(ctx, "prefer")
            if ctx.result is None:
                try:
                    ctx.result = await self.upstream.send(ctx)
                except GatewayError as exc:
                    # The policy may turn "still 429 when the retry budget ran out" into a job.
                    if exc.code == "upstream_rate_limited" and self.jobs.takes(ctx, ctx.policy.async_jobs.on_budget_exhausted):
                        try:
                            return await self.jobs.submit(ctx, "retry_budget")
                        except GatewayError:
                            raise exc from None  # the client asked for nothing async: it gets the 429
                    raise
            for stage in hooks.after:
                ctx.result = stage.after(ctx, ctx.result)
            for review in ctx.result.reviews:
                ctx.result = await review(ctx, ctx.result)
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
            ctx.client_disconnected = True
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
            sent = asyncio.get_running_loop().create_future()
            return RelayResponse(self._stream(ctx, result, sent), status_code=200, headers=headers, media_type=media_type, sent=sent)
        ctx.status = result.status
        ctx.finished_at = ctx.first_byte_at = time.perf_counter()
        # The quota stage prices the answer for its header; the other stages' finishing work
        # (cache entry, log record) runs once the answer is on its way, not before it — except
        # the record of a created file or batch, which the app's next list must show.
        done = (self.quota, self.ownership) if self.ownership.records_before_answer(ctx) else (self.quota,)
        for stage in done:
            await self._finish_stage(stage, ctx)
        headers = {**result.headers, **ctx.response_headers}
        media_type = headers.pop("content-type", None)
        sent = asyncio.get_running_loop().create_future()
        response = AnswerResponse(content=result.body, status_code=result.status, headers=headers, media_type=media_type, sent=sent)
        self._finish_once_sent(ctx, sent, done=done)
        return response

    def _finish_once_sent(self, ctx: RequestContext, sent: asyncio.Future, done: tuple[Stage, ...] = ()) -> None:
        """Finish the request in a task of its own, once its answer has gone out (see
        upstream/relay_response.py), or after a grace period if the answer is never sent (the
        worker's web server gave up on it): finished either way. Tracked, so that shutdown
        waits for it (aclose)."""
        task = asyncio.get_running_loop().create_task(self._finish_after(ctx, sent, done))
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)

    async def _finish_after(self, ctx: RequestContext, sent: asyncio.Future, done: tuple[Stage, ...]) -> None:
        if not sent.done():
            # One sweeper for every answer still waiting to go out, rather than a timer per request.
            loop = asyncio.get_running_loop()
            self._unsent[sent] = loop.time()
            if self._unsent_sweeper is None or self._unsent_sweeper.done():
                self._unsent_sweeper = loop.create_task(self._sweep_unsent())
            try:
                await sent
            finally:
                self._unsent.pop(sent, None)
        await self._finish(ctx, done=done)

    async def _sweep_unsent(self) -> None:
        """Every grace period, while any answer waits to go out: those that have waited that long
        are taken as never to be sent, so that their requests are finished."""
        loop = asyncio.get_running_loop()
        while self._unsent:
            await asyncio.sleep(_UNSENT_ANSWER_GRACE_SECONDS / 2)
            now = loop.time()
            for sent, since in list(self._unsent.items()):
                if now - since >= _UNSENT_ANSWER_GRACE_SECONDS:
                    mark_sent(sent)

    async def _stream(self, ctx: RequestContext, result: UpstreamResult, sent: asyncio.Future) -> AsyncIterator[bytes]:
        try:
            async for event in result.events:
                if ctx.first_byte_at is None:
                    ctx.first_byte_at = time.perf_counter()
                yield event.encoded()
        except (asyncio.CancelledError, GeneratorExit):
            ctx.client_disconnected = True
            ctx.status = 499  # the client went away mid-stream (nginx's convention)
            raise
        finally:
            ctx.finished_at = time.perf_counter()
            if ctx.stream_summary is not None and ctx.stream_summary.error and ctx.status == 200:
                ctx.status = 502
            await sse.close(result.events)  # releases the upstream connection at once
            self._finish_once_sent(ctx, sent)  # after the body's closing chunk, not before it

    # Async jobs: the lifecycle lives in jobs/runner.py; these start the gateway and hand over.
    async def job_status(self, request: Request, job_id: str) -> Response:
        started = await self._start_or_error()
        return started or await self.jobs.status(request, job_id)

    async def run_job_attempt(self, task: dict) -> dict:
        await self.start()
        return await self.jobs.run_attempt(task)

    async def give_up_job(self, task: dict) -> dict:
        await self.start()
        return await self.jobs.give_up(task)

    async def reconcile_deferred_work(self) -> dict[str, int]:
        """The reconciling timer: settle batches and background responses that ended unpolled, and
        send budget alerts whose instance stopped before its webhook accepted them."""
        await self.start()
        settled = await self.deferred.reconcile()
        try:
            settled["alerts_redelivered"] = await self.quota.alerts.redeliver_abandoned()
        except Exception:  # the store or the receiver failing must not stop the settling above
            logger.exception("budget alert redelivery failed; the next run tries again")
        return settled

    async def _after(self, ctx: RequestContext, result: UpstreamResult) -> UpstreamResult:
        """The pipeline's way out (reverse order) for an answer the upstream gave a job."""
        for stage in self._hooks[ctx.route.operation].after:
            result = stage.after(ctx, result)
        for review in result.reviews:
            result = await review(ctx, result)
        return result

    async def _finish(self, ctx: RequestContext, done: tuple[Stage, ...] = ()) -> None:
        # In pipeline order, so that the request log (last) sees what the others added.
        for stage in self._hooks[ctx.route.operation].finish:
            if stage not in done:
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

    async def admin_keys(self, request: Request, app_id: str, key_id: str | None = None, rotate: bool = False) -> Response:
        started = await self._start_or_error()
        return started or await self.admin.gateway_keys(request, app_id, key_id, rotate)

    async def admin_alerts(self, request: Request) -> Response:
        started = await self._start_or_error()
        return started or await self.admin.alerts(request)

    async def admin_logs_export(self, request: Request) -> Response:
        started = await self._start_or_error()
        return started or await self.admin.export_logs(request)

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


def billing_account_id(settings: Settings) -> str:
    """The FOCUS export's BillingAccountId: this gateway, named by the tenant it serves."""
    return f"sekisho:{settings.auth_tenant_ids[0]}" if settings.auth_tenant_ids else "sekisho"


def _custom_properties(request: Request) -> dict[str, str]:
    properties = {}
    for name, value in request.scope["headers"]:  # raw (lower-case) names: only matches are decoded
        if name.startswith(_PROPERTY_PREFIX_BYTES) and len(properties) < _MAX_PROPERTIES:
            properties[name[len(_PROPERTY_PREFIX_BYTES) :][:64].decode("latin-1")] = value[:256].decode("latin-1")
    return properties


def _backend_headers(ctx: RequestContext) -> None:
    if ctx.upstream.backend:
        ctx.response_headers["x-sekisho-backend"] = ctx.upstream.backend
        ctx.response_headers["x-sekisho-retries"] = str(ctx.upstream.retries)


def _error_response(error: GatewayError, headers: dict[str, str]) -> Response:
    return Response(content=error.body(), status_code=error.status, headers=headers, media_type="application/json")

