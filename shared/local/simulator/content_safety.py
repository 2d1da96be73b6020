"""Azure AI Content Safety, simulated: the two text operations the gateway calls, on the same
server as the Azure OpenAI simulator (point SEKISHO_CONTENT_SAFETY_ENDPOINT at it).

- `POST /contentsafety/text:analyze?api-version=2024-09-01` `{"text", "categories"?, "outputType"?}`
  → `{"blocklistsMatch": [], "categoriesAnalysis": [{"category": "Hate", "severity": 0}, ...]}`
- `POST /contentsafety/text:shieldPrompt?api-version=2024-09-01` `{"userPrompt", "documents"}`
  → `{"userPromptAnalysis": {"attackDetected": bool}, "documentsAnalysis": [{"attackDetected": bool}]}`

Verdicts are deterministic, from markers in the text, so tests and `make run` can produce every
outcome through the real client code:
- `[[cs:hate=4]]` (also `sexual`, `violence`, `self_harm`, severity 0–7): that category's
  severity, rounded down to 0, 2, 4 or 6 as the service does for FourSeverityLevels;
- `[[cs:attack]]`: a prompt attack (jailbreak in the user prompt, indirect attack in a document);
- `[[cs:slow=MS]]`: the answer comes MS milliseconds late; `[[cs:fail=STATUS]]`: an error answer.
Requests need the api-key the simulator was started with (`Ocp-Apim-Subscription-Key`) or any
Bearer token (Entra ID, which the simulator does not verify). The service's limits apply: 10,000
characters of text per analysis; a user prompt of at most 10,000 characters and documents of at
most 10,000 together.
"""
from __future__ import annotations

import asyncio
import re

from aiohttp import web

API_VERSIONS = ("2024-09-01", "2023-10-01")
CATEGORIES = {"hate": "Hate", "sexual": "Sexual", "violence": "Violence", "self_harm": "SelfHarm"}
_MARKER = re.compile(r"\[\[cs:(hate|sexual|violence|self_harm|attack|slow|fail)(?:=(\d+))?\]\]")
MAX_TEXT = 10_000


def _markers(text: str) -> list[tuple[str, int]]:
    return [(name, int(value or 0)) for name, value in _MARKER.findall(text)]


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


class SimulatedContentSafety:
    def __init__(self, api_key: str | None, latency_ms: float = 0.0) -> None:
        self.api_key = api_key
        self.latency = latency_ms / 1000
        self.calls = 0

    def _refusal(self, request: web.Request) -> web.Response | None:
        if request.query.get("api-version") not in API_VERSIONS:
            return _error(400, "InvalidRequestBody", "The api-version is missing or not supported.")
        authorized = request.headers.get("Authorization", "").startswith("Bearer ") or \
            (not self.api_key or request.headers.get("Ocp-Apim-Subscription-Key") == self.api_key)
        if not authorized:
            return _error(401, "Unauthorized", "Access denied due to invalid subscription key or wrong API endpoint.")
        return None

    async def _delay_or_fail(self, text: str) -> web.Response | None:
        if self.latency:
            await asyncio.sleep(self.latency)
        for name, value in _markers(text):
            if name == "slow":
                await asyncio.sleep(value / 1000)
            elif name == "fail":
                return _error(value or 500, "InternalServerError", "The service failed (simulated).")
        return None

    async def analyze(self, request: web.Request) -> web.Response:
        self.calls += 1
        refused = self._refusal(request)
        if refused is not None:
            return refused
        body = await request.json()
        text = body.get("text")
        if not isinstance(text, str) or not text:
            return _error(400, "InvalidRequestBody", "text is required.")
        if len(text) > MAX_TEXT:
            return _error(400, "InvalidRequestBody", f"The text is longer than {MAX_TEXT} characters.")
        failed = await self._delay_or_fail(text)
        if failed is not None:
            return failed
        wanted = body.get("categories") or list(CATEGORIES.values())
        severities = {name: 0 for name in CATEGORIES}
        for name, value in _markers(text):
            if name in severities:
                severities[name] = max(severities[name], min(7, value))
        four_levels = body.get("outputType", "FourSeverityLevels") == "FourSeverityLevels"
        analysis = [{"category": CATEGORIES[name], "severity": (value // 2) * 2 if four_levels else value}
                    for name, value in severities.items() if CATEGORIES[name] in wanted]
        return web.json_response({"blocklistsMatch": [], "categoriesAnalysis": analysis})

    async def shield_prompt(self, request: web.Request) -> web.Response:
        self.calls += 1
        refused = self._refusal(request)
        if refused is not None:
            return refused
        body = await request.json()
        prompt, documents = body.get("userPrompt") or "", body.get("documents") or []
        if not isinstance(prompt, str) or not isinstance(documents, list) or not all(isinstance(d, str) for d in documents):
            return _error(400, "InvalidRequestBody", "userPrompt must be a string and documents a list of strings.")
        if len(prompt) > MAX_TEXT or sum(len(d) for d in documents) > MAX_TEXT:
            return _error(400, "InvalidRequestBody", f"The user prompt and the documents are each limited to {MAX_TEXT} characters.")
        failed = await self._delay_or_fail(prompt + "".join(documents))
        if failed is not None:
            return failed

        def attacked(text: str) -> bool:
            return any(name == "attack" for name, _ in _markers(text))

        return web.json_response({"userPromptAnalysis": {"attackDetected": attacked(prompt)},
                                  "documentsAnalysis": [{"attackDetected": attacked(d)} for d in documents]})

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/contentsafety/text:analyze", self.analyze)
        app.router.add_post("/contentsafety/text:shieldPrompt", self.shield_prompt)
