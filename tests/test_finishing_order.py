"""A request's finishing work (cache entry, log record) runs after its answer has gone out.

In the Python worker the function's return value reaches the web server that sends it only some
event-loop turns later (the runtime hands it over through its invocation coordinator). These
tests run the gateway in process, hand its response over the same way (a few turns later), and
watch the order in which the answer's messages go out and the log stage finishes.
"""
from __future__ import annotations

import asyncio
import gc
import json

import pytest
from starlette.requests import Request

from shared.gateway import Gateway
from shared.records.request_log import LogRequest
from shared.routes import ROUTES_BY_FUNCTION
from shared.store.sqlite import SqliteStore

from .conftest import _gateway_env, _seed

CHAT = ROUTES_BY_FUNCTION["azure_chat_completions"]
HAND_OVER_TURNS = 20  # more loop turns than the runtime takes to hand a return value to its web server


@pytest.fixture
async def in_process(simulator, gateway, issuer, tmp_path):
    """A Gateway in this process (its own SQLite file), trusting the local issuer that the
    session's local host serves; the log stage's finishing noted in `events`."""
    db = str(tmp_path / "order.db")
    await _seed(SqliteStore(db))
    gw = Gateway(env=_gateway_env(simulator, SEKISHO_STORE="sqlite", SEKISHO_SQLITE_PATH=db, SEKISHO_LOG_SPOOL_DIR=str(tmp_path / "spool"),
                                  **issuer.gateway_settings(gateway.url)))
    await gw.start()
    events: list[str] = []
    log_stage = next(stage for stage in gw.stages if isinstance(stage, LogRequest))
    finish = log_stage.finish

    async def noted_finish(ctx):
        events.append("log finished")
        await finish(ctx)

    log_stage.finish = noted_finish
    try:
        yield gw, events
    finally:
        await gw.aclose()


def _request(token: str, body: dict) -> tuple[Request, dict]:
    raw = json.dumps(body).encode()
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/openai/deployments/gpt-4o-mini/chat/completions", "raw_path": b"/openai/deployments/gpt-4o-mini/chat/completions",
        "query_string": b"api-version=2024-10-21", "root_path": "", "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 5000),
        "headers": [(b"authorization", f"Bearer {token}".encode()), (b"content-type", b"application/json"),
                    (b"content-length", str(len(raw)).encode())],
        "path_params": {"deployment": "gpt-4o-mini"},
    }
    messages = [{"type": "http.request", "body": raw, "more_body": False}]

    async def receive():
        if messages:
            return messages.pop(0)
        await asyncio.Event().wait()  # the client stays until the answer is over

    return Request(scope, receive), scope


def _sender(events: list[str]):
    async def send(message):
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            events.append("answer sent")
        elif message["type"] == "http.response.start":
            events.append(f"status {message['status']}")
    return send


async def _hand_over_later():
    for _ in range(HAND_OVER_TURNS):
        await asyncio.sleep(0)


async def _finished(gw: Gateway) -> None:
    while gw._finishing:
        await asyncio.gather(*gw._finishing)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_the_log_record_is_made_after_the_answer_goes_out(in_process, token, stream):
    gw, events = in_process
    request, scope = _request(token, {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 5, "stream": stream})
    response = await gw.handle(request, CHAT)
    await _hand_over_later()
    assert events == [], "the request finished before its answer was handed to the web server"
    await response(scope, request.receive, _sender(events))
    await _finished(gw)
    assert events == ["status 200", "answer sent", "log finished"]


async def test_an_answer_never_sent_is_still_finished(in_process, token):
    gw, events = in_process
    request, _ = _request(token, {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 5})
    await gw.handle(request, CHAT)  # the web server never sends it (it gave up on the invocation)
    await _hand_over_later()
    assert events == []
    await asyncio.wait_for(_finished(gw), 5)
    assert events == ["log finished"]


async def test_requests_in_flight_do_not_set_off_young_collections(in_process, token):
    """64 requests in flight at once, as under load: their objects are alive, so a collection
    would only scan them; the gateway's threshold keeps it from coming."""
    gw, _ = in_process
    young: list[dict] = []

    def noted(phase, info):
        if phase == "start" and info["generation"] == 0:
            young.append(info)

    requests = [_request(token, {"messages": [{"role": "user", "content": f"Say hello {i}."}], "max_tokens": 5}) for i in range(64)]
    gc.collect()
    gc.callbacks.append(noted)
    try:
        responses = await asyncio.gather(*(gw.handle(request, CHAT) for request, _ in requests))
        for (request, scope), response in zip(requests, responses):
            await response(scope, request.receive, _sender([]))
        await _finished(gw)
    finally:
        gc.callbacks.remove(noted)
    assert all(response.status_code == 200 for response in responses)
    assert young == []


def test_each_hook_runs_the_stages_acting_in_it_in_pipeline_order():
    """The gateway skips the no-op hooks a stage keeps from Stage; every hook a stage overrides
    runs, `after` in reverse order."""
    from shared.pipeline import Hooks, Stage

    class Refuses(Stage):
        async def before(self, ctx):
            pass

    class Wraps(Stage):
        def after(self, ctx, result):
            return result

    class Settles(Refuses):  # acts in before (inherited) and finish
        async def finish(self, ctx):
            pass

    class Idle(Stage):
        pass

    refuses, wraps, settles, idle, wraps_too = Refuses(), Wraps(), Settles(), Idle(), Wraps()
    hooks = Hooks.of([refuses, wraps, settles, idle, wraps_too])
    assert hooks.before == (refuses, settles)
    assert hooks.after == (wraps_too, wraps)
    assert hooks.finish == (settles,)
