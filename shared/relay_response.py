"""The streamed answer: Starlette's StreamingResponse, watching for the client leaving with two
plain asyncio tasks instead of an anyio task group.

On servers that speak ASGI 2.3 (uvicorn does), Starlette streams in one task and listens for
`http.disconnect` in another, inside an anyio task group; setting that group up costs ~60 µs per
stream, before the first byte (measured on the bench machine; two asyncio tasks: ~25 µs). The
behaviour is the same: the first of the two to end cancels the other, and a client that leaves
cancels the relay, which closes the upstream call (gateway._stream). Servers on ASGI 2.4 and hosts
that read `body_iterator` themselves get Starlette's own code.
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
        stream = asyncio.ensure_future(self.stream_response(send))
        watch = asyncio.ensure_future(self.listen_for_disconnect(receive))
        try:
            await asyncio.wait((stream, watch), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stream.cancel()
            watch.cancel()
            # The relay's own clean-up (closing the upstream call, the log record) finishes here.
            await asyncio.gather(stream, watch, return_exceptions=True)
        if not stream.cancelled() and stream.exception() is not None:
            raise stream.exception()
