"""Azure AI Content Safety as a stage: Prompt Shields and harm categories, on the way in and on
the way out, streams included. Off unless an app's policy turns it on (`content_safety`).

On the way in (`before`), the checks start at once and run while the later stages do their work
(system prompt, cache lookup, quota reservation); the gateway waits for them (`checks_passed`)
before any answer leaves or the upstream is called:
- **Prompt Shields** on the user's prompt (a jailbreak) and on the documents the model will read
  — tool and function results in chat, function call outputs in Responses — (an indirect
  attack): refused with 400 `content_filter`, the shield's result in `innererror`;
- **harm categories** (hate, sexual, violence, self-harm) on everything the model reads: refused
  when a category's severity reaches the policy's threshold for it.

On the way out, the answer is analysed for the same categories with the output thresholds. A
whole answer is checked before it is sent: a choice that fails ends with `finish_reason:
"content_filter"` and `content_filter_results` naming the category and severity, its text
withheld. A stream is checked in windows: its events are held until the text they carry since
the last check reaches `window_chars` (or the choice ends), then that text, with the end of what
was already released as context, is analysed; a window that passes is released, a window that
fails is never sent and its choice ends with `content_filter` there. Blocked streams are read to
their end without relaying, so the usage chunk still arrives and the cost stays exact.

Failures (the service slow beyond the policy's `timeout_ms`, down, or refusing) follow the
policy's `on_failure`: `closed` refuses the request with 503 `content_safety_unavailable` (a
stream in progress ends with `content_filter`), `open` carries on and says so in the log. Every
decision (check, category, severity, shield result, latency, failure) is in the request log's
`safety` field and summed up in the telemetry event; the analysed text is in neither.

The service is called over its REST API (api-version 2024-09-01) with an Entra ID token for
the function's managed identity (Cognitive Services User on the resource; the resource has local
auth off), or with SEKISHO_CONTENT_SAFETY_API_KEY where one is set (the local simulator).
"""
from __future__ import annotations

import asyncio
import copy
import time
from dataclasses import dataclass
from typing import Annotated, Any, AsyncIterator, Literal

import aiohttp
import orjson
from pydantic import BaseModel, ConfigDict, Field

from .. import sse
from ..context import RequestContext, UpstreamResult
from ..errors import GatewayError
from ..operations import CONTENT_SAFETY
from ..pipeline import Stage
from ..upstream.auth import ApiKeyAuth, EntraTokenAuth

API_VERSION = "2024-09-01"
MAX_TEXT = 10_000  # characters per analysis, per user prompt, and for a call's documents together
CATEGORIES = {"hate": "Hate", "sexual": "Sexual", "violence": "Violence", "self_harm": "SelfHarm"}
_CATEGORY_OF = {service: ours for ours, service in CATEGORIES.items()}
CONTEXT_CHARS = 200  # released text sent again with the next window, so a sentence split between windows is seen whole


def severity_name(severity: int) -> str:
    """As Azure OpenAI's content_filter_results name severities."""
    return "safe" if severity < 2 else "low" if severity < 4 else "medium" if severity < 6 else "high"


# Policy ------------------------------------------------------------------------------------------
Threshold = Annotated[int, Field(ge=1, le=7)] | Literal["off"]


class HarmThresholds(BaseModel):
    """Severity (0–7, as the service reports it: 0 safe, 2 low, 4 medium, 6 high) from which a
    category is refused; "off" does not check it. Unset: inherited (built-in: 4 for each)."""

    model_config = ConfigDict(extra="forbid")

    hate: Threshold | None = None
    sexual: Threshold | None = None
    violence: Threshold | None = None
    self_harm: Threshold | None = None


