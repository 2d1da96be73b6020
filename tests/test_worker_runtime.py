"""The local host invokes functions through the Python worker runtime (azure-functions-runtime),
as the Functions host does: routes from the worker's function metadata (with host.json's route
prefix), an InvocationRequest per call, and the HTTP request forwarded to the runtime's own web
server with the invocation id. A small app of its own shows what a function sees."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

import aiohttp
import pytest

from shared.local.host.language_worker import FunctionEntry
from shared.local.host.worker_protocol import protos

from .servers import ROOT, free_port, stop, wait_for_port

APP = '''
import asyncio, json, os
import azure.functions as func
from starlette.responses import JSONResponse
from shared.http_streaming import Request, StreamingResponse

if os.environ.get("TINY_APP_CORRECTED") == "1":
    from shared.worker_runtime import correct_http_streaming

    correct_http_streaming()

app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)
OUT = os.environ["TINY_APP_OUT"]


@app.route(route="pairings", methods=["GET"])
async def pairings(req: Request) -> JSONResponse:
    from azure_functions_runtime.http_v2 import http_coordinator

    return JSONResponse({"records": len(http_coordinator._context_references)})


@app.route(route="items/{item_id}", methods=["GET", "POST"])
async def item(req: Request) -> JSONResponse:
    body = await req.body()
    return JSONResponse({"item": req.path_params["item_id"], "invocation": req.headers.get("x-ms-invocation-id"),
                         "host": req.headers.get("host"), "q": req.query_params.get("q"), "body": len(body),
                         "url": str(req.url), "pid": os.getpid()}, headers={"x-answer": "1"})


@app.route(route="stream", methods=["GET"])
async def stream(req: Request) -> StreamingResponse:
    async def chunks():
        yield b"data: first\\n\\n"
        await asyncio.sleep(0.4)
        yield b"data: second\\n\\n"
    return StreamingResponse(chunks(), media_type="text/event-stream")


@app.route(route="broken", methods=["GET"])
async def broken(req: Request) -> JSONResponse:
    raise RuntimeError("the function failed")


@app.timer_trigger(schedule="0 0 3 * * *", arg_name="timer", run_on_startup=False)
async def nightly(timer: func.TimerRequest) -> None:
    with open(OUT, "a") as f:
        f.write(json.dumps({"past_due": timer.past_due}) + "\\n")
'''


def _start_tiny_host(app_dir: Path, corrected: bool):
    import os
    import subprocess
    import sys

    (app_dir / "function_app.py").write_text(APP)
    (app_dir / "host.json").write_text(json.dumps({"version": "2.0", "extensions": {"http": {"routePrefix": "api"}}}))
    out = app_dir / "timer-runs.jsonl"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SEKISHO_", "AZURE_OPENAI_"))}
    env["TINY_APP_OUT"] = str(out)
    env["TINY_APP_CORRECTED"] = "1" if corrected else "0"
    process = subprocess.Popen(
        [sys.executable, "-m", "shared.local.host", "--app-dir", str(app_dir), "--port", str(port), "--quiet", "--no-seed",
         "--data-dir", str(app_dir / ".data"), "--simulator-port", str(free_port())],
        cwd=ROOT, env=env,
    )
    wait_for_port(port, process)
    return process, f"http://127.0.0.1:{port}", out


@pytest.fixture(scope="module")
def tiny_host(tmp_path_factory):
    process, url, out = _start_tiny_host(tmp_path_factory.mktemp("tiny-app"), corrected=True)
    try:
        yield url, out, process.pid
    finally:
        stop(process)


@pytest.fixture(scope="module")
def uncorrected_host(tmp_path_factory):
    process, url, out = _start_tiny_host(tmp_path_factory.mktemp("tiny-app-uncorrected"), corrected=False)
    try:
        yield url
    finally:
        stop(process)


async def test_a_call_reaches_the_function_through_the_runtimes_web_server(tiny_host):
    url, _, host_pid = tiny_host
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/api/items/42?q=x", data=b"z" * 1_000_000, headers={"Host": "client.example"}) as answer:
            assert answer.status == 200 and answer.headers["x-answer"] == "1"
            seen = await answer.json()
        async def chunked():
            for _ in range(10):
                yield b"y" * 1000
        async with session.post(f"{url}/api/items/7", data=chunked()) as answer:
            chunked_seen = await answer.json()
    uuid.UUID(seen["invocation"])  # the host's invocation id, in the header the runtime pairs on
    assert seen["item"] == "42" and seen["q"] == "x"  # route parameters from the InvocationRequest
    assert seen["body"] == 1_000_000 and chunked_seen["body"] == 10_000
    # The function sees the worker's own address, not what the client put in Host: whatever
    # the app builds from its request URL would be wrong in Azure too (hence SEKISHO_PUBLIC_BASE_URL).
    assert seen["host"].startswith("127.0.0.1:") and "client.example" not in seen["url"]
    assert seen["invocation"] != chunked_seen["invocation"]
    # The app runs in a worker process of its own, as in Azure, never in the host's.
    assert seen["pid"] == chunked_seen["pid"] != host_pid


async def test_routes_come_from_the_metadata_with_host_jsons_prefix(tiny_host):
    url = tiny_host[0]
    async with aiohttp.ClientSession() as session:
        for path, status in (("/items/1", 404), ("/api/items/1", 200), ("/api/items", 404), ("/api/stream", 200)):
            async with session.get(url + path) as answer:
                assert answer.status == status, path
        async with session.delete(f"{url}/api/items/1") as answer:
            assert answer.status == 404  # the method is not the function's


async def test_a_stream_arrives_as_the_function_yields_it(tiny_host):
    url = tiny_host[0]
    async with aiohttp.ClientSession() as session:
        started = time.perf_counter()
        async with session.get(f"{url}/api/stream") as answer:
            assert answer.headers["content-type"].startswith("text/event-stream")
            first = await answer.content.readuntil(b"\n\n")
            first_at = time.perf_counter() - started
            rest = await answer.content.read()
    assert first == b"data: first\n\n" and rest == b"data: second\n\n"
    assert first_at < 0.35  # not held until the function's last chunk (0.4 s later)


async def test_a_function_that_raises_answers_500(tiny_host):
    url = tiny_host[0]
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/api/broken") as answer:
            assert answer.status == 500
            assert (await answer.json())["error"]["code"] == "server_error"  # OpenAI-shaped, no traceback
            assert "the function failed" not in await answer.text()
        async with session.get(f"{url}/api/items/1") as answer:  # the worker carries on
            assert answer.status == 200


async def test_a_timer_function_is_invoked_with_the_hosts_binding_data(tiny_host):
    url, out = tiny_host[0], tiny_host[1]
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/admin/functions/nightly") as answer:
            assert answer.status == 202
        async with session.post(f"{url}/admin/functions/nobody") as answer:
            assert answer.status == 404
    runs = [json.loads(line) for line in out.read_text().splitlines()]
    assert runs == [{"past_due": False}]


def test_the_messages_carry_what_the_runtime_reads():
    """The host's messages, as the runtime decodes them: a function's metadata becomes a host
    entry; binding data round-trips through the runtime's own converters."""
    from azure_functions_runtime.bindings.datumdef import Datum

    http = protos.TypedData(http=protos.RpcHttp(method="GET", url="http://h/api/x?a=1", headers={"a": "b"},
                                                params={"id": "7"}, query={"a": "1"}))
    datum = Datum.from_typed_data(http)
    assert datum.type == "http" and datum.value["params"]["id"].value == "7" and datum.value["query"]["a"].value == "1"
    assert Datum.from_typed_data(protos.TypedData(json='{"IsPastDue": true}')).value == '{"IsPastDue": true}'
    entry = FunctionEntry("f", "id-1", ({"type": "httpTrigger", "name": "req", "route": "x"}, {"type": "http", "name": "$return"}))
    assert entry.trigger["name"] == "req" and entry.binding("http")["name"] == "$return"
    message = protos.StreamingMessage(invocation_request=protos.InvocationRequest(invocation_id="i", function_id="id-1"))
    assert message.WhichOneof("content") == "invocation_request"


