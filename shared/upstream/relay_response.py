"""The streamed answer: Starlette's StreamingResponse, watching for the client leaving with one
plain asyncio task instead of an anyio task group.

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

from starlette.responses import StreamingResponse


class RelayResponse(StreamingResponse):
    async def __call__(self, scope, receive, send) -> None:
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
