"""The stages a request passes through.

Each stage owns one concept and lives in its own module; which stages an operation runs is the
operations table's choice (operations.py), in the order the gateway lists them (gateway.py):
authenticate → validate → access → deferred → ownership → batch_input → input_guard →
content_safety → system_prompt → stream_usage → cache → quota → output_guard → request_log.

`before` runs in order on the way in and may refuse the request (raise GatewayError) or answer it
itself (set `ctx.result`, as a cache hit does); `after` runs in reverse order on the way out and
may wrap the result (the output guard wraps streams) or add an awaited review of a whole answer
(`UpstreamResult.reviews`: Content Safety); `finish` runs once the exchange is over,
streams included, whether it succeeded or not, in pipeline order so that the request log (last)
sees what the others settled (quota and cost, then the log). `record` is the stage's own part of
the log record, read from its own part of the context; the fields it may use are declared in
records/request_log.py.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

from .context import RequestContext, UpstreamResult


class Stage:
    name = "stage"

    async def before(self, ctx: RequestContext) -> None:
        return None

    def after(self, ctx: RequestContext, result: UpstreamResult) -> UpstreamResult:
        return result

    async def finish(self, ctx: RequestContext) -> None:
        return None

    def record(self, ctx: RequestContext) -> dict[str, Any]:
        return {}


class Hooks(NamedTuple):
    """An operation's stages that do something in each hook, in the order the hook runs them:
    `before` and `finish` in pipeline order, `after` in reverse. A stage that keeps Stage's own
    hook does nothing there, and most stages act in one or two of the three: calling every
    stage's every hook cost each request some 45 calls and awaits of no-ops."""

    before: tuple[Stage, ...]
    after: tuple[Stage, ...]
    finish: tuple[Stage, ...]

    @classmethod
    def of(cls, stages: Sequence[Stage]) -> "Hooks":
        def acting(hook: str) -> tuple[Stage, ...]:
            return tuple(stage for stage in stages if getattr(type(stage), hook) is not getattr(Stage, hook))

        return cls(acting("before"), tuple(reversed(acting("after"))), acting("finish"))
