"""A bare pass-through proxy on aiohttp: the floor for a gateway written in Python (bench only).

    SEKISHO_SIMULATOR_API_KEY=KEY python bench/bare_proxy.py --port 8090 --upstream http://127.0.0.1:7072

Forwards each request (method, path, query, body) to the upstream with the upstream's api-key
and answers with the upstream's status, headers and body; an event stream is relayed chunk by
chunk. No auth, policy, quota, guard, cache or log: only what any Python proxy pays.
"""
import argparse
import os

import uvloop
from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

DROPPED = {"host", "connection", "keep-alive", "content-length", "transfer-encoding", "authorization", "api-key"}


async def forward(request: web.Request) -> web.StreamResponse:
    app = request.app
    headers = {k: v for k, v in request.headers.items() if k.lower() not in DROPPED}
    headers["api-key"] = app["api_key"]
    async with app["session"].request(request.method, app["upstream"] + request.path_qs, data=await request.read(), headers=headers) as upstream:
        passed = {k: v for k, v in upstream.headers.items() if k.lower() not in DROPPED}
        if not upstream.headers.get("content-type", "").startswith("text/event-stream"):
            return web.Response(body=await upstream.read(), status=upstream.status, headers=passed)
        response = web.StreamResponse(status=upstream.status, headers=passed)
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def make_app(upstream: str, api_key: str) -> web.Application:
    app = web.Application()
    app["upstream"], app["api_key"] = upstream.rstrip("/"), api_key

    async def session(app: web.Application):
        app["session"] = ClientSession(connector=TCPConnector(limit=256), timeout=ClientTimeout(total=300))
        yield
        await app["session"].close()

    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="bare aiohttp pass-through proxy")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--api-key", default=None, help="the upstream's key; default: SEKISHO_SIMULATOR_API_KEY (kept out of the process list)")
    args = parser.parse_args()
    key = args.api_key or os.environ.get("SEKISHO_SIMULATOR_API_KEY")
    if not key:
        parser.error("give the upstream's key: SEKISHO_SIMULATOR_API_KEY or --api-key")
    uvloop.install()
    web.run_app(make_app(args.upstream, key), host="127.0.0.1", port=args.port, access_log=None, print=None)
