"""The floor of the Functions path (bench only): a Functions app whose one HTTP function relays
the chat route to the upstream and does nothing else.

    python -m shared.local.host --app-dir bench/functions_passthrough --no-seed   (with AZURE_OPENAI_ENDPOINT/_API_KEY)

It runs exactly where Sekisho's functions run: the local host in the Functions host's part, the
Python worker runtime in a worker process, the same HTTP streaming web extension
(shared/http_streaming.py), and one pooled aiohttp session to the upstream, as the gateway's. No
identity, policy, quota, guard, cache or log. `make bench` serves it beside Sekisho, so that what
the gateway itself adds is told apart from what every Python function on this path pays.
"""
import os

import aiohttp
import azure.functions as func

from shared.http_streaming import Request, Response, StreamingResponse

app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)

_DROPPED = {"host", "connection", "keep-alive", "content-length", "transfer-encoding", "authorization", "api-key"}
_session: aiohttp.ClientSession | None = None


def _upstream() -> aiohttp.ClientSession:
    global _session
    if _session is None:  # made in the worker's serving loop, on first use
        _session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256), timeout=aiohttp.ClientTimeout(total=300),
                                         cookie_jar=aiohttp.DummyCookieJar())
    return _session


@app.function_name("chat_passthrough")
@app.route(route="openai/deployments/{deployment}/chat/completions", methods=["POST"])
async def chat_passthrough(req: Request) -> Response:
    headers = {k: v for k, v in req.headers.items() if k.lower() not in _DROPPED}
    headers["api-key"] = os.environ["AZURE_OPENAI_API_KEY"]
    query = req.scope.get("query_string", b"").decode()
    url = os.environ["AZURE_OPENAI_ENDPOINT"].rstrip("/") + req.url.path + (f"?{query}" if query else "")
    upstream = await _upstream().request("POST", url, data=await req.body(), headers=headers)
    passed = {k: v for k, v in upstream.headers.items() if k.lower() not in _DROPPED}
    if not upstream.headers.get("content-type", "").startswith("text/event-stream"):
        body = await upstream.read()
        upstream.release()
        return Response(body, status_code=upstream.status, headers=passed)

    async def chunks():
        try:
            async for chunk in upstream.content.iter_any():
                yield chunk
        finally:
            upstream.release()

    return StreamingResponse(chunks(), status_code=upstream.status, headers=passed)
