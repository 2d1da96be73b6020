"""RelayResponse: Starlette's StreamingResponse semantics with plain asyncio tasks (ASGI 2.3)."""
from __future__ import annotations

import asyncio

import pytest

from shared.upstream.relay_response import RelayResponse

SCOPE = {"type": "http", "asgi": {"spec_version": "2.3"}}


async def _never_ending(log: list):
    try:
        while True:
            yield b"data: {}\n\n"
            await asyncio.sleep(0.01)
    finally:
        log.append("relay closed")


async def test_a_client_that_leaves_cancels_the_relay_and_its_clean_up_finishes_first():
    log, sent = [], []

    async def send(message):
        sent.append(message["type"])

    async def receive():
        await asyncio.sleep(0.05)
        return {"type": "http.disconnect"}

    await asyncio.wait_for(RelayResponse(_never_ending(log))(SCOPE, receive, send), 2)
    assert log == ["relay closed"] and sent[0] == "http.response.start" and len(sent) > 2


async def test_a_whole_stream_is_sent_and_the_listener_stops():
    sent = []

    async def chunks():
        for i in range(3):
            yield f"data: {i}\n\n".encode()

    async def send(message):
        sent.append(message.get("body", b""))

    async def receive():
        await asyncio.Event().wait()  # the client stays

    await asyncio.wait_for(RelayResponse(chunks())(SCOPE, receive, send), 2)
    assert b"".join(sent) == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"


async def test_a_failing_send_is_raised():
    async def send(message):
        raise OSError("socket gone")

    async def receive():
        await asyncio.Event().wait()

    with pytest.raises(OSError):
        await RelayResponse(_never_ending([]))(SCOPE, receive, send)


async def test_a_cancellation_from_outside_still_cancels():
    """A host timeout or shutdown cancels the request's task: that is not a client leaving."""
    log = []

    async def send(message):
        pass

    async def receive():
        await asyncio.Event().wait()

    task = asyncio.ensure_future(RelayResponse(_never_ending(log))(SCOPE, receive, send))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert log == ["relay closed"]
