"""GET /openai/v1/models (and /openai/models): the deployments the calling app may use, in the
OpenAI list shape, answered by the gateway itself (the operation is `answered_by_gateway`) so
that model-discovering tools work. Not a pipeline stage: the gateway calls it in place of the
upstream, after identity and policy."""
from __future__ import annotations

import orjson

from ..context import RequestContext, UpstreamResult


def list_models(ctx: RequestContext, known_deployments: tuple[str, ...]) -> UpstreamResult:
    allowed = ctx.policy.allowed_deployments
    names = tuple(sorted(known_deployments)) if "*" in allowed else tuple(sorted(set(allowed) - {"*"}))
    key = ctx.identity.key if ctx.identity is not None else None
    if key is not None and key.deployments is not None:
        names = tuple(name for name in names if name in key.deployments)  # a key narrower than its app
    payload = {
        "object": "list",
        "data": [{"id": name, "object": "model", "created": 0, "owned_by": "sekisho"} for name in names],
    }
    return UpstreamResult(status=200, headers={"content-type": "application/json"}, body=orjson.dumps(payload), json=payload)
