"""The call to Azure OpenAI: backend choice, retries with tenacity, and the relay of streams.

One pooled aiohttp session per gateway (chosen by measurement: as a pass-through it
adds ~0.4 ms and holds ~10x the throughput of httpx), created on first use in the serving loop.

Retries (policy `retry`): on 429, 500, 502, 503, 504, connection errors and timeouts. A backend
that answered 429 cools down for its `retry-after-ms`/`Retry-After`, one that failed counts
towards its circuit breaker (backends.py); the next available backend by priority is tried at
once, and only when none is available does the loop wait — the longer of the soonest cool-down
and a jittered exponential back-off — while the policy's time budget allows. A stream is retried
only until its response starts, so nothing is ever sent twice. When the gateway gives up it says
so with `x-should-retry: false`, so that the openai SDK's own retries do not multiply its work.
"""
from __future__ import annotations

import asyncio
import math
import random
import time
from typing import AsyncIterator
from urllib.parse import quote

import aiohttp
import orjson
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type

from .. import errors, sse
from ..context import RequestContext, StreamSummary, UpstreamResult
from ..errors import GatewayError
from ..routes import Style
from ..settings import Settings
from .backends import Backend, BackendPool

# Response headers from Azure OpenAI that clients rely on (rate limits, retry hints, request ids).
_PASSED_HEADERS = {"retry-after", "retry-after-ms", "x-request-id", "apim-request-id", "azureml-model-session"}
_PASSED_PREFIXES = ("x-ratelimit-", "openai-", "x-ms-")
RETRYABLE_STATUS = {429, 500, 502, 503, 504}
NO_SDK_RETRY = {"x-should-retry": "false"}


def passed_headers(headers) -> dict[str, str]:
    out = {}
    for name, value in headers.items():
        lower = name.lower()
        if lower in _PASSED_HEADERS or lower.startswith(_PASSED_PREFIXES):
            out[lower] = value
    return out


def _answer_headers(ctx: RequestContext, response: aiohttp.ClientResponse, content_type: str) -> dict[str, str]:
    """The upstream headers the client gets, with the answer's content type; notes the upstream's request id."""
    headers = passed_headers(response.headers)
    ctx.upstream.request_id = headers.get("apim-request-id") or headers.get("x-request-id")
    headers["content-type"] = content_type
    return headers


