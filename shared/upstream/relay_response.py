"""The gateway's answers as they go out: a whole answer (`AnswerResponse`) and a streamed one
(`RelayResponse`), each telling the gateway when it has gone out, so that the request's finishing
work (cache entry, log record) runs after the client has its answer, not before.

Why the signal and not simply a task started when the handler returns: in the Python worker,
the function's return value reaches the web server that sends it only some event-loop turns
later (the runtime hands it over through its invocation coordinator), so a task started at the
handler's return ran first and the client waited for the log record and the cache entry
(traced at c=1: the handler's return to the answer's headers at the host, 0.81 → 0.42 ms). A
stream's finishing work ran inside its body iterator, before the body's closing chunk.

RelayResponse is Starlette's StreamingResponse, watching for the client leaving with one plain
asyncio task instead of an anyio task group.

On servers that speak ASGI 2.3 (uvicorn does), Starlette streams in one task and listens for
`http.disconnect` in another, inside an anyio task group: a 3-event stream costs ~58 µs to serve
that way and ~11 µs this way (`bench/micro.py`), most of it before the first byte. Here the body streams in the
request's own task and one watcher task listens; the behaviour is the same: a client that leaves
cancels the relay, which closes the upstream call (gateway._stream), and the response ends
quietly. Servers on ASGI 2.4 and hosts that read `body_iterator` themselves get Starlette's own
code.
"""
from __future__ import annotations

import asyncio

from starlette.responses import Response, StreamingResponse


def mark_sent(sent: asyncio.Future | None) -> None:
    if sent is not None and not sent.done():
        sent.set_result(None)


class AnswerResponse(Response):
    """A whole answer; `sent` is resolved once it has gone out (or failed to)."""

    def __init__(self, *args, sent: asyncio.Future | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sent = sent

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            mark_sent(self.sent)


class RelayResponse(StreamingResponse):
    """A streamed answer; `sent` is resolved once the body has ended, the client left, or the
    relay was cancelled."""

    def __init__(self, *args, sent: asyncio.Future | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sent = sent

    async def __call__(self, scope, receive, send) -> None:
        try:
            await self._relay(scope, receive, send)
        finally:
            mark_sent(self.sent)

    async def _relay(self, scope, receive, send) -> None:
        spec_version = tuple(map(int, scope.get("asgi", {}).get("spec_version", "2.0").split(".")))
        if scope["type"] != "http" or spec_version >= (2, 4) or self.background is not None:
            await super().__call__(scope, receive, send)
            return
        # The body streams in this task (its first byte goes out without waiting for another
        # task to be scheduled); a watcher task cancels it if the client leaves.
        streaming = asyncio.current_task()
        left = False

        async def watch() -> None:
            nonlocal left
            await self.listen_for_disconnect(receive)
            left = True
            streaming.cancel()

        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            await self.stream_response(send)
        except asyncio.CancelledError:
            # The watcher's cancellation is delivered at the await the stream was waiting on.
            if not left or streaming.uncancel() > 0:
                raise  # cancelled from outside as well (a host timeout, shutdown)
        finally:
            watcher.cancel()
