"""A correction to how the Python worker runtime serves HTTP streaming, applied when
`function_app` is imported (the worker imports it before it serves any call).

With HTTP streaming, the Functions host sends each HTTP call twice: as an invocation message,
and as the HTTP request itself, forwarded to a web server the runtime runs in the worker (see
shared/http_streaming.py). The runtime pairs the two by invocation id. Found by running the app
under the runtime (`azure-functions-runtime` 1.3.0, pinned in requirements.txt):

**Every HTTP call leaves its pairing record behind.** The runtime's coordinator keeps one record
per invocation id and never removes it: memory grows with every request for the life of the
instance (measured: about 1.9 KB a call, so 1.9 GB per million calls on an instance). Once the
web server has taken the function's response, nothing reads the record again, so it is dropped
there.

(A second fault, found the same way, was in Microsoft's FastAPI web extension: its catch-all
route `/{path:path}` does not match a path with an encoded line break, so FastAPI answered 404
itself and the invocation the host had started waited for the request until the function timeout.
The app's own web extension has no route pattern: every path reaches the function.)

`tests/test_worker_runtime.py` shows the fault with the correction off and its absence with it
on; a runtime release that changes these internals fails there before it ships.
"""
from __future__ import annotations


def correct_http_streaming() -> None:
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