async def test_the_invocation_message_goes_before_the_forwarded_request():
    """As the Functions host does: the invocation message is written before the HTTP request is
    forwarded, so the worker has it in hand (and unpacks it) while the request is on its way,
    instead of the request waiting for it."""
    from aiohttp import web

    from shared.local.host.functions_host import FunctionsAsgiApp, RouteMatcher, route_table

    order: list[str] = []

    class Worker:  # the host's side of the worker channel, as far as the order goes
        http_uri = None

        def http_input(self, *args):
            return protos.TypedData(string="")

        def send_invocation(self, function, inputs, trigger_metadata=None, invocation_id=None):
            order.append("invocation message")
            done = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done

    class Forwarder:  # the host's HTTP client to the worker's web server, noting when it is used
        def __init__(self) -> None:
            self.session = aiohttp.ClientSession()

        def request(self, *args, **kwargs):
            order.append("http request")
            return self.session.request(*args, **kwargs)

    async def web_server(request):
        return web.Response(text="ok")

    runner = web.AppRunner(web.Application())
    runner.app.router.add_route("*", "/{tail:.*}", web_server)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    worker = Worker()
    worker.http_uri = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    host = FunctionsAsgiApp(worker)
    entry = FunctionEntry("item", "id-1", ({"type": "httpTrigger", "name": "req", "route": "items/{id}", "methods": ["POST"]},))
    host.routes = RouteMatcher(route_table([entry], "api"))
    host._session = forwarder = Forwarder()
    sent: list[dict] = []
    body = [{"type": "http.request", "body": b"{}", "more_body": False}]

    async def receive():
        return body.pop(0) if body else await asyncio.Event().wait()

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/api/items/7", "raw_path": b"/api/items/7", "query_string": b"",
             "headers": [(b"host", b"h"), (b"content-length", b"2")], "scheme": "http", "client": ("127.0.0.1", 1)}
    try:
        await host(scope, receive, send)
    finally:
        await forwarder.session.close()
        await runner.cleanup()
    assert sent[0]["status"] == 200 and sent[-1]["body"] == b"ok"
    assert order == ["invocation message", "http request"]


