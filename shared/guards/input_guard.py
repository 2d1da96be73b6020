"""The input guard: forbidden words and patterns in everything the model will read, before
anything else is done with the request. It reads every field the operation lists as read by the
model (messages and their parts, names, tool and function definitions, tool-call arguments in the
history, schemas, predictions, suffixes, Responses input items and instructions) as one text in
reading order, so a word split across two parts, messages or input items is still found. A hit is
refused like Azure's own prompt filter: 400 `content_filter`, naming the rule id, never echoing
the rule."""
from __future__ import annotations

from ..context import RequestContext
from ..errors import GatewayError
from ..operations import INPUT_GUARD
from ..pipeline import Stage
from .rules import GuardMatcher

# Between two fields: a line break, which the word rules' skeleton view ignores (so a word split
# across fields still matches) and regex rules see as a boundary.
_FIELD_SEPARATOR = "\n"


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
    name = INPUT_GUARD

    async def before(self, ctx: RequestContext) -> None:
        policy = ctx.policy
        if not policy.guard_rules:
            return
        matcher = GuardMatcher(policy.rule_set("input"))
        if matcher.empty:
            return
        text = _FIELD_SEPARATOR.join(ctx.route.operation.reads.texts(ctx.body))
        hits = matcher.find(text) if text else None
        if hits:
            ctx.guard_decisions.append({"direction": "input", "rule": hits[0].rule, "action": "block"})
            raise content_filter_error(hits[0].rule, "prompt")
