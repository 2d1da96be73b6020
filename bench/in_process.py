"""The gateway's own CPU per request, in process: no host, no worker runtime, no web server.

    .venv/bin/python bench/in_process.py [--app sekisho] [--requests 3000] [--concurrency 16] [--stream] [--profile]

Runs the Gateway in this process against the built-in simulator (a process of its own), handing
each request in as a Starlette Request and sending its answer to a no-op ASGI `send`, as the
worker's web server would; a pass-through handler (one pooled aiohttp call, the answer relayed)
runs the same requests in the same loop. The difference of their CPU per request (this process,
every thread: the SQLite thread's writes included) is what the gateway's stages cost, free of the
path's fixed cost and steadier than `make bench` on a noisy machine, because the two alternate
in rounds. `--profile` adds a cProfile of the gateway's requests, summed per stage.
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gateway_vs_direct as bench  # noqa: E402
from shared.gateway import Gateway  # noqa: E402
from shared.local.issuer import LocalIssuer  # noqa: E402
from shared.routes import ROUTES_BY_FUNCTION  # noqa: E402

CHAT = ROUTES_BY_FUNCTION["azure_chat_completions"]
PATH = "/openai/deployments/gpt-4o-mini/chat/completions"


def _scope(headers: list[tuple[bytes, bytes]], length: int) -> dict:
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": PATH, "raw_path": PATH.encode(), "query_string": b"api-version=2024-10-21", "root_path": "",
        "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 5000), "path_params": {"deployment": "gpt-4o-mini"},
        "headers": [*headers, (b"content-type", b"application/json"), (b"content-length", str(length).encode())],
    }


def _request(headers: list[tuple[bytes, bytes]], body: dict) -> tuple[Request, dict]:
    raw = json.dumps(body).encode()
    scope = _scope(headers, len(raw))
    messages = [{"type": "http.request", "body": raw, "more_body": False}]

    async def receive():
        if messages:
            return messages.pop(0)
        await asyncio.Event().wait()

    return Request(scope, receive), scope


async def _send(message) -> None:
    pass


class PassThrough:
    """What any Python function relaying the call pays in this loop: one pooled aiohttp call."""

    def __init__(self, upstream: str, key: str) -> None:
        self.upstream, self.key = upstream, key
        self.session: aiohttp.ClientSession | None = None

    async def handle(self, request: Request) -> Response:
        if self.session is None:
            self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256), cookie_jar=aiohttp.DummyCookieJar())
        body = await request.body()
        answer = await self.session.post(f"{self.upstream}{PATH}?api-version=2024-10-21", data=body,
                                         headers={"api-key": self.key, "content-type": "application/json"})
        if not answer.headers.get("content-type", "").startswith("text/event-stream"):
            data = await answer.read()
            answer.release()
            return Response(data, status_code=answer.status, media_type="application/json")

        async def chunks():
            try:
                async for chunk in answer.content.iter_any():
                    yield chunk
            finally:
                answer.release()

        return StreamingResponse(chunks(), status_code=answer.status, media_type="text/event-stream")


async def run(handle, headers, requests: int, concurrency: int, stream: bool, tag: str, after=None) -> tuple[float, float]:
    """CPU seconds of this process per request for `requests` requests, `concurrency` at a time,
    and of that, the seconds of its other threads (the SQLite thread)."""
    queue = iter(range(requests))

    async def one_at_a_time() -> None:
        for i in queue:
            body = bench.chat_body(f"{tag}-{i}", stream)
            request, scope = _request(headers, body)
            response = await handle(request)
            if response.status_code != 200:
                raise RuntimeError(f"{tag}: HTTP {response.status_code}: {bytes(getattr(response, 'body', b''))[:300]!r}")
            await response(scope, request.receive, _send)

    started, started_here = time.process_time(), time.thread_time()
    await asyncio.gather(*(one_at_a_time() for _ in range(concurrency)))
    if after is not None:
        await after()
    spent, here = time.process_time() - started, time.thread_time() - started_here
    return spent / requests, (spent - here) / requests


def time_stages(gateway: Gateway) -> dict[str, float]:
    """Wrap each stage's before, after and finish (and the upstream call) with a timer of this
    thread's CPU. At c=1 little else runs while a call waits, except during the upstream call: the
    previous request's finishing runs then, so that figure includes it. The SQLite thread's
    background writes are not counted."""
    spent: dict[str, float] = {}

    def timed_async(name, fn):
        async def wrapper(*a, **k):
            started = time.thread_time()
            try:
                return await fn(*a, **k)
            finally:
                spent[name] = spent.get(name, 0.0) + time.thread_time() - started
        return wrapper

    def timed(name, fn):
        def wrapper(*a, **k):
            started = time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                spent[name] = spent.get(name, 0.0) + time.thread_time() - started
        return wrapper

    for stage in gateway.stages:
        label = type(stage).__name__
        stage.before = timed_async(f"{label}.before", stage.before)
        stage.after = timed(f"{label}.after", stage.after)
        stage.finish = timed_async(f"{label}.finish", stage.finish)
    gateway.upstream.send = timed_async("upstream call", gateway.upstream.send)
    return spent


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--app", default="sekisho", choices=sorted(bench.SEKISHO_APPS))
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--stages", action="store_true", help="also time each stage's before, after and finish (at c=1)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="sekisho-inproc-"))
    issuer = LocalIssuer(work)
    simulator, sim_url = bench.start_simulator(work)
    # The issuer's keys are served by a local host (any app): the gateway fetches them as from Entra.
    host, host_url = bench.start_sekisho(work, sim_url, work / "host.db", "issuer", app_dir=bench.BENCH / "functions_passthrough")
    gateway = None
    try:
        db = work / "gateway.db"
        await bench.register_apps(str(db))
        env = {"AZURE_OPENAI_ENDPOINT": sim_url, "AZURE_OPENAI_API_KEY": bench.SIMULATOR_KEY, "SEKISHO_SQLITE_PATH": str(db),
               "SEKISHO_LOG_SPOOL_DIR": str(work / "spool"), "SEKISHO_DEPLOYMENTS": "gpt-4o-mini", **issuer.gateway_settings(host_url)}
        gateway = Gateway(env=env)
        await gateway.start()
        token = issuer.mint(bench.SEKISHO_APPS[args.app][0], lifetime_seconds=3600)
        auth = [(b"authorization", f"Bearer {token}".encode())]
        passthrough = PassThrough(sim_url, bench.SIMULATOR_KEY)

        async def settled() -> None:
            while gateway._finishing:
                await asyncio.gather(*gateway._finishing)
            await gateway.log_writer.flush()  # the SQLite writes, in this run's CPU

        handle_gateway = lambda request: gateway.handle(request, CHAT)  # noqa: E731
        for handle, headers in ((handle_gateway, auth), (passthrough.handle, [])):  # warm-up
            await run(handle, headers, 300, args.concurrency, args.stream, f"warm-{secrets.token_hex(4)}")
        ours, theirs = [], []
        for r in range(args.rounds):
            n = args.requests // args.rounds
            ours.append(await run(handle_gateway, auth, n, args.concurrency, args.stream, f"g{r}-{secrets.token_hex(4)}", settled))
            theirs.append(await run(passthrough.handle, [], n, args.concurrency, args.stream, f"p{r}-{secrets.token_hex(4)}"))
        median = lambda values: sorted(values)[len(values) // 2] * 1000  # noqa: E731
        ours_ms, theirs_ms = median([o for o, _ in ours]), median([t for t, _ in theirs])
        threads_ms = median([other for _, other in ours])
        kind = "streams" if args.stream else "whole answers"
        print(f"{args.app}, {kind}, c={args.concurrency}: gateway {ours_ms:.3f} ms CPU per request ({threads_ms:.3f} ms of it in other "
              f"threads: SQLite), pass-through {theirs_ms:.3f} ms; the gateway adds {ours_ms - theirs_ms:.3f} ms, "
              f"{ours_ms / theirs_ms:.2f}× the pass-through (medians of {args.rounds} rounds)")
        if args.stages:
            spent = time_stages(gateway)
            await run(handle_gateway, auth, args.requests // args.rounds, 1, args.stream, f"st-{secrets.token_hex(4)}", settled)
            n = args.requests // args.rounds
            print(f"µs of CPU per request at c=1, inside each call ({n} requests; total {sum(spent.values()) / n * 1e6:.0f} µs):")
            for name, seconds in sorted(spent.items(), key=lambda item: -item[1]):
                print(f"  {seconds / n * 1e6:8.1f}  {name}")
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            await run(handle_gateway, auth, args.requests // args.rounds, args.concurrency, args.stream, f"prof-{secrets.token_hex(4)}", settled)
            profiler.disable()
            out = bench.BENCH / "results" / "in_process.pstats"
            profiler.dump_stats(out)
            stats = pstats.Stats(profiler)
            stats.sort_stats("tottime").print_stats(35)
            stats.sort_stats("cumtime").print_stats(r"shared/.*(before|after|finish|_relay|_stream|send)\b", 40)
        if passthrough.session is not None:
            await passthrough.session.close()
    finally:
        if gateway is not None:
            await gateway.aclose()
        bench.stop(host)
        bench.stop(simulator)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
