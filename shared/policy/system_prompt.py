"""The system-prompt stage: the app's prompt goes into every request of an operation that has a
place for it (the table's `system_prompt`: chat messages, Responses instructions, a completions
prompt), per policy (prepend, append or replace; the client's own system messages kept, dropped
or refused). Runs after the input guard, so the app's own prompt is never checked as input.

The injected text never goes back to the client: the Responses API echoes `instructions` in its
response object, so the client's own instructions (or none) are put back there, in whole answers
and in every stream event that carries the response object."""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, AsyncIterator

import orjson

from .. import errors, sse
from ..context import RequestContext, UpstreamResult
from ..operations import SYSTEM_PROMPT
from ..pipeline import Stage

_VARIABLES = re.compile(r"\{(app_name|app_id|user_id|date)\}")
_CLIENT_SYSTEM_ROLES = ("system", "developer")


def render(text: str, ctx: RequestContext) -> str:
    if "{" not in text:
        return text  # no variable: the policy's own string (leak protection's index is kept by it)
    values = {
        "app_name": ctx.app_name or ctx.app_id or "",
        "app_id": ctx.app_id or "",
        "user_id": ctx.user_id or "",
        "date": datetime.now(timezone.utc).date().isoformat(),
    }
    return _VARIABLES.sub(lambda m: values[m.group(1)], text)


def _is_client_system(item) -> bool:
    return isinstance(item, dict) and item.get("role") in _CLIENT_SYSTEM_ROLES


@dataclass
class AppliedPrompt:
    """The system-prompt stage's part of a request: the app's prompt as it went upstream."""

    text: str  # rendered; leak protection compares answers with it
    mode: str
    client_system: str
    client_instructions: str | None = None  # Responses: the client's own, shown back instead of the injected ones
    place: str | None = None  # where it went (the operation's `system_prompt`)

    def record(self) -> dict:
        return {"system_prompt": {"mode": self.mode, "client_system": self.client_system}}


class ApplySystemPrompt(Stage):
    name = SYSTEM_PROMPT

    async def before(self, ctx: RequestContext) -> None:
        policy = ctx.policy
        prompt = policy.system_prompt if policy else None
        place = ctx.route.operation.system_prompt
        if prompt is None or place is None:
            return
        text = render(prompt.text, ctx)
        applied = AppliedPrompt(text, prompt.mode, prompt.client_system, place=place)
        body = dict(ctx.body)
        if place == "messages":
            body["messages"] = self._messages(list(body["messages"]), text, prompt.mode, prompt.client_system)
        elif place == "instructions":
            applied.client_instructions = self._responses(body, text, prompt.mode, prompt.client_system)
        elif place == "prompt":
            prompt_value = body["prompt"]
            body["prompt"] = f"{text}\n\n{prompt_value}" if isinstance(prompt_value, str) else [
                f"{text}\n\n{p}" if isinstance(p, str) else p for p in prompt_value
            ]
        ctx.body, ctx.body_modified, ctx.system_prompt = body, True, applied

    def record(self, ctx: RequestContext) -> dict:
        return ctx.system_prompt.record() if ctx.system_prompt is not None else {}

    def after(self, ctx: RequestContext, result: UpstreamResult) -> UpstreamResult:
        if ctx.system_prompt is None or ctx.route.operation.system_prompt != "instructions":
            return result
        own = ctx.system_prompt.client_instructions
        if result.is_stream:
            result.events = _restore_in_stream(result.events, own)
        elif isinstance(result.json, dict) and result.json.get("instructions") != own and "instructions" in result.json:
            if ctx.model_response is None:
                ctx.model_response = result.json
            result.json = {**result.json, "instructions": own}
            result.body = orjson.dumps(result.json)
        return result

    @staticmethod
    def _refuse_client_system() -> errors.GatewayError:
        return errors.invalid_request("This application does not accept system or developer messages from clients.", "messages")

    def _messages(self, messages: list, text: str, mode: str, client_system: str) -> list:
        has_client_system = any(_is_client_system(m) for m in messages)
        if has_client_system and client_system == "reject":
            raise self._refuse_client_system()
        if mode == "replace" or client_system == "drop":
            messages = [m for m in messages if not _is_client_system(m)]
        app_message = {"role": "system", "content": text}
        if mode == "append":
            leading = 0
            while leading < len(messages) and _is_client_system(messages[leading]):
                leading += 1
            return messages[:leading] + [app_message] + messages[leading:]
        return [app_message] + messages

    def _responses(self, body: dict, text: str, mode: str, client_system: str) -> str | None:
        """Puts the app's prompt into `instructions`; returns the client's own."""
        items = body.get("input")
        client_instructions = own = body.get("instructions")
        has_client_system = bool(client_instructions) or (isinstance(items, list) and any(_is_client_system(i) for i in items))
        if has_client_system and client_system == "reject":
            raise self._refuse_client_system()
        if mode == "replace" or client_system == "drop":
            client_instructions = None
            if isinstance(items, list):
                body["input"] = [i for i in items if not _is_client_system(i)]
        if not client_instructions:
            body["instructions"] = text
        elif mode == "append":
            body["instructions"] = f"{client_instructions}\n\n{text}"
        else:
            body["instructions"] = f"{text}\n\n{client_instructions}"
        return own


async def _restore_in_stream(events: AsyncIterator[Any], own: str | None) -> AsyncIterator[Any]:
    """Every event carrying the response object (created, in_progress, completed, …) shows the
    client's own instructions, not the injected ones."""
    try:
        async for event in events:
            payload = event.payload
            response = payload.get("response") if isinstance(payload, dict) else None
            if isinstance(response, dict) and "instructions" in response and response["instructions"] != own:
                event.changed({**payload, "response": {**response, "instructions": own}})
            yield event
    finally:
        await sse.close(events)