def retry_after_seconds(headers) -> float | None:
    """Azure's hint: `retry-after-ms` (precise) or `Retry-After` (seconds)."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is not None:
            try:
                return max(0.0, float(value) * scale)
            except ValueError:
                continue
    return None


class _Retryable(Exception):
    """One failed attempt that may be retried; carries what the next decision needs."""

    def __init__(self, kind: str, backend: Backend, planned_wait: float, result: UpstreamResult | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(kind)
        self.kind = kind  # throttled, server_error, unreachable, timeout
        self.backend = backend
        self.planned_wait = planned_wait
        self.result = result
        self.retry_after = retry_after


class UpstreamClient:
    def __init__(self, settings: Settings, pool: BackendPool) -> None:
        self._settings = settings
        self._pool = pool
        self._session: aiohttp.ClientSession | None = None
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=settings.upstream_connect_timeout, sock_read=settings.upstream_read_timeout
        )

    def _session_for_loop(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self._settings.upstream_max_connections, ttl_dns_cache=300, enable_cleanup_closed=True
            )
            # No cookie jar: a proxy must not carry one app's upstream cookies into another app's calls.
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=self._timeout, auto_decompress=True, skip_auto_headers=("User-Agent",),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    def url_for(self, ctx: RequestContext, backend: Backend) -> str:
        route = ctx.route
        deployment = backend.deployment or ctx.deployment or ""
        template, style = route.template, route.style
        if style is Style.V1 and not backend.v1_routes:
            # A backend without the v1 API: the same operation on its deployment route (the
            # answers have the same shape both ways).
            azure = next((spec for spec in route.operation.routes if spec.style is Style.AZURE), None)
            if azure is not None:
                template, style = azure.template, Style.AZURE
        path = "/" + template.replace("{deployment}", quote(deployment, safe=""))
        for name, value in ctx.path_params.items():
            if name != "deployment":
                path = path.replace("{" + name + "}", quote(value, safe=""))
        query = ctx.http.scope.get("query_string", b"").decode("utf-8", "replace")  # as sent; cheaper than building .url
        if style is Style.AZURE and "api-version=" not in query:
            extra = "api-version=" + quote(ctx.api_version or self._settings.azure_openai_api_version)
            query = f"{query}&{extra}" if query else extra
        return f"{backend.endpoint}{path}?{query}" if query else f"{backend.endpoint}{path}"

    def _body_for(self, ctx: RequestContext, backend: Backend) -> bytes | None:
        if ctx.route.operation.body == "none":
            return None
        if ctx.route.operation.body == "multipart":
            return ctx.raw_body  # as it came (files and fields are never re-encoded), or as a stage rewrote it
        if not ctx.route.deployment_in_path and backend.deployment and backend.deployment != ctx.deployment:
            return orjson.dumps({**ctx.body, "model": backend.deployment})  # v1 routes name it in the body
        return orjson.dumps(ctx.body) if ctx.body_modified else ctx.raw_body

    # The retry loop -----------------------------------------------------------------------------
    async def send(self, ctx: RequestContext, may_wait: bool = True) -> UpstreamResult:
        """Call the upstream, retrying within the policy's budget. `may_wait=False` (async jobs)
        still fails over to another backend at once but never sleeps: the caller waits on a
        durable timer instead, for the Retry-After that the give-up error carries."""
        policy = ctx.policy.retry
        backends = await self._pool.backends(ctx.deployment or "")  # "" : calls about no deployment (files)
        if ctx.upstream.pinned_backend is not None:
            # An object lives in one resource: calls about it go to the backend that holds it (all of
            # the deployment's, should the catalogue no longer list that one).
            backends = [b for b in backends if b.name == ctx.upstream.pinned_backend] or backends
        started = time.monotonic()
        attempts = ctx.upstream.attempts
        tried: set[str] = set()  # backends tried since the last wait

        def give_up_after(failure: _Retryable, attempt_number: int) -> bool:
            if not may_wait and failure.planned_wait > 0:
                return True
            elapsed = time.monotonic() - started
            return attempt_number >= policy.max_attempts or elapsed + failure.planned_wait > policy.time_budget_seconds

        def pick(attempt_number: int) -> Backend:
            backend = self._pool.choose(backends, tried) or self._pool.choose(backends, set())
            if backend is None and attempt_number == 1:
                backend = self._pool.least_cooling(backends)
            if backend is None:
                if not self._pool.any_cooling(backends):
                    # Every backend's circuit is open after failures: an outage, answered at once
                    # (502 with Retry-After) instead of spending the request's time budget on it.
                    raise _Retryable("unavailable", backends[0], math.inf, retry_after=self._pool.soonest_available(backends))
                # Cooling down after 429s is throttling: wait for the first to be free again.
                raise _Retryable("throttled", backends[0], self._planned_wait(backends, tried, policy, attempt_number),
                                 retry_after=self._pool.soonest_available(backends))
            tried.add(backend.name)
            return backend

        try:
            # The first attempt runs outside tenacity: most requests need no retry, and setting up
            # the retry loop costs more than the rest of their upstream handling.
            try:
                return await self._attempt(ctx, pick(1), backends, tried, policy, 1, attempts)
            except _Retryable as failure:
                if give_up_after(failure, 1):
                    raise
                if failure.planned_wait > 0:
                    tried.clear()  # after a wait every backend may be tried again
                    await asyncio.sleep(failure.planned_wait)

            def stop(state: RetryCallState) -> bool:
                return give_up_after(state.outcome.exception(), state.attempt_number + 1)

            def wait(state: RetryCallState) -> float:
                planned = state.outcome.exception().planned_wait
                if planned > 0:
                    tried.clear()
                return planned

            retrying = AsyncRetrying(stop=stop, wait=wait, retry=retry_if_exception_type(_Retryable), reraise=True)
            async for attempt in retrying:  # attempts 2, 3, …
                with attempt:
                    number = attempt.retry_state.attempt_number + 1
                    return await self._attempt(ctx, pick(number), backends, tried, policy, number, attempts)
        except _Retryable as failure:
            raise self._give_up(ctx, failure, backends) from None
        finally:
            ctx.upstream.retries = max(0, len(attempts) - 1)
        raise AssertionError("unreachable")  # pragma: no cover

    def _planned_wait(self, backends: list[Backend], tried: set[str], policy, attempt_number: int) -> float:
        if self._pool.choose_available([b for b in backends if b.name not in tried]):
            return 0.0  # another backend can take it now
        backoff = min(policy.max_delay_seconds, policy.base_delay_ms / 1000 * 2 ** (attempt_number - 1))
        backoff *= random.uniform(0.5, 1.0)  # jitter, so that instances do not retry in step
        return min(policy.max_delay_seconds, max(backoff, self._pool.soonest_available(backends)))

    async def _attempt(self, ctx, backend: Backend, backends, tried, policy, attempt_number: int, attempts: list) -> UpstreamResult:
        circuit = self._pool.circuit
        operation = ctx.route.operation
        headers = {
            "Content-Type": (ctx.multipart_type or ctx.http.headers.get("content-type", "")) if operation.body == "multipart" else "application/json",
            "Accept": "text/event-stream" if ctx.stream else "*/*" if ctx.route.operation.binary_answer else "application/json",
            "x-ms-client-request-id": ctx.request_id,
            **(await backend.auth.headers()),
        }
        url = ctx.upstream.url = self.url_for(ctx, backend)
        ctx.upstream.backend = backend.name
        ctx.upstream.started = time.perf_counter()
        began = time.monotonic()
        try:
            body = self._body_for(ctx, backend)
            if body is None:
                del headers["Content-Type"]
            response = await self._session_for_loop().request(ctx.http.method, url, data=body, headers=headers)
        except (asyncio.TimeoutError, aiohttp.ClientError) as exc:
            kind = "timeout" if isinstance(exc, asyncio.TimeoutError) else "unreachable"
            attempts.append({"backend": backend.name, "error": kind, "ms": round((time.monotonic() - began) * 1000, 1)})
            circuit.on_failure(backend)
            raise _Retryable(kind, backend, self._planned_wait(backends, tried, policy, attempt_number)) from None
        ctx.upstream.headers_at = time.perf_counter()
        attempts.append({"backend": backend.name, "status": response.status, "ms": round((time.monotonic() - began) * 1000, 1)})
        if response.status in RETRYABLE_STATUS:
            result = await self._read_whole(ctx, response)
            hint = retry_after_seconds(response.headers)
            if response.status == 429:
                circuit.on_throttled(backend, hint if hint is not None else policy.base_delay_ms / 1000)
                raise _Retryable("throttled", backend, self._planned_wait(backends, tried, policy, attempt_number), result, hint)
            if response.status == 500 and result.upstream_sent_nothing:
                # An empty 500 is how some servers answer a path they do not serve (a v1 route on
                # an older resource): it says nothing of the backend's health, and asking again
                # gets the same. Neither counted against the circuit nor retried.
                return result
            circuit.on_failure(backend)
            raise _Retryable("server_error", backend, self._planned_wait(backends, tried, policy, attempt_number), result)
        circuit.on_success(backend)
        return await self._result(ctx, response)

    def _give_up(self, ctx: RequestContext, failure: _Retryable, backends: list[Backend]) -> GatewayError:
        tries = len(ctx.upstream.attempts)
        if failure.kind == "throttled":
            wait = max(failure.retry_after or 0.0, self._pool.soonest_available(backends), 1.0)
            seconds = math.ceil(wait)
            return GatewayError(
                429, "upstream_rate_limited",
                f"Azure OpenAI is rate limiting this deployment; {tries} attempt(s) within the retry budget did not get through. Retry after {seconds} seconds.",
                error_type="rate_limit_error",
                headers={"Retry-After": str(seconds), "retry-after-ms": str(int(wait * 1000)), **NO_SDK_RETRY},
            )
        if failure.kind == "unavailable":
            seconds = max(1, math.ceil(self._pool.soonest_available(backends)))
            return GatewayError(502, "upstream_error",
                                f"Every backend of this deployment failed repeatedly and is paused (circuit open); the next try is in {seconds} seconds.",
                                headers={"Retry-After": str(seconds), **NO_SDK_RETRY})
        if failure.kind == "timeout":
            return GatewayError(504, "upstream_timeout", f"Azure OpenAI did not answer in time ({tries} attempt(s)).", headers=NO_SDK_RETRY)
        if failure.kind == "unreachable":
            return GatewayError(502, "upstream_error", f"Azure OpenAI could not be reached ({tries} attempt(s)).", headers=NO_SDK_RETRY)
        status = failure.result.status if failure.result else 502
        detail = ""
        if failure.result is not None and isinstance(failure.result.json, dict) and isinstance(failure.result.json.get("error"), dict):
            detail = f": {failure.result.json['error'].get('message')}"
        return GatewayError(502, "upstream_error", f"Azure OpenAI answered {status} ({tries} attempt(s)){detail}", headers=NO_SDK_RETRY)

    # Responses ------------------------------------------------------------------------------------
    async def _read_whole(self, ctx: RequestContext, response: aiohttp.ClientResponse, prefix: bytes = b"") -> UpstreamResult:
        content_type = response.headers.get("Content-Type", "application/json")
        headers_out = _answer_headers(ctx, response, content_type)
        try:
            raw = prefix + await response.read()
        except asyncio.TimeoutError:
            response.close()
            raise errors.upstream_timeout("The upstream stopped answering before the response was complete.") from None
        except aiohttp.ClientError as exc:
            response.close()
            raise errors.upstream_error(f"The upstream connection failed while reading ({type(exc).__name__}).") from None
        finally:
            response.release()
        parsed = None
        if raw and "json" in content_type:
            try:
                parsed = orjson.loads(raw)
            except orjson.JSONDecodeError:
                parsed = None
        sent_nothing = response.status >= 400 and not raw.strip()
        if response.status >= 400 and not (isinstance(parsed, dict) and isinstance(parsed.get("error"), dict)):
            # Not Azure's error shape (a proxy's or web server's own page): say it in the OpenAI shape.
            text = raw[:300].decode("utf-8", "replace").strip() or "no body"
            parsed = {"error": {"message": f"Azure OpenAI answered {response.status}: {text}",
                                "type": "server_error" if response.status >= 500 else "invalid_request_error",
                                "code": "upstream_error", "param": None}}
            raw = orjson.dumps(parsed)
            headers_out["content-type"] = "application/json"
        return UpstreamResult(status=response.status, headers=headers_out, body=raw, json=parsed, upstream_sent_nothing=sent_nothing)

    async def _result(self, ctx: RequestContext, response: aiohttp.ClientResponse) -> UpstreamResult:
        """A stream when the client asked for one and the answer is one — by its content type, or,
        when the upstream sends none or another (some Azure-compatible servers do), by its first
        bytes; else the whole answer."""
        content_type = response.headers.get("Content-Type", "")
        if ctx.route.operation.binary_answer and response.status == 200 and "json" not in content_type:
            # Audio (speech): relayed as it arrives, never held whole.
            headers_out = _answer_headers(ctx, response, content_type or "application/octet-stream")
            return UpstreamResult(status=200, headers=headers_out, events=self._relay_bytes(ctx, response))
        if not (ctx.stream and response.status == 200):
            return await self._read_whole(ctx, response)
        first = b""
        if not content_type.startswith("text/event-stream"):
            try:
                first = await response.content.readany()
            except (asyncio.TimeoutError, aiohttp.ClientError):
                response.close()
                raise errors.upstream_error("The upstream connection broke before its answer began.") from None
            if not sse.looks_like_events(first):
                return await self._read_whole(ctx, response, prefix=first)
            content_type = "text/event-stream; charset=utf-8"
        headers_out = _answer_headers(ctx, response, content_type)
        ctx.stream_summary = StreamSummary()
        return UpstreamResult(status=200, headers=headers_out, events=self._relay(ctx, response, first))

    async def _relay(self, ctx: RequestContext, response: aiohttp.ClientResponse, first: bytes = b"") -> AsyncIterator[sse.Event]:
        """Yield the upstream's SSE events as they arrive, each decoded once, reading usage and
        text on the way.

        Strips the usage-only chunk when the gateway (not the client) asked for it. What some
        Azure-compatible servers send differently is put in Azure's shape on the way: a
        `finish_reason` inside `delta` moves to the choice, a bare `[DONE]` line becomes
        `data: [DONE]`. If the upstream breaks mid-stream, the client gets one error event and
        the stream ends cleanly."""
        summary = ctx.stream_summary
        strip_usage = ctx.gateway_asked_usage  # only the chunk the gateway asked for; anything else is the client's
        completed = False
        try:
            async for raw in sse.split_events(_chunks(first, response)):
                data = sse.event_data(raw)
                payload = None
                if data is None:
                    if raw.strip() == sse.DONE:
                        yield sse.Event(b"data: [DONE]\n\n", None)
                        continue
                elif data != sse.DONE:
                    try:
                        payload = orjson.loads(data)
                    except orjson.JSONDecodeError:
                        payload = None
                    if isinstance(payload, dict):
                        moved = sse.finish_reason_out_of_delta(payload)
                        sse.absorb(summary, payload)
                        if strip_usage and sse.is_usage_only_chunk(payload):
                            continue
                        if moved:
                            yield sse.Event.of(payload)
                            continue
                    else:
                        payload = None
                name = payload.get("type") if payload is not None and raw.startswith(b"event:") else None
                yield sse.Event(raw, payload, name)
            completed = True
        except (asyncio.TimeoutError, aiohttp.ClientError) as exc:
            timeout = isinstance(exc, asyncio.TimeoutError)
            code = "upstream_timeout" if timeout else "upstream_error"
            message = "The upstream stopped sending mid-stream." if timeout else "The upstream connection broke mid-stream."
            summary.error = {"code": code, "message": message}
            ctx.status = 504 if timeout else 502
            yield sse.Event.of({"error": {"message": message, "type": "server_error", "code": code, "param": None}})
        finally:
            # A stream left early (client gone, error) closes its connection instead of
            # returning a half-read one to the pool.
            response.release() if completed else response.close()

    async def _relay_bytes(self, ctx: RequestContext, response: aiohttp.ClientResponse) -> AsyncIterator[sse.Event]:
        """A binary answer's chunks as they arrive (each one an event with no payload)."""
        completed = False
        try:
            async for chunk in response.content.iter_any():
                ctx.upstream.answer_bytes += len(chunk)
                yield sse.Event(chunk, None)
            completed = True
        except (asyncio.TimeoutError, aiohttp.ClientError):
            ctx.status = 502  # the audio is cut: the client sees a short body, the log says why
            ctx.error = errors.upstream_error("The upstream connection broke while sending audio.")
        finally:
            response.release() if completed else response.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        await self._pool.close()


async def _chunks(first: bytes, response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The body's chunks as they arrive, after the first one already read to tell what it is."""
    if first:
        yield first
    async for chunk in response.content.iter_any():
        yield chunk
