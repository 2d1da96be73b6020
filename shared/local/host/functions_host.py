"""The Functions host's part for HTTP, played locally: route each request to a function by its
route template, and invoke the function through the Python worker runtime.

The route table is built from the function metadata the worker sends (the `httpTrigger`
binding's route and methods), as the host builds it. Matching follows the host's precedence:
literal segments beat parameters, and catch-all (`{*x}`) routes come last. A matched request
is invoked the way the host invokes a worker that streams HTTP: an `InvocationRequest` with the
route parameters, and the request itself forwarded to the runtime's web server with the
invocation id; the response streams back from there. Forwarding gives the worker's server the
request's path, query, headers and body, and not the client's `Host` (the host's forwarder,
YARP's default transform, sends the destination's host as far as its source shows): what the app
sees as its own address is the worker's loopback one.
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import sys
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Awaitable, Callable
from urllib.parse import parse_qsl

import aiohttp
import azure.functions as func
from starlette.responses import Response

from ...errors import error_body
from ...routes import compile_template
from ...upstream.relay_response import RelayResponse
from .durable_runtime import DURABLE_API
from .language_worker import INVOCATION_ID_HEADER, FunctionEntry, LanguageWorker, WorkerError

logger = logging.getLogger("sekisho.localhost")
_ADMIN_FUNCTIONS = "/admin/functions/"  # the Functions host's own API (no function may use an admin route)
LOCAL_QUEUES = "/admin/queues/"  # the local host's stand-in for Storage queues: POST {queue}/messages
_HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"te", b"trailer", b"upgrade",
                         b"proxy-connection", b"host"})
_NOT_PASSED_BACK = _HOP_BY_HOP | {b"date", b"server"}  # the host's own server sets these
_WHOLE_BODY_BYTES = 1 << 20  # a worker answer of known length up to this goes back to the client in one piece


@dataclass(frozen=True)
class HttpFunction:
    entry: FunctionEntry
    route: str
    methods: frozenset[str]
    trigger_name: str
    pattern: re.Pattern[str]

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def precedence(self) -> tuple[int, int, int]:
        segments = self.route.strip("/").split("/")
        catch_all = any(s.startswith("{*") for s in segments)
        parameters = sum(1 for s in segments if s.startswith("{"))
        return (1 if catch_all else 0, parameters, -len(segments))


def registered_functions(app: func.FunctionApp) -> list:
    """The app's functions as the Python worker indexes them at start-up: through the worker
    runtime's own loader (`azure-functions-runtime`, the library Azure loads from the app's
    requirements on Python 3.13+), which imports the app's module and calls `get_functions()`.
    For tests and tools that look at the app without running a worker.

    A second `get_functions()` reports every function as a duplicate name (it validates against
    state kept on the app), so the result is kept on the app."""
    functions = getattr(app, "_sekisho_indexed_functions", None)
    if functions is None:
        module = next((m for m in list(sys.modules.values()) if getattr(m, "__dict__", {}).get("app") is app and getattr(m, "__file__", None)), None)
        try:
            from azure_functions_runtime.loader import index_function_app
        except ImportError:  # before Python 3.13 the worker brings its own loader (the bench compares 3.11)
            index_function_app = None
        if module is not None and index_function_app is not None:
            functions = index_function_app(module.__file__)
        else:  # an app object made outside a module (tests build small ones)
            functions = app.get_functions()
        app._sekisho_indexed_functions = functions
    return functions


def route_prefix(app_directory: str | Path) -> str:
    """host.json's `extensions.http.routePrefix` (the host's default: `api`)."""
    try:
        config = json.loads((Path(app_directory) / "host.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "api"
    prefix = config.get("extensions", {}).get("http", {}).get("routePrefix", "api")
    return str(prefix).strip("/")


def route_table(entries: list[FunctionEntry], prefix: str = "") -> list[HttpFunction]:
    """The HTTP-triggered functions, in matching order; each route under `prefix`."""
    found = []
    for entry in entries:
        trigger = entry.trigger
        if trigger.get("type") != "httpTrigger":
            continue
        route = "/".join(part for part in (prefix, (trigger.get("route") or entry.name).strip("/")) if part)
        methods = frozenset(str(m).upper() for m in (trigger.get("methods") or ("GET", "POST")))
        found.append(HttpFunction(entry, route, methods, trigger["name"], compile_template(route)))
    return sorted(found, key=lambda f: f.precedence)


class RouteMatcher:
    def __init__(self, functions: list[HttpFunction]) -> None:
        self.functions = functions
        self._matched: dict[tuple[str, str], tuple[HttpFunction | None, dict[str, str]]] = {}

    def match(self, method: str, path: str) -> tuple[HttpFunction | None, dict[str, str]]:
        known = self._matched.get((method, path))
        if known is None:
            if len(self._matched) >= 1024:  # paths carry deployment names: keep the memo bounded
                self._matched.clear()
            known = self._matched[(method, path)] = self._match(method, path.strip("/"))
        return known[0], dict(known[1])

    def _match(self, method: str, path: str) -> tuple[HttpFunction | None, dict[str, str]]:
        for function in self.functions:
            found = function.pattern.fullmatch(path)
            if found is not None and method in function.methods:
                return function, found.groupdict()  # the server decoded the path once already
        return None, {}


class FunctionsAsgiApp:
    """The local host's HTTP front: starts the worker when the server starts, then routes each
    request to the first registered function whose route and method match."""

    def __init__(self, worker: LanguageWorker) -> None:
        self.worker = worker
        self.routes = RouteMatcher([])
        self._on_startup: list[Callable[[list[FunctionEntry]], Awaitable[None] | None]] = []
        self._on_shutdown: list[Callable[[], Awaitable[None]]] = []
        self.timers = None  # timers.LocalTimers, set by a startup hook: the app's timer-triggered functions
        self.durable = None  # durable_runtime.LocalDurableRuntime, set by a startup hook: the extension's HTTP API
        self._session: aiohttp.ClientSession | None = None
        self._deliveries: set[asyncio.Task] = set()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        if scope["path"].startswith(_ADMIN_FUNCTIONS):
            await self._admin_run(scope, receive, send)
            return
        if scope["path"].startswith(LOCAL_QUEUES):
            await self._queue_put(scope, receive, send)
            return
        if scope["path"].startswith(DURABLE_API):
            await self._durable_api(scope, receive, send)
            return
        function, params = self.routes.match(scope["method"], scope["path"])
        if function is None:
            body = error_body(f"No route for {scope['method']} {scope['path']}.", "not_found", "invalid_request_error")
            await Response(body, status_code=404, media_type="application/json")(scope, receive, send)
            return
        await self._invoke_http(function, params, scope, receive, send)

    def on_shutdown(self, hook: Callable[[], Awaitable[None]]) -> None:
        """Await `hook()` when the server stops, before the worker process is stopped."""
        self._on_shutdown.append(hook)

    def on_startup(self, hook: Callable[[list[FunctionEntry]], Awaitable[None] | None]) -> None:
        """Run `hook(functions)` once the worker has started and sent its functions' metadata."""
        self._on_startup.append(hook)

    async def _invoke_http(self, function: HttpFunction, params: dict[str, str], scope, receive, send) -> None:
        invocation_id = str(uuid.uuid4())
        query = scope.get("query_string", b"").decode("latin-1")
        target = scope.get("raw_path") or scope["path"].encode()
        path_and_query = target.decode("latin-1") + (f"?{query}" if query else "")
        first_values: dict[str, str] = {}
        headers: list[tuple[str, str]] = []
        for k, v in scope["headers"]:
            name, value = k.decode("latin-1"), v.decode("latin-1")
            first_values.setdefault(name.lower(), value)
            if k.lower() not in _HOP_BY_HOP:
                headers.append((name, value))
        headers.append((INVOCATION_ID_HEADER, invocation_id))
        own = f"{scope.get('scheme', 'http')}://{first_values.get('host', 'localhost')}"  # the URL the client asked for
        http = self.worker.http_input(scope["method"], own + path_and_query, first_values, params, dict(parse_qsl(query)))
        try:
            # The invocation message goes first, then the request itself (as the host does).
            invocation = asyncio.ensure_future(self.worker.send_invocation(function.entry, {function.trigger_name: http}, invocation_id=invocation_id))
        except WorkerError:
            logger.exception("invoking %s failed", function.name)
            body = error_body("The function host could not reach the worker.", "server_error", "server_error")
            await Response(body, status_code=502, media_type="application/json")(scope, receive, send)
            return
        try:
            upstream = await self._session.request(
                scope["method"], self.worker.http_uri + path_and_query, headers=headers,
                data=await _forwarded_body(receive) if _has_body(scope) else None, allow_redirects=False,
            )
        except Exception:
            invocation.cancel()  # it waits for a request that will not come
            logger.exception("forwarding %s %s to the worker failed", scope["method"], scope["path"])
            body = error_body("The function host could not reach the worker.", "server_error", "server_error")
            await Response(body, status_code=502, media_type="application/json")(scope, receive, send)
            return
        try:
            passed_back = [(k.lower(), v) for k, v in upstream.raw_headers if k.lower() not in _NOT_PASSED_BACK]
            if upstream.content_length is not None and upstream.content_length <= _WHOLE_BODY_BYTES:
                # A whole answer of known length goes back in one piece; a stream (or a large
                # body) as it arrives, ended if the client leaves.
                response = Response(await upstream.read(), status_code=upstream.status)
            else:
                response = RelayResponse(upstream.content.iter_any(), status_code=upstream.status)
            response.raw_headers = passed_back
            await response(scope, receive, send)
        finally:
            upstream.release()
            # The function has answered by now (its response is what was streamed), so its
            # invocation ends at once; one the worker's server answered without pairing it never
            # would (the host would wait out the function timeout): it is given up on.
            try:
                await asyncio.wait_for(invocation, timeout=1)
            except TimeoutError:
                logger.warning("invocation %s of %s never received its HTTP request (the worker answered %s itself)",
                               invocation_id, function.name, upstream.status)
            except Exception as exc:  # the worker's server already answered the client (a 500 if the function raised)
                logger.warning("invocation %s of %s: %s", invocation_id, function.name, exc)

    async def _queue_put(self, scope, receive, send) -> None:
        """A message put on a queue (as the app's job launcher does locally): delivered to the
        function its queue triggers, as the queue trigger delivers it — the body decoded from
        base64 (the trigger's default messageEncoding), with the message's metadata, and the
        data of the function's other input bindings the host provides (a durable client's).
        The put is answered at once; delivery follows, as from a real queue."""
        parts = scope["path"][len(LOCAL_QUEUES):].strip("/").split("/")
        if scope["method"] != "POST" or not _from_loopback(scope) or len(parts) != 2 or parts[1] != "messages":
            await Response(status_code=401 if not _from_loopback(scope) else 404)(scope, receive, send)
            return
        queue = parts[0]
        target = next((f for f in self.worker.functions if f.trigger.get("type") == "queueTrigger" and f.trigger.get("queueName") == queue), None)
        body = b"".join([chunk async for chunk in _request_body(receive)])
        try:
            text = base64.b64decode(body, validate=True).decode("utf-8")
        except ValueError:
            await Response(status_code=400)(scope, receive, send)
            return
        if target is None:
            await Response(status_code=404)(scope, receive, send)
            return
        inputs: dict[str, object] = {target.trigger["name"]: text}
        for binding in target.bindings:
            if binding.get("type") == "durableClient" and self.durable is not None:
                inputs[binding["name"]] = self.durable.client_binding
        now = datetime.now(timezone.utc).isoformat()
        metadata = {"Id": str(uuid.uuid4()), "DequeueCount": 1, "InsertionTime": now, "ExpirationTime": now,
                    "NextVisibleTime": now, "PopReceipt": ""}
        task = asyncio.get_running_loop().create_task(self._deliver(target, inputs, metadata))
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)
        await Response(status_code=201)(scope, receive, send)

    async def _deliver(self, target: FunctionEntry, inputs: dict, metadata: dict) -> None:
        try:
            await self.worker.invoke(target, inputs, metadata)
        except Exception:
            logger.exception("queue message for %s failed", target.name)

    async def _durable_api(self, scope, receive, send) -> None:
        """The Durable extension's HTTP API on the host's port (Azure asks for the system key; here
        only a caller on this machine may)."""
        if self.durable is None or not _from_loopback(scope):
            response = Response(status_code=401 if self.durable is not None else 404)
        else:
            body = b"".join([chunk async for chunk in _request_body(receive)])
            response = await self.durable.handle_api(scope["method"], scope["path"][len(DURABLE_API):], body)
        await response(scope, receive, send)

    async def _admin_run(self, scope, receive, send) -> None:
        """`POST /admin/functions/{name}`: the host's admin API runs a non-HTTP function now. Azure
        asks for the master key; here only a caller on this machine may."""
        name = scope["path"][len(_ADMIN_FUNCTIONS):].strip("/")
        if scope["method"] != "POST" or not _from_loopback(scope):
            response = Response(status_code=401)
        elif self.timers is not None and await self.timers.run_now(name):
            response = Response(status_code=202)
        else:
            response = Response(status_code=404)
        await response(scope, receive, send)

    async def _start(self) -> None:
        await self.worker.start()
        self.routes = RouteMatcher(route_table(self.worker.functions, route_prefix(self.worker.app_directory)))
        # The host's forwarder: a pooled client that passes bodies through as they are (no
        # decompression), never follows redirects, and waits as long as a stream lasts. Idle
        # connections are dropped after 2 s, before the worker's uvicorn drops them (5 s): a
        # request sent on a connection the server is closing would fail with nothing to retry.
        self._session = aiohttp.ClientSession(
            auto_decompress=False, timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=2.0),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        )
        for hook in self._on_startup:
            try:
                outcome = hook(self.worker.functions)
                if asyncio.iscoroutine(outcome):
                    await outcome
            except Exception:
                logger.exception("startup hook failed")
        if self.timers is not None:
            self.timers.start()

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self._start()
                except Exception as exc:
                    logger.exception("the worker did not start")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.timers is not None:
                    await self.timers.stop()
                for hook in self._on_shutdown:
                    try:
                        await hook()
                    except Exception:
                        logger.exception("shutdown hook failed")
                await asyncio.gather(*self._deliveries, return_exceptions=True)
                await self.worker.stop()
                if self._session is not None:
                    await self._session.close()
                await send({"type": "lifespan.shutdown.complete"})
                return


def _from_loopback(scope) -> bool:
    return (scope.get("client") or ("",))[0] in ("127.0.0.1", "::1", "localhost")


def _has_body(scope) -> bool:
    return any(k.lower() in (b"content-length", b"transfer-encoding") for k, _ in scope["headers"])


async def _forwarded_body(receive):
    """The request body to forward: the bytes, when they came in one message (then the worker's
    server gets them with their length, in one write), or else passed on as they arrive."""
    message = await receive()
    if message["type"] == "http.disconnect":
        return b""
    first = message.get("body", b"")
    if not message.get("more_body", False):
        return first

    async def rest():
        if first:
            yield first
        async for chunk in _request_body(receive):
            yield chunk

    return rest()


async def _request_body(receive):
    """The request body as it arrives, passed on chunk by chunk."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return
