"""The ordered stages a request passes through (GUIDE §2).

Each stage owns one concept and lives in its own module. `before` runs in order on the way in
and may refuse the request (raise GatewayError) or answer it itself (set `ctx.result`, as the
cache will); `after` runs in reverse order on the way out and may wrap the result (the output
guard wraps streams); `finish` runs once the exchange is over, streams included, whether it
succeeded or not, in pipeline order so that the request log (last) sees what others added
(quota settlement and cost, then the log).

The order is built in gateway.py: authenticate → validate → access → model_list →
stream_usage → quota → [upstream] → request_log. Guards, system prompt and cache slot in
before the quota in their own issues.
"""
from __future__ import annotations

from .context import RequestContext, UpstreamResult


class Stage:
    name = "stage"

    async def before(self, ctx: RequestContext) -> None:
        return None

    def after(self, ctx: RequestContext, result: UpstreamResult) -> UpstreamResult:
        return result

    async def finish(self, ctx: RequestContext) -> None:
        return None
