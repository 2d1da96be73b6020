"""Validation stage: size, JSON, required fields, and which deployment the request is for."""
from __future__ import annotations

from typing import Any

import orjson

from . import errors
from .context import RequestContext
from .pipeline import Stage
from .routes import Operation, Style, match_template

# Fields each operation needs, with the type the upstream expects.
_REQUIRED: dict[Operation, tuple[tuple[str, tuple[type, ...]], ...]] = {
    Operation.CHAT: (("messages", (list,)),),
    Operation.COMPLETIONS: (("prompt", (str, list)),),
    Operation.EMBEDDINGS: (("input", (str, list)),),
    Operation.RESPONSES: (("input", (str, list)),),
}


async def read_body(ctx: RequestContext, limit: int) -> bytes:
    """Read the body, refusing it as soon as it passes `limit` (Content-Length or streamed)."""
    declared = ctx.http.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise errors.request_too_large(limit)
        except ValueError:
            raise errors.invalid_request("Content-Length is not a number.") from None
    chunks: list[bytes] = []
    size = 0
    async for chunk in ctx.http.stream():
        size += len(chunk)
        if size > limit:
            raise errors.request_too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _type_name(types: tuple[type, ...]) -> str:
    names = {str: "a string", list: "an array", dict: "an object"}
    return " or ".join(names.get(t, t.__name__) for t in types)


class ValidateRequest(Stage):
    name = "validate"

    def __init__(self, max_body_bytes: int) -> None:
        self._limit = max_body_bytes
    # Runs after authentication, so an unauthenticated caller cannot make the gateway read a body.

    async def before(self, ctx: RequestContext) -> None:
        route = ctx.route
        ctx.api_version = ctx.http.query_params.get("api-version")
        if route.operation is Operation.MODELS:
            return  # a GET without a body
        if route.deployment_in_path:
            params = match_template(route.template, ctx.http.url.path) or {}
            ctx.deployment = params.get("deployment") or None
        raw = ctx.raw_body = await read_body(ctx, self._limit)
        if not raw.strip():
            raise errors.invalid_request("The request body is empty; a JSON object is expected.")
        try:
            body: Any = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise errors.invalid_request(f"The request body is not valid JSON: {exc}.") from None
        if not isinstance(body, dict):
            raise errors.invalid_request("The request body must be a JSON object.")
        ctx.body = body
        if not route.deployment_in_path:
            model = body.get("model")
            if not isinstance(model, str) or not model.strip():
                raise errors.invalid_request("Missing required parameter: 'model' (the deployment name).", "model")
            ctx.deployment = model
        elif route.style is Style.AZURE and not ctx.deployment:
            raise errors.invalid_request("The deployment name in the path is empty.", "deployment")
        for field, types in _REQUIRED[route.operation]:
            if field not in body:
                raise errors.invalid_request(f"Missing required parameter: '{field}'.", field)
            if not isinstance(body[field], types):
                raise errors.invalid_request(f"'{field}' must be {_type_name(types)}.", field)
        if route.operation is Operation.CHAT and not body["messages"]:
            raise errors.invalid_request("'messages' must not be empty.", "messages")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise errors.invalid_request("'stream' must be true or false.", "stream")
        if stream and route.operation is Operation.EMBEDDINGS:
            raise errors.invalid_request("Embeddings cannot be streamed.", "stream")
        ctx.stream = stream


class RequestStreamUsage(Stage):
    """Ask the upstream for the usage chunk on every chat/completions stream, so cost is exact.

    The client's own choice is remembered; the upstream relay strips the usage chunk when the
    client did not ask for it."""

    name = "stream_usage"

    async def before(self, ctx: RequestContext) -> None:
        if not ctx.stream or ctx.route.operation not in (Operation.CHAT, Operation.COMPLETIONS):
            return
        options = ctx.body.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise errors.invalid_request("'stream_options' must be an object.", "stream_options")
        options = dict(options or {})
        ctx.client_wants_usage = options.get("include_usage") is True
        if not ctx.client_wants_usage:
            options["include_usage"] = True
            ctx.body["stream_options"] = options
            ctx.body_modified = True
