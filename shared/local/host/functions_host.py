"""An ASGI app made from the HTTP functions registered on an Azure Functions `FunctionApp`.

The route table is read off the FunctionApp object (route template, methods, handler), so the
local host serves exactly what Azure would, with the same handlers. Matching follows the
Functions host's precedence: literal segments beat parameters, and catch-all (`{*x}`) routes
come last.
"""
from __future__ import annotations

import logging
import re
import sys
from dataclasses import dataclass
from typing import Awaitable, Callable

import azure.functions as func
from starlette.requests import Request
from starlette.responses import Response

from ...errors import error_body
from ...routes import compile_template

logger = logging.getLogger("sekisho.localhost")
_ADMIN_FUNCTIONS = "/admin/functions/"  # the Functions host's own API (no function may use an admin route)


@dataclass(frozen=True)
class HttpFunction:
    name: str
    route: str
    methods: frozenset[str]
    handler: Callable[[Request], Awaitable[Response]]
    pattern: re.Pattern[str]

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

    The worker indexes once; a second `get_functions()` reports every function as a duplicate
    name (it validates against state kept on the app), so the result is kept on the app."""
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


def http_functions(app: func.FunctionApp) -> list[HttpFunction]:
    """The HTTP-triggered functions of `app`, in matching order."""
    found = []
    for function in registered_functions(app):
        trigger = function.get_trigger()
        if getattr(trigger, "type", None) != "httpTrigger":
            continue
        route = trigger.route or function.get_function_name()
        methods = frozenset(str(getattr(m, "value", m)).upper() for m in (trigger.methods or ("GET", "POST")))
        found.append(
            HttpFunction(
                name=function.get_function_name(),
                route=route,
                methods=methods,
                handler=function.get_user_function(),
                pattern=compile_template(route),
            )
        )
    return sorted(found, key=lambda f: f.precedence)


class FunctionsAsgiApp:
    """Routes each request to the first registered function whose route and method match."""

    def __init__(self, app: func.FunctionApp, on_shutdown: list[Callable[[], Awaitable[None]]] | None = None, timers=None,
                 on_startup: list[Callable[[], None]] | None = None) -> None:
        self.functions = http_functions(app)
        self._on_startup = list(on_startup or ())  # run in the event loop once the server starts
        self._matched: dict[tuple[str, str], tuple[HttpFunction | None, dict[str, str]]] = {}
        self._on_shutdown = list(on_shutdown or ())
        self.timers = timers  # timers.LocalTimers: the app's timer-triggered functions

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

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        if scope["path"].startswith(_ADMIN_FUNCTIONS):
            await self._admin_run(scope, receive, send)
            return
        function, params = self.match(scope["method"], scope["path"])
        if function is None:
            body = error_body(f"No route for {scope['method']} {scope['path']}.", "not_found", "invalid_request_error")
            response = Response(body, status_code=404, media_type="application/json")
        else:
            scope["path_params"] = params
            try:
                response = await function.handler(Request(scope, receive))
            except Exception:
                logger.exception("function %s raised", function.name)
                body = error_body("The function raised an exception.", "server_error", "server_error")
                response = Response(body, status_code=500, media_type="application/json")
        await response(scope, receive, send)

    async def _admin_run(self, scope, receive, send) -> None:
        """`POST /admin/functions/{name}`: the host's admin API runs a non-HTTP function now. Azure
        asks for the master key; here only a caller on this machine may."""
        name = scope["path"][len(_ADMIN_FUNCTIONS):].strip("/")
        client = (scope.get("client") or ("",))[0]
        if scope["method"] != "POST" or client not in ("127.0.0.1", "::1", "localhost"):
            response = Response(status_code=401)
        elif self.timers is not None and await self.timers.run_now(name):
            response = Response(status_code=202)
        else:
            response = Response(status_code=404)
        await response(scope, receive, send)

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                for hook in self._on_startup:
                    try:
                        hook()
                    except Exception:
                        logger.exception("startup hook failed")
                if self.timers is not None:
                    self.timers.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.timers is not None:
                    await self.timers.stop()
                for hook in self._on_shutdown:
                    try:
                        await hook()
                    except Exception:
                        logger.exception("shutdown hook failed")
                await send({"type": "lifespan.shutdown.complete"})
                return