class ContentSafetySettings(BaseModel):
    """Azure AI Content Safety for an app (guards/content_safety.py). Off by default."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool | None = Field(default=None, description="Check prompts and answers with Azure AI Content Safety.")
    prompt_shield: bool | None = Field(default=None, description="Prompt Shields on the user's prompt: jailbreak attempts are refused.")
    document_shield: bool | None = Field(default=None, description="Prompt Shields on what tools returned (tool messages, function call outputs): indirect attacks are refused.")
    input_thresholds: HarmThresholds | None = None
    output_thresholds: HarmThresholds | None = None
    window_chars: int | None = Field(default=None, ge=20, le=MAX_TEXT - CONTEXT_CHARS, description="A stream's answer is checked every this many characters (held until checked).")
    first_window_chars: int | None = Field(default=None, ge=1, le=MAX_TEXT - CONTEXT_CHARS, description="The first window, smaller so that the answer starts sooner.")
    on_failure: Literal["closed", "open"] | None = Field(default=None, description="When the service is slow or down: closed refuses (503), open carries on.")
    timeout_ms: int | None = Field(default=None, ge=50, le=60_000, description="Time allowed for one check.")


@dataclass(frozen=True)
class SafetyPolicy:
    enabled: bool = False
    prompt_shield: bool = True
    document_shield: bool = True
    input_thresholds: tuple[tuple[str, int], ...] = tuple((c, 4) for c in CATEGORIES)
    output_thresholds: tuple[tuple[str, int], ...] = tuple((c, 4) for c in CATEGORIES)
    window_chars: int = 300
    first_window_chars: int = 60
    on_failure: str = "closed"
    timeout: float = 2.0

    @classmethod
    def of(cls, merged: dict[str, Any] | None) -> "SafetyPolicy":
        merged = merged or {}
        default = cls()

        def thresholds(name: str, inherited: tuple[tuple[str, int], ...]) -> tuple[tuple[str, int], ...]:
            given = merged.get(name) or {}
            base = dict(inherited)
            return tuple((c, given.get(c, base.get(c))) for c in CATEGORIES if given.get(c, base.get(c)) not in (None, "off"))

        def value(name: str, fallback: Any) -> Any:
            return fallback if merged.get(name) is None else merged[name]

        return cls(
            enabled=bool(merged.get("enabled")),
            prompt_shield=value("prompt_shield", default.prompt_shield),
            document_shield=value("document_shield", default.document_shield),
            input_thresholds=thresholds("input_thresholds", default.input_thresholds),
            output_thresholds=thresholds("output_thresholds", default.output_thresholds),
            window_chars=value("window_chars", default.window_chars),
            first_window_chars=value("first_window_chars", default.first_window_chars),
            on_failure=value("on_failure", default.on_failure),
            timeout=value("timeout_ms", default.timeout * 1000) / 1000,
        )


# The service -------------------------------------------------------------------------------------
class ContentSafetyUnavailable(Exception):
    """The service could not give a verdict: not configured, down, refusing, or too slow."""


class ContentSafetyClient:
    def __init__(self, endpoint: str, api_key: str = "", credential=None) -> None:
        self.endpoint = endpoint.rstrip("/")
        # A key goes in the service's own header; without one, an Entra ID token of the identity.
        self._auth = ApiKeyAuth(api_key, "Ocp-Apim-Subscription-Key") if api_key else EntraTokenAuth(credential)
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
                connector=aiohttp.TCPConnector(limit=64), cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def _post(self, operation: str, body: dict[str, Any]) -> dict[str, Any]:
        if not self.endpoint:
            raise ContentSafetyUnavailable("SEKISHO_CONTENT_SAFETY_ENDPOINT is not set")
        url = f"{self.endpoint}/contentsafety/text:{operation}?api-version={API_VERSION}"
        try:
            headers = await self._auth.headers()
        except Exception as exc:  # no managed identity, or the identity endpoint failed
            raise ContentSafetyUnavailable(f"no token for the service ({type(exc).__name__})") from None
        try:
            async with self._client().post(url, json=body, headers=headers) as answer:
                if answer.status != 200:
                    raise ContentSafetyUnavailable(f"the service answered {answer.status}")
                return await answer.json(content_type=None)
        except (aiohttp.ClientError, ValueError) as exc:
            raise ContentSafetyUnavailable(f"the service could not be reached ({type(exc).__name__})") from None

    async def analyze(self, text: str) -> dict[str, int]:
        """Each category's severity in `text` (split into the service's 10,000-character pieces,
        the highest severity of any piece)."""
        pieces = [text[i: i + MAX_TEXT] for i in range(0, len(text), MAX_TEXT)] or [""]
        answers = await asyncio.gather(*(self._post("analyze", {"text": piece, "categories": list(CATEGORIES.values()),
                                                                "outputType": "FourSeverityLevels"})
                                         for piece in pieces if piece.strip()))
        severities = dict.fromkeys(CATEGORIES, 0)
        for answer in answers:
            for item in answer.get("categoriesAnalysis") or ():
                category = _CATEGORY_OF.get(item.get("category"))
                if category is not None:
                    severities[category] = max(severities[category], int(item.get("severity") or 0))
        return severities

    async def shield(self, prompt: str, documents: list[str]) -> tuple[bool, bool]:
        """(an attack in the user's prompt, an attack in any document)."""
        prompts = [prompt[i: i + MAX_TEXT] for i in range(0, len(prompt), MAX_TEXT)] or [""]
        batches: list[list[str]] = [[]]
        size = 0
        for document in (d[i: i + MAX_TEXT] for d in documents for i in range(0, len(d), MAX_TEXT)):
            if size + len(document) > MAX_TEXT and batches[-1]:
                batches.append([])
                size = 0
            batches[-1].append(document)
            size += len(document)
        calls = [{"userPrompt": p, "documents": []} for p in prompts if p.strip()]
        calls += [{"userPrompt": "", "documents": batch} for batch in batches if batch]
        answers = await asyncio.gather(*(self._post("shieldPrompt", call) for call in calls))
        user_attack = any((a.get("userPromptAnalysis") or {}).get("attackDetected") for a in answers)
        document_attack = any(d.get("attackDetected") for a in answers for d in a.get("documentsAnalysis") or ())
        return bool(user_attack), bool(document_attack)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        await self._auth.close()


# What the model reads, by role ---------------------------------------------------------------------
def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(part.get("text") or part.get("refusal") or "" if isinstance(part, dict) else str(part) for part in content)
    return ""


def prompt_and_documents(shape: str | None, body: dict[str, Any]) -> tuple[str, list[str]]:
    """The user's own words, and the documents the model will read (tool results): what Prompt
    Shields checks for direct and indirect attacks."""
    user, documents = [], []
    if shape == "messages":
        for message in body.get("messages") or ():
            if not isinstance(message, dict):
                continue
            if message.get("role") == "user":
                user.append(_text_of(message.get("content")))
            elif message.get("role") in ("tool", "function"):
                documents.append(_text_of(message.get("content")))
    elif shape == "responses_input":
        items = body.get("input")
        if isinstance(items, str):
            user.append(items)
        for item in items if isinstance(items, list) else ():
            if not isinstance(item, dict):
                continue
            if item.get("type") in ("function_call_output", "custom_tool_call_output", "mcp_call_output"):
                documents.append(_text_of(item.get("output")))
            elif item.get("role") == "user" or item.get("type") == "input_text":
                user.append(_text_of(item.get("content") if "content" in item else item.get("text")))
    elif shape == "prompt":
        prompt = body.get("prompt")
        user.extend(p for p in ([prompt] if isinstance(prompt, str) else prompt or ()) if isinstance(p, str))
    return "\n".join(t for t in user if t), [d for d in documents if d]


# The stage -------------------------------------------------------------------------------------
class SafetyCheck:
    """A request's checks: the decisions so far, and the input check still running."""

    def __init__(self, policy: SafetyPolicy) -> None:
        self.policy = policy
        self.decisions: list[dict[str, Any]] = []
        self.pending: asyncio.Task | None = None


def _filter_results(severities: dict[str, int], failed: dict[str, int]) -> dict[str, Any]:
    return {c: {"filtered": c in failed, "severity": severity_name(severities.get(c, 0))} for c in CATEGORIES}


def _refusal(what: str, results: dict[str, Any]) -> GatewayError:
    return GatewayError(
        400, "content_filter",
        f"The {what} was filtered by Azure AI Content Safety under this application's policy. Please modify it and retry.",
        param="prompt",
        details={"innererror": {"code": "ResponsibleAIPolicyViolation", "content_filter_result": results}},
    )


def _unavailable(reason: str) -> GatewayError:
    return GatewayError(503, "content_safety_unavailable",
                        f"Content Safety could not check this request ({reason}) and the application's policy does not allow it unchecked.",
                        error_type="server_error", headers={"Retry-After": "5"})


class CheckContentSafety(Stage):
    name = CONTENT_SAFETY

    def __init__(self, client: ContentSafetyClient) -> None:
        self.client = client

    # On the way in ---------------------------------------------------------------------------
    async def before(self, ctx: RequestContext) -> None:
        policy = ctx.policy.content_safety
        if not policy.enabled or ctx.body is None:
            return
        check = ctx.safety = SafetyCheck(policy)
        operation = ctx.route.operation
        texts = "\n".join(operation.reads.texts(ctx.body))
        prompt, documents = prompt_and_documents(operation.shielded, ctx.body)
        check.pending = asyncio.get_running_loop().create_task(self._check_input(check, texts, prompt, documents))

    async def _check_input(self, check: SafetyCheck, texts: str, prompt: str, documents: list[str]) -> None:
        policy = check.policy
        calls = []
        if policy.input_thresholds and texts.strip():
            calls.append(self._timed(check, "harm", "input", self.client.analyze(texts)))
        shield_prompt = prompt if policy.prompt_shield else ""
        shield_documents = documents if policy.document_shield else []
        if shield_prompt.strip() or shield_documents:
            calls.append(self._timed(check, "shield", "input", self.client.shield(shield_prompt, shield_documents)))
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome  # failed closed (both calls have ended: nothing is left unretrieved)
        severities: dict[str, int] = {}
        results: dict[str, Any] = {}
        failed: dict[str, int] = {}
        for kind, outcome in outcomes:
            if outcome is None:
                continue  # failed open: logged by _timed
            if kind == "harm":
                severities = outcome
                failed = {c: severities[c] for c, threshold in policy.input_thresholds if severities.get(c, 0) >= threshold}
                results.update(_filter_results(severities, failed))
            else:
                user_attack, document_attack = outcome
                if policy.prompt_shield and shield_prompt.strip():
                    results["jailbreak"] = {"filtered": user_attack, "detected": user_attack}
                if policy.document_shield and shield_documents:
                    results["indirect_attack"] = {"filtered": document_attack, "detected": document_attack}
        blocked = [name for name, result in results.items() if result.get("filtered")]
        if blocked:
            check.decisions.append({"check": "input", "action": "block", "categories": blocked})
            raise _refusal("prompt", results)

    async def _timed(self, check: SafetyCheck, kind: str, direction: str, call) -> tuple[str, Any]:
        """One call to the service within the policy's time budget; its decision recorded. A
        failure refuses (closed) or is recorded and ignored (open)."""
        started = time.perf_counter()
        decision: dict[str, Any] = {"check": kind, "direction": direction}
        try:
            outcome = await asyncio.wait_for(call, check.policy.timeout)
        except (ContentSafetyUnavailable, TimeoutError) as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else str(exc)
            decision.update(error=reason, action="refuse" if check.policy.on_failure == "closed" else "continue",
                            latency_ms=round((time.perf_counter() - started) * 1000, 1))
            check.decisions.append(decision)
            if check.policy.on_failure == "closed":
                raise _unavailable(reason) from None
            return kind, None
        decision["latency_ms"] = round((time.perf_counter() - started) * 1000, 1)
        if kind == "harm":
            decision["severities"] = outcome
        else:
            decision["user_attack"], decision["document_attack"] = outcome
        check.decisions.append(decision)
        return kind, outcome

    # On the way out --------------------------------------------------------------------------
    def after(self, ctx: RequestContext, result: UpstreamResult) -> UpstreamResult:
        policy = ctx.policy.content_safety if ctx.policy is not None else None
        if policy is None or not policy.enabled or result.status != 200 or not policy.output_thresholds:
            return result
        if ctx.safety is None:  # an async job's attempt: its input was checked when it was submitted
            ctx.safety = SafetyCheck(policy)
        check = ctx.safety
        operation = ctx.route.operation
        if result.is_stream:
            if operation.stream_shape in ("chat_chunks", "text_chunks"):
                result.events = self._windows(ctx, check, result.events)
            elif operation.stream_shape == "response_events":
                result.events = self._response_windows(check, result.events)
            return result
        if isinstance(result.json, dict) and operation.writes:
            result.reviews.append(self._whole)  # awaited by the gateway once every stage's `after` ran
        return result

    async def _whole(self, ctx: RequestContext, result: UpstreamResult) -> UpstreamResult:
        """A whole answer: each choice's text (or the whole output) analysed; a failing one withheld."""
        check, body = ctx.safety, result.json
        per_choice = isinstance(body.get("choices"), list)
        groups: dict[int, list[str]] = {}
        for location in ctx.route.operation.writes.locations(body):
            key = location.indexes[0] if per_choice and location.path.startswith("choices") else -1
            groups.setdefault(key, []).append(location.text)
        texts = {key: "\n".join(t for t in parts if t) for key, parts in groups.items()}
        checks = {key: self._timed(check, "harm", "output", self.client.analyze(text)) for key, text in texts.items() if text.strip()}
        if not checks:
            return result
        outcomes = dict(zip(checks, await asyncio.gather(*checks.values())))
        changed = copy.deepcopy(body)
        blocked = []
        for key, (_, severities) in outcomes.items():
            if severities is None:
                continue
            failed = {c: severities[c] for c, threshold in check.policy.output_thresholds if severities.get(c, 0) >= threshold}
            if not failed:
                continue
            blocked.extend(failed)
            _withhold(changed, key, _filter_results(severities, failed))
        if not blocked:
            return result
        check.decisions.append({"check": "output", "action": "block", "categories": sorted(set(blocked))})
        if ctx.model_response is None:  # the log and the cache keep what the model answered
            ctx.model_response = body
        result.json, result.body = changed, orjson.dumps(changed)
        return result

    async def _windows(self, ctx: RequestContext, check: SafetyCheck, events: AsyncIterator[sse.Event]) -> AsyncIterator[sse.Event]:
        """A chunk stream, released window by window once each is checked (module docstring)."""
        writes = ctx.route.operation.stream_writes
        held: list[sse.Event] = []
        unchecked: dict[int, str] = {}  # choice index → text since its last check
        released: dict[int, str] = {}  # choice index → the end of its released text (context for the next window)
        blocked: dict[int, dict[str, Any]] = {}  # choice index → its content_filter_results
        last: dict[str, Any] = {}  # the latest chunk's id, created, model: for the chunk that ends a blocked choice

        async def check_windows(indexes: list[int]) -> list[sse.Event]:
            """Check the held text of these choices; the events to release (blocked pieces removed,
            each blocked choice ended)."""
            wanted = [i for i in indexes if unchecked.get(i, "").strip() and i not in blocked]
            if wanted:
                outcomes = await asyncio.gather(*(self._timed_window(check, released.get(i, "") + unchecked[i]) for i in wanted))
                for index, verdict in zip(wanted, outcomes):
                    if verdict is not None:
                        blocked[index] = verdict
            for index in indexes:
                released[index] = (released.get(index, "") + unchecked.pop(index, ""))[-CONTEXT_CHARS:]
            out = []
            for event in held:
                kept = _without_choices(event, blocked, writes)
                if kept is not None:
                    out.append(kept)
            held.clear()
            for index in [i for i in wanted if i in blocked]:
                out.append(_ending(last, index, blocked[index]))
                check.decisions.append({"check": "output", "action": "block", "direction": "output",
                                        "categories": [c for c, r in blocked[index].items() if r.get("filtered")]})
            return out

        try:
            async for event in events:
                payload = event.payload
                choices = payload.get("choices") if isinstance(payload, dict) else None
                if not isinstance(choices, list) or not choices:
                    # Not a piece of an answer (the usage chunk, [DONE]): what is held is checked first.
                    for out in await check_windows(list(unchecked)):
                        yield out
                    yield event
                    continue
                last = {k: payload.get(k) for k in ("id", "object", "created", "model", "system_fingerprint") if k in payload}
                ending = []
                carries_text = False
                for location in writes.locations(payload):
                    index = location.indexes[0]
                    unchecked[index] = unchecked.get(index, "") + location.text
                    carries_text = carries_text or bool(location.text)
                for position, choice in enumerate(choices):
                    if isinstance(choice, dict) and choice.get("finish_reason"):
                        ending.append(choice.get("index", position))
                if all(isinstance(c, dict) and c.get("index", p) in blocked for p, c in enumerate(choices)):
                    continue  # only blocked choices: nothing of theirs goes out
                if not carries_text and not held and not ending:
                    yield event  # nothing to check (the role chunk): it need not wait for a window
                    continue
                held.append(event)
                due = [i for i, text in unchecked.items() if len(text) >= _window(check.policy, i in released)]
                if ending or due:
                    for out in await check_windows(sorted(set(due) | set(ending))):
                        yield out
            for out in await check_windows(list(unchecked)):
                yield out
        finally:
            await sse.close(events)

    async def _response_windows(self, check: SafetyCheck, events: AsyncIterator[sse.Event]) -> AsyncIterator[sse.Event]:
        """A Responses stream, released window by window: events are held while the text their
        deltas carry since the last check is short of a window; an event that closes a part
        (`.done`, the final response) waits for the check of everything before it. A failing
        window ends the stream with `response.incomplete` (reason content_filter)."""
        held: list[sse.Event] = []
        unchecked, context = "", ""
        response: dict[str, Any] = {}
        ended = False
        try:
            async for event in events:
                payload = event.payload if isinstance(event.payload, dict) else {}
                kind = payload.get("type") or ""
                if isinstance(payload.get("response"), dict):
                    response = payload["response"]
                if ended:
                    continue  # read to the end for the usage, relay nothing
                held.append(event)
                if kind in _RESPONSE_TEXT_DELTAS:
                    unchecked += payload.get("delta") or ""
                    if len(unchecked) < _window(check.policy, bool(context)):
                        continue
                elif not (kind.endswith(".done") or kind in _FINAL_RESPONSE_EVENTS) and unchecked:
                    continue  # an event between deltas stays in order behind them
                verdict = await self._timed_window(check, context + unchecked) if unchecked.strip() else None
                context, unchecked = (context + unchecked)[-CONTEXT_CHARS:], ""
                if verdict is None:
                    for out in held:
                        yield out
                    held.clear()
                    continue
                held.clear()
                ended = True
                check.decisions.append({"check": "output", "action": "block", "direction": "output",
                                        "categories": [c for c, r in verdict.items() if r.get("filtered")]})
                stopped = {**response, "status": "incomplete", "incomplete_details": {"reason": "content_filter"}, "output": []}
                yield sse.Event.of({"type": "response.incomplete", "response": stopped}, "response.incomplete")
            if held and not ended:
                verdict = await self._timed_window(check, context + unchecked) if unchecked.strip() else None
                if verdict is None:
                    for out in held:
                        yield out
        finally:
            await sse.close(events)

    async def _timed_window(self, check: SafetyCheck, text: str) -> dict[str, Any] | None:
        """A window's verdict: its content_filter_results if it fails, else None. A failure to
        check fails the window when the policy says closed."""
        try:
            _, severities = await self._timed(check, "harm", "output", self.client.analyze(text))
        except GatewayError:  # closed, and the service could not check the window
            return {"error": {"filtered": True, "reason": "content_safety_unavailable"}}
        if severities is None:
            return None
        failed = {c: severities[c] for c, threshold in check.policy.output_thresholds if severities.get(c, 0) >= threshold}
        return _filter_results(severities, failed) if failed else None

    async def finish(self, ctx: RequestContext) -> None:
        check = ctx.safety
        if check is not None and check.pending is not None:
            # The request ended (refused by a later stage) before anyone waited for its check.
            if check.pending.done():
                if not check.pending.cancelled():
                    check.pending.exception()  # retrieved: its refusal no longer matters
            else:
                check.pending.cancel()

    def record(self, ctx: RequestContext) -> dict[str, Any]:
        return {"safety": ctx.safety.decisions} if ctx.safety is not None and ctx.safety.decisions else {}


async def checks_passed(ctx: RequestContext) -> None:
    """Wait for the input checks started on the way in; raises the refusal if one failed."""
    check = ctx.safety
    if check is not None and check.pending is not None:
        pending, check.pending = check.pending, None
        await pending


def _window(policy: SafetyPolicy, started: bool) -> int:
    """Characters held before a check: a smaller first window, so that the answer starts sooner."""
    return policy.window_chars if started else min(policy.first_window_chars, policy.window_chars)


_RESPONSE_TEXT_DELTAS = ("response.output_text.delta", "response.refusal.delta")
_FINAL_RESPONSE_EVENTS = ("response.completed", "response.incomplete", "response.failed")


def _withhold(body: dict[str, Any], key: int, results: dict[str, Any]) -> None:
    """Withhold the text of a whole answer's choice (key ≥ 0) or of the whole output (-1)."""
    if key >= 0:
        for choice in body.get("choices") or ():
            if isinstance(choice, dict) and choice.get("index", 0) == key:
                message = choice.get("message")
                if isinstance(message, dict):
                    message["content"] = None
                    message.pop("tool_calls", None)
                    message.pop("function_call", None)
                if "text" in choice:
                    choice["text"] = ""
                choice["finish_reason"] = "content_filter"
                choice["content_filter_results"] = results
                choice["logprobs"] = None
        return
    if body.get("object") == "response":
        body["output"] = []
        body["status"] = "incomplete"
        body["incomplete_details"] = {"reason": "content_filter"}
        body["output_text"] = ""


def _without_choices(event: sse.Event, blocked: dict[int, Any], writes) -> sse.Event | None:
    """The event without the pieces of blocked choices; None if nothing is left of it."""
    if not blocked:
        return event
    payload = event.payload
    choices = payload.get("choices") if isinstance(payload, dict) else None
    if not isinstance(choices, list):
        return event
    kept = [c for p, c in enumerate(choices) if not (isinstance(c, dict) and c.get("index", p) in blocked)]
    if len(kept) == len(choices):
        return event
    if not kept:
        return None
    event.changed({**payload, "choices": kept})
    return event


def _ending(last: dict[str, Any], index: int, results: dict[str, Any]) -> sse.Event:
    """The chunk that ends a blocked choice, as Azure OpenAI ends a filtered one."""
    choice = {"index": index, "delta": {}, "finish_reason": "content_filter", "content_filter_results": results}
    if last.get("object") == "text_completion":
        choice = {"index": index, "text": "", "finish_reason": "content_filter", "content_filter_results": results}
    return sse.Event.of({**last, "choices": [choice]})