async def test_the_durable_api_is_the_hosts_and_only_from_this_machine(tiny_host):
    url = tiny_host[0]
    # The tiny app has no orchestrations: the extension's API is not there.
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/runtime/webhooks/durabletask/instances/x") as answer:
            assert answer.status == 404
    await asyncio.sleep(0)


async def _pairing_records_after(url: str, calls: int) -> tuple[int, int]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/api/pairings") as answer:
            before = (await answer.json())["records"]
        for _ in range(calls):
            async with session.get(f"{url}/api/items/1") as answer:
                assert answer.status == 200
        async with session.get(f"{url}/api/pairings") as answer:
            return before, (await answer.json())["records"]


async def test_the_runtime_keeps_a_record_per_call_unless_corrected(uncorrected_host, tiny_host):
    before, after = await _pairing_records_after(uncorrected_host, 50)
    assert after - before >= 50  # the runtime as released: one record per call, for ever
    before, after = await _pairing_records_after(tiny_host[0], 50)
    assert after <= before + 1 and after <= 2  # shared/worker_runtime.py: dropped once the response is taken


async def test_a_line_break_in_the_path_reaches_the_function(uncorrected_host, tiny_host):
    # Microsoft's FastAPI extension answered such a path with its own 404 (its catch-all route's
    # pattern stops at a line break) and the invocation waited for a request that never came.
    # The app's web extension has no route pattern, with or without the runtime's correction.
    async with aiohttp.ClientSession() as session:
        for url in (uncorrected_host, tiny_host[0]):
            async with session.get(f"{url}/api/items/a%0Ab") as answer:
                assert answer.status == 200 and (await answer.json())["item"] == "a\nb"
