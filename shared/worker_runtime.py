"""Two corrections to how the Python worker runtime serves HTTP streaming, applied when
`function_app` is imported (the worker imports it before it builds its web server).

With HTTP streaming, the Functions host sends each HTTP call twice: as an invocation message,
and as the HTTP request itself, forwarded to a web server the runtime runs in the worker (a
FastAPI app with one catch-all route). The runtime pairs the two by invocation id. Found by
running the app under the runtime (`azure-functions-runtime` 1.3.0, pinned in requirements.txt):

1. **A path with an encoded line break never reaches the function.** The catch-all route is
   `/{path:path}`, whose pattern (`.*`) stops at a line break, so FastAPI answers
   `404 {"detail": "Not Found"}` itself, and the invocation the host started waits for an HTTP
   request that never comes, until the function timeout (30 minutes here): anyone could tie up
   the app's invocations with `GET /sekisho/jobs/%0A`. Starlette's `path` convertor is replaced,
   before the runtime compiles its route, by one that matches any character, so such a request
   reaches the gateway, which answers it like any other.
2. **Every HTTP call leaves its pairing record behind.** The runtime's coordinator keeps one
   record per invocation id and never removes it: memory grows with every request for the life
   of the instance (measured: about 1.9 KB a call, so 1.9 GB per million calls on an instance). Once the web server
   has taken the function's response, nothing reads the record again, so it is dropped there.

`tests/test_worker_runtime.py` shows both faults with the corrections off and their absence
with them on; a runtime release that changes these internals fails there before it ships.
"""
from __future__ import annotations

import logging

logger = logging.getLogger("sekisho.worker_runtime")


class _AnyPath:
    """Starlette's `path` convertor, matching line breaks too."""

    regex = "(?s:.*)"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


def correct_http_streaming() -> None:
    from starlette.convertors import register_url_convertor

    register_url_convertor("path", _AnyPath())
    try:
        from azure_functions_runtime.http_v2 import HttpCoordinator
    except ImportError:  # before Python 3.13 the worker's own copy of this code runs; not corrected
        return
    pop = HttpCoordinator._pop_http_response
    if getattr(pop, "forgets_invocation", False):
        return

    def pop_and_forget(self, invocation_id):
        try:
            return pop(self, invocation_id)
        finally:
            self._context_references.pop(invocation_id, None)

    pop_and_forget.forgets_invocation = True
    HttpCoordinator._pop_http_response = pop_and_forget
