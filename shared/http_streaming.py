"""Sekisho's HTTP streaming extension for the Python worker: the web app the runtime serves in
the worker, with no web framework between the Functions host and the gateway's handlers.

With HTTP streaming, the Functions host forwards each HTTP call to a web server that the worker
runtime (`azure-functions-runtime`) starts in the worker process, and sends the invocation
message beside it; the runtime pairs the two by invocation id and runs the function. Which web
server and app it starts is up to the one web extension the app imports: the runtime asks
`azurefunctions-extensions-base` for the module that defined the `WebApp` and `WebServer`
classes, gives that app one catch-all route, and takes the request type functions are annotated
with from the class registered through `RequestTrackerMeta`. Microsoft's extension for this,
`azurefunctions-extensions-http-fastapi`, serves a FastAPI app; this module is the same
extension point with a plain ASGI app, because every HTTP function here is a thin hand-over to
the gateway, which needs no routing, dependency injection or middleware from a framework:

- **Per call, less work in the worker.** Under FastAPI, each call went through FastAPI's and
  Starlette's middleware stack, a route match on `/{path:path}` and dependency solving before
  the runtime's catch-all ran. In the full pipeline's profile (`bench/profile_gateway.py`), the
  web server's share of the worker's CPU, sending answers aside, fell from 14.5 % to 4.6 %.
- **No path is refused before the function runs.** FastAPI's `/{path:path}` does not match a
  path with an encoded line break, so such a request got FastAPI's own 404 and the invocation
  the host had started waited for it until the function timeout. Here every path reaches the
  catch-all, and so the gateway.
- **A start without FastAPI.** The worker no longer imports it.

Functions take and return Starlette's types (`Request`, `Response`, `StreamingResponse`, as
FastAPI re-exported them). uvicorn serves the app with the extension's own defaults (httptools,
proxy headers from the host on loopback), without per-request access log lines: the gateway
writes its own request log, and in Azure each access line would be one more log message sent to
the host.
"""
from __future__ import annotations

import logging
from typing import Awaitable, Callable

import uvicorn
from azurefunctions.extensions.base import (
    RequestSynchronizer,
    RequestTrackerMeta,
    ResponseLabels,
    ResponseTrackerMeta,
    WebApp as _WebAppBase,
    WebServer as _WebServerBase,
)
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from .errors import error_body

logger = logging.getLogger("sekisho.http_streaming")

__all__ = ["Request", "Response", "StreamingResponse", "WebApp", "WebServer"]


class _RouteParameters(RequestSynchronizer):
    """Copies the route parameters of the invocation message (the host matched the route
    template) into the request the function receives."""

    def sync_route_params(self, request, path_params) -> None:
        if request is None or path_params is None:
            raise TypeError("a request and its route parameters are needed")
        request.scope["path_params"] = dict(path_params)


# What the runtime checks functions' annotations against: they take a Request and return a
# Response (a StreamingResponse is one).
class _TakesRequest(metaclass=RequestTrackerMeta):
    request_type = Request
    synchronizer = _RouteParameters()


class _ReturnsResponse(metaclass=ResponseTrackerMeta):
    label = ResponseLabels.STANDARD
    response_type = Response


class _ReturnsStream(metaclass=ResponseTrackerMeta):
    label = ResponseLabels.STREAMING
    response_type = StreamingResponse


def _server_error() -> Response:
    body = error_body("The function failed to handle the request.", "server_error", "server_error")
    return Response(body, status_code=500, media_type="application/json")


class WebApp(_WebAppBase):
    """An ASGI app that hands every HTTP request to the runtime's catch-all and sends what it
    returns (the function's response)."""

    def __init__(self) -> None:
        self._catch_all: Callable[[Request], Awaitable[object]] | None = None

    def route(self, func):
        self._catch_all = func
        return func

    def get_app(self):
        return self

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http" or self._catch_all is None:
            return
        try:
            response = await self._catch_all(Request(scope, receive))
        except Exception:
            # The function raised (the runtime hands its exception over as the response), or the
            # request came without an invocation id: the caller gets a 500, the log the cause.
            logger.exception("HTTP function failed: %s %s", scope.get("method"), scope.get("path"))
            response = _server_error()
        if not isinstance(response, Response):
            logger.error("HTTP function returned %s, not a Response", type(response).__name__)
            response = _server_error()
        await response(scope, receive, send)


async def _lifespan(receive, send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


class WebServer(_WebServerBase):
    async def serve(self):
        config = uvicorn.Config(self.web_app, host=self.hostname, port=self.port, interface="asgi3", access_log=False,
                                server_header=False)
        return await uvicorn.Server(config).serve()
