"""The input guard: forbidden words and patterns in what the client sends, before anything
else is done with it. A hit is refused like Azure's own prompt filter: 400 `content_filter`,
naming the rule id, never echoing the rule."""
from __future__ import annotations

from typing import Any, Iterator

from .context import RequestContext
from .errors import GatewayError
from .guard_rules import GuardMatcher
from .pipeline import Stage
from .routes import Operation


def text_parts(value: Any) -> Iterator[str]:
    """Every text a model would read in a request value: strings, content parts, tool results."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from text_parts(item)
    elif isinstance(value, dict):
        for key in ("content", "text", "input_text", "output", "arguments", "refusal"):
            if key in value:
                yield from text_parts(value[key])


def request_texts(operation: Operation, body: dict[str, Any]) -> Iterator[str]:
    if operation is Operation.CHAT:
        yield from text_parts(body.get("messages"))
    elif operation is Operation.RESPONSES:
        yield from text_parts(body.get("instructions"))
        yield from text_parts(body.get("input"))
    elif operation is Operation.COMPLETIONS:
        yield from text_parts(body.get("prompt"))
    elif operation is Operation.EMBEDDINGS:
        yield from text_parts(body.get("input"))


def content_filter_error(rule: str, where: str) -> GatewayError:
    return GatewayError(
        400, "content_filter",
        f"The {where} was blocked by the gateway's content rules (rule '{rule}'). Please modify it and retry.",
        param="prompt",
        details={"innererror": {"code": "ResponsibleAIPolicyViolation", "content_filter_result": {
            "custom_blocklists": {"filtered": True, "details": [{"filtered": True, "id": rule}]},
        }}},
    )


class GuardInput(Stage):
    name = "input_guard"

    async def before(self, ctx: RequestContext) -> None:
        policy = ctx.policy
        if policy is None or not policy.guard_rules or ctx.route.operation is Operation.MODELS:
            return
        matcher = GuardMatcher(policy.rule_set("input"))
        if matcher.empty:
            return
        for text in request_texts(ctx.route.operation, ctx.body):
            hits = matcher.find(text)
            if hits:
                ctx.guard_decisions.append({"direction": "input", "rule": hits[0].rule, "action": "block"})
                raise content_filter_error(hits[0].rule, "prompt")
