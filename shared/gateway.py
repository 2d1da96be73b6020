"""The gateway: the one application context (settings, store, upstream client, log writer)
and the handler that runs a request through the pipeline.

function_app.py creates one Gateway at import; everything that holds connections is created on
the first request, inside the event loop that serves it, and closed by `aclose()`.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from . import errors
from .access import ApplyPolicy, PolicyCache, PolicyResolver
from .admin_api import AdminApi, PolicyService
from .context import RequestContext, UpstreamResult
from .errors import GatewayError
from .identity import Authenticate, Authenticator
from .input_guard import GuardInput
from .output_guard import GuardOutput
from .system_prompt import ApplySystemPrompt
from .model_list import ListModels
from .pipeline import Stage
from .policy import builtin_defaults
from .pricing import PricingTable
from .quota import EnforceQuota, Windows
from .response_cache import CacheResponses
from .request_log import LogWriter, build_record
from .routes import ModelRoute
from .settings import Settings
from .store import Store, open_store
from .tokens import JwksCache, TokenValidator
from .backends import BackendPool, Circuit
from .upstream import UpstreamClient
from .validation import RequestStreamUsage, ValidateRequest

logger = logging.getLogger("sekisho.gateway")

REQUEST_ID_HEADER = "x-sekisho-request-id"
_PROPERTY_PREFIX = "x-sekisho-property-"
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
        self._writer.submit(build_record(ctx, content, retention))


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
        self.stages: list[Stage] = []

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
            store = await open_store(settings)
            self.settings, self.store = settings, store
            self.backends = BackendPool(
                store, settings.azure_openai_endpoint, settings.azure_openai_api_key,
                Circuit(settings.circuit_failures, settings.circuit_open_seconds), settings.policy_cache_seconds,
                env=settings.raw,
            )
            self.upstream = UpstreamClient(settings, self.backends)
            self.log_writer = LogWriter(store, settings.log_flush_interval, settings.log_batch_size)
            self.log_writer.start()
            validator = None
            if settings.auth_tenant_ids:
                self.jwks = JwksCache(settings.auth_authority, settings.jwks_min_refresh_seconds)
                validator = TokenValidator(self.jwks, settings.auth_tenant_ids, settings.auth_audiences, settings.auth_leeway_seconds)
            authenticator = Authenticator(validator, settings.easy_auth_enabled)
            self.policy_cache = PolicyCache(store, settings.policy_cache_seconds)
            resolver = PolicyResolver(
                self.policy_cache,
                builtin_defaults(settings.log_content, settings.log_retention_days),
                settings.allow_unregistered_apps,
            )
            self.pricing = PricingTable(store, settings.policy_cache_seconds)
            windows = Windows(settings.quota_timezone)
            self.quota = EnforceQuota(store, self.pricing, windows, settings.currency)
            self.cache = CacheResponses(store, self.pricing, windows, settings.cache_max_entry_bytes, settings.currency)
            self.admin = AdminApi(
                authenticator, settings.admin_role, PolicyService(store, self.policy_cache), store,
                resolver=resolver, pricing=self.pricing, windows=windows, currency=settings.currency, cache=self.cache,
                backends=self.backends,
            )
            self.stages = [
                Authenticate(authenticator),
                ValidateRequest(settings.max_body_bytes),
                ApplyPolicy(resolver),
                ListModels(settings.deployments),
                GuardInput(),
                ApplySystemPrompt(),
                RequestStreamUsage(),
                self.cache,
                self.quota,
                GuardOutput(),
                LogRequest(self.log_writer, settings),
            ]
            self._started = True

    async def aclose(self) -> None:
        if not self._started:
            return
        self._started = False
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
        request_id = uuid.uuid4().hex
        not_started = await self._start_or_error()  # misconfiguration: say so, do not crash the worker
        if not_started is not None:
            not_started.headers[REQUEST_ID_HEADER] = request_id
            return not_started
        ctx = RequestContext(request_id=request_id, http=request, route=route)
        ctx.response_headers[REQUEST_ID_HEADER] = request_id
        ctx.properties = _custom_properties(request)
        entered: list[Stage] = []
        try:
            for stage in self.stages:
                # A stage that answers (model list, cache hit) sets ctx.result; the later stages
                # still run and decide for themselves (the quota counts a hit as a request).
                entered.append(stage)
                await stage.before(ctx)
            if ctx.result is None:
                ctx.result = await self.upstream.send(ctx)
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
            return StreamingResponse(self._stream(ctx, result), status_code=200, headers=headers, media_type=media_type)
        ctx.status = result.status
        ctx.finished_at = ctx.first_byte_at = time.perf_counter()
        await self._finish(ctx)  # before the headers: finishing stages add some (the cost)
        headers = {**result.headers, **ctx.response_headers}
        media_type = headers.pop("content-type", None)
        return Response(content=result.body, status_code=result.status, headers=headers, media_type=media_type)

    async def _stream(self, ctx: RequestContext, result: UpstreamResult) -> AsyncIterator[bytes]:
        try:
            async for event in result.events:
                if ctx.first_byte_at is None:
                    ctx.first_byte_at = time.perf_counter()
                yield event
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

    async def _finish(self, ctx: RequestContext) -> None:
        # In pipeline order, so that the request log (last) sees what the others added.
        for stage in self.stages:
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
        return Response(content=b'{"status":"ok"}', media_type="application/json")


def _custom_properties(request: Request) -> dict[str, str]:
    properties = {}
    for name, value in request.headers.items():
        if name.startswith(_PROPERTY_PREFIX) and len(properties) < _MAX_PROPERTIES:
            properties[name[len(_PROPERTY_PREFIX) :][:64]] = value[:256]
    return properties


def _backend_headers(ctx: RequestContext) -> None:
    if ctx.backend:
        ctx.response_headers["x-sekisho-backend"] = ctx.backend
        ctx.response_headers["x-sekisho-retries"] = str(ctx.retries)


def _error_response(error: GatewayError, headers: dict[str, str]) -> Response:
    return Response(content=error.body(), status_code=error.status, headers=headers, media_type="application/json")

