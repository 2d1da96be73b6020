"""GET /openai/v1/models (and /openai/models): the deployments the calling app may use, in the
OpenAI list shape, answered by the gateway itself so that model-discovering tools work."""
from __future__ import annotations

import orjson

from .context import RequestContext, UpstreamResult
from .pipeline import Stage
from .routes import Operation


class ListModels(Stage):
    name = "model_list"

    def __init__(self, known_deployments: tuple[str, ...]) -> None:
        self._known = tuple(sorted(known_deployments))

    async def before(self, ctx: RequestContext) -> None:
        if ctx.route.operation is not Operation.MODELS:
            return
        allowed = ctx.policy.allowed_deployments
        names = self._known if "*" in allowed else tuple(sorted(set(allowed) - {"*"}))
        payload = {
            "object": "list",
            "data": [{"id": name, "object": "model", "created": 0, "owned_by": "sekisho"} for name in names],
        }
        body = orjson.dumps(payload)
        ctx.result = UpstreamResult(status=200, headers={"content-type": "application/json"}, body=body, json=payload)
