"""The system-prompt stage: the app's prompt goes into every request of an operation that has a
place for it (the table's `system_prompt`: chat messages, Responses instructions, a completions
prompt), per policy (prepend, append or replace; the client's own system messages kept, dropped
or refused). Runs after the input guard, so the app's own prompt is never checked as input.

The injected text never goes back to the client: the Responses API echoes `instructions` in its
response object, so the client's own instructions (or none) are put back there, in whole answers
and in every stream event that carries the response object."""
from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any, AsyncIterator

import orjson

from . import errors
from .context import RequestContext, UpstreamResult
from .operations import SYSTEM_PROMPT
from .pipeline import Stage

_VARIABLES = re.compile(r"\{(app_name|app_id|user_id|date)\}")
_CLIENT_SYSTEM_ROLES = ("system", "developer")


def render(text: str, ctx: RequestContext) -> str:
    values = {
        "app_name": ctx.app_name or ctx.app_id or "",
        "app_id": ctx.app_id or "",
        "user_id": ctx.user_id or "",
        "date": datetime.now(timezone.utc).date().isoformat(),
    }
    return _VARIABLES.sub(lambda m: values[m.group(1)], text)


def _is_client_system(item) -> bool:
    return isinstance(item, dict) and item.get("role") in _CLIENT_SYSTEM_ROLES


class ApplySystemPrompt(Stage):
    name = SYSTEM_PROMPT

    async def before(self, ctx: RequestContext) -> None:
        policy = ctx.policy
        prompt = policy.system_prompt if policy else None
        place = ctx.route.operation.system_prompt
        if prompt is None or place is None:
            return
        text = render(prompt.text, ctx)
        body = dict(ctx.body)
        if place == "messages":
            body["messages"] = self._messages(list(body["messages"]), text, prompt.mode, prompt.client_system)
        elif place == "instructions":
            self._responses(ctx, body, text, prompt.mode, prompt.client_system)
        elif place == "prompt":
            prompt_value = body["prompt"]
            body["prompt"] = f"{text}\n\n{prompt_value}" if isinstance(prompt_value, str) else [
                f"{text}\n\n{p}" if isinstance(p, str) else p for p in prompt_value
            ]
        ctx.body, ctx.body_modified, ctx.system_prompt = body, True, text
        ctx.extra["system_prompt"] = {"mode": prompt.mode, "client_system": prompt.client_system}

    def after(self, ctx: RequestContext, result: UpstreamResult) -> UpstreamResult:
        if ctx.system_prompt is None or ctx.route.operation.system_prompt != "instructions":
            return result
        own = ctx.client_instructions
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

    def _responses(self, ctx: RequestContext, body: dict, text: str, mode: str, client_system: str) -> None:
        items = body.get("input")
        client_instructions = ctx.client_instructions = body.get("instructions")
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
        closer = getattr(events, "aclose", None)
        if closer is not None:
            await closer()
