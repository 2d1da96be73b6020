"""The simulator's HTTP app (aiohttp).

Controls, all optional:
- Start-up config (`SimulatorConfig`): deployments served, added latency, stream chunk
  interval, the api-key it demands.
- Per request, an `x_sim` object in the JSON body (unknown fields reach the upstream unchanged,
  so a client can steer the simulator through the gateway): `latency_ms`, `chunk_interval_ms`,
  `chunks`, `reply` (exact reply text), `fail` (429/500/503 …), `retry_after_ms`,
  `break_after_chunks` (drop the connection mid-stream), `annotations` (Azure's delta-less
  content-filter chunks), `set_cookie` (a Set-Cookie header on the answer, as an affinity cookie),
  `tool_calls` (a list of `{"name", "arguments"}`: the model calls these tools instead of
  answering; Responses: function_call output items), `refusal` (the model refuses with this text),
  `echo` (the reply is the last user message's text, as the model received it).
- Control routes: `POST /_sim/faults` `{"status": 429, "count": 2, "retry_after_ms": 1000,
  "deployment": "…"}` makes the next matching requests fail; `POST /_sim/reset`; `GET /_sim/stats`
  lists the requests received (time, path, deployment, status) for tests that measure retries.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from . import generator as gen
from . import media
from .batches import SimulatedBatches
from .content_safety import SimulatedContentSafety
from ...upstream import api_versions

CHAT_MODELS = {"gpt-4o-mini": "gpt-4o-mini-2024-07-18", "gpt-4o": "gpt-4o-2024-11-20", "gpt-4.1": "gpt-4.1-2025-04-14"}
EMBEDDING_MODELS = {"text-embedding-3-small": ("text-embedding-3-small", 1536), "text-embedding-3-large": ("text-embedding-3-large", 3072)}
_FILTER_OK = {
    "hate": {"filtered": False, "severity": "safe"},
    "self_harm": {"filtered": False, "severity": "safe"},
    "sexual": {"filtered": False, "severity": "safe"},
    "violence": {"filtered": False, "severity": "safe"},
}


# What real Azure-compatible upstreams do differently from Azure OpenAI, on demand (--quirks):
QUIRKS = {
    "no_content_type": "streams are sent without a Content-Type",
    "no_usage": "no usage, ever: no usage chunk even when asked for, no usage in streamed chunks",
    "finish_in_delta": "a stream's finish_reason inside `delta` instead of on the choice",
    "bare_done": "a stream ends with a bare `[DONE]` line instead of `data: [DONE]`",
    "no_v1": "no /openai/v1/ routes: they answer an empty 500",
}


@dataclass
class Fault:
    status: int
    remaining: int
    retry_after_ms: int = 1000
    deployment: str | None = None


@dataclass
class SimulatorConfig:
    chat_deployments: dict[str, str] = field(default_factory=lambda: dict(CHAT_MODELS))
    embedding_deployments: dict[str, tuple[str, int]] = field(default_factory=lambda: dict(EMBEDDING_MODELS))
    latency_ms: float = 0.0
    chunk_interval_ms: float = 0.0
    api_key: str | None = None
    quirks: frozenset[str] = frozenset()  # QUIRKS: behave like Azure-compatible servers that are not Azure
    batch_seconds: float = 2.0  # how long a batch runs (its metadata's x_sim_seconds wins)
    content_safety_latency_ms: float = 0.0  # added before every Content Safety answer
    background_ms: float = 500.0  # how long a background response runs (x_sim.background_ms wins)


class Simulator:
    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.faults: list[Fault] = []
        self.received: list[dict[str, Any]] = []
        self.stored: dict[str, dict[str, Any]] = {}  # stored responses: id → {response, input}
        self.files_stored: dict[str, dict[str, Any]] = {}  # files: id → {object, content}
        self.batches = SimulatedBatches(self, config.batch_seconds)

    # Helpers -----------------------------------------------------------------------
    def _record(self, request: web.Request, deployment: str | None, status: int) -> None:
        self.received.append({"t": time.time(), "path": request.path, "deployment": deployment, "status": status,
                              "client_request_id": request.headers.get("x-ms-client-request-id"),
                              "cookie": request.headers.get("Cookie")})
        if len(self.received) > 10_000:
            del self.received[:5_000]

    def _take_fault(self, deployment: str | None) -> Fault | None:
        for fault in self.faults:
            if fault.remaining > 0 and (fault.deployment is None or fault.deployment == deployment):
                fault.remaining -= 1
                return fault
        return None

    @staticmethod
    def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
        body = orjson.dumps({"error": {"code": code, "message": message}})
        return web.Response(body=body, status=status, content_type="application/json", headers=headers)

    def _failure(self, status: int, retry_after_ms: int) -> web.Response:
        if status == 429:
            seconds = max(1, -(-retry_after_ms // 1000))
            headers = {"Retry-After": str(seconds), "retry-after-ms": str(retry_after_ms), "x-ratelimit-remaining-requests": "0"}
            return self._error(429, "429", f"Requests to the ChatCompletions_Create Operation have exceeded call rate limit. Please retry after {seconds} seconds.", headers)
        return self._error(status, "InternalServerError" if status == 500 else str(status), "The server had an error while processing your request (simulated).")

    def _authorized(self, request: web.Request) -> bool:
        if not self.config.api_key:
            return True
        if request.headers.get("api-key") == self.config.api_key:
            return True
        return request.headers.get("Authorization", "").startswith("Bearer ")

    def _headers(self, request_id: str) -> dict[str, str]:
        return {
            "apim-request-id": request_id,
            "x-request-id": request_id,
            "x-ms-region": "Simulated Region",
            "x-ratelimit-remaining-requests": "999",
            "x-ratelimit-remaining-tokens": "999000",
        }

    # Entry point ----------------------------------------------------------------------
    async def handle(self, request: web.Request, operation: str) -> web.StreamResponse:
        deployment = request.match_info.get("deployment")
        if not self._authorized(request):
            self._record(request, deployment, 401)
            return self._error(401, "401", "Access denied due to invalid subscription key or wrong API endpoint.")
        if "no_v1" in self.config.quirks and request.path.startswith("/openai/v1/"):
            self._record(request, deployment, 500)
            return web.Response(status=500)  # what some servers answer for a path they lack
        if "deployment" in request.match_info and "api-version" not in request.query:
            self._record(request, deployment, 404)
            return self._error(404, "404", "Resource not found (api-version is missing).")
        uploads: dict[str, bytes] = {}
        if operation in _MULTIPART:
            try:
                body, uploads = await _form(request)
            except Exception:
                self._record(request, deployment, 400)
                return self._error(400, "invalid_request_error", "We could not parse the multipart body of your request.")
        else:
            try:
                body = orjson.loads(await request.read())
                assert isinstance(body, dict)
            except Exception:
                self._record(request, deployment, 400)
                return self._error(400, "invalid_request_error", "We could not parse the JSON body of your request.")
        deployment = deployment or body.get("model")
        if "stream_options" in body and "api-version" in request.query and not api_versions.accepts(request.query["api-version"], "stream_options"):
            # Azure checks fields against the api-version: stream_options arrived in 2024-09-01-preview / 2024-10-21.
            self._record(request, deployment, 400)
            return self._error(400, None, "Unrecognized request argument supplied: stream_options")
        if operation not in _MULTIPART:
            for name in _INTEGER_FIELDS:  # as Azure answers 2.0 where it takes an integer
                if isinstance(body.get(name), float):
                    self._record(request, deployment, 400)
                    return self._invalid_type(name, "an integer", body[name])
        controls = body.get("x_sim") if isinstance(body.get("x_sim"), dict) else {}
        if isinstance(controls.get("set_cookie"), str):
            request["set_cookie"] = controls["set_cookie"]
        latency = float(controls.get("latency_ms", self.config.latency_ms)) / 1000.0
        if latency > 0:
            await asyncio.sleep(latency)
        fault = self._take_fault(deployment)
        if fault is not None or controls.get("fail"):
            status = fault.status if fault else int(controls["fail"])
            retry_ms = fault.retry_after_ms if fault else int(controls.get("retry_after_ms", 1000))
            self._record(request, deployment, status)
            return self._failure(status, retry_ms)
        kind = next((kind for kind, models in self._kinds() if deployment in models), None)
        if kind is None:
            self._record(request, deployment, 404)
            return self._error(404, "DeploymentNotFound", f"The API deployment {deployment} for this resource does not exist.")
        if kind != _KIND_OF[operation]:
            self._record(request, deployment, 400)
            return self._error(400, "OperationNotSupported", f"The {operation} operation does not work with the specified model, {deployment}.")
        self._record(request, deployment, 200)
        request_id = str(uuid.uuid4())
        if operation in _MULTIPART or operation.startswith(("audio/", "images/")):
            return await self._media(request, operation, deployment, body, uploads, controls, request_id)
        handler = {"chat/completions": self._chat, "completions": self._completions, "embeddings": self._embeddings, "responses": self._responses}[operation]
        return await handler(request, deployment, body, controls, request_id)

    def _kinds(self):
        return (("chat", self.config.chat_deployments), ("embeddings", self.config.embedding_deployments),
                ("transcribe", media.TRANSCRIBE_MODELS), ("speech", media.SPEECH_MODELS), ("image", media.IMAGE_MODELS))

    async def _media(self, request, operation, deployment, body, uploads, controls, request_id) -> web.StreamResponse:
        headers = self._headers(request_id)
        for name, expected in _MEDIA_FIELDS.get(operation, {}).items():  # as Azure checks what it owns
            value = body.get(name)
            if value is None:
                continue
            if isinstance(expected, (tuple, range)) and (isinstance(value, bool) or value not in expected):
                supported = f"{expected.start} to {expected.stop - 1}" if isinstance(expected, range) else ", ".join(f"'{c}'" for c in expected)
                return web.json_response({"error": {"message": f"Invalid value: {str(value)[:64]!r}. Supported values are: {supported}.",
                                                    "type": "invalid_request_error", "param": name, "code": "invalid_value"}}, status=400)
            if isinstance(expected, type) and (not isinstance(value, expected) or isinstance(value, bool)):
                return self._invalid_type(name, _TYPE_WORDS[expected], value)
        if operation in ("audio/transcriptions", "audio/translations"):
            audio = uploads.get("file")
            if not audio:
                return self._error(400, "invalid_request_error", "'file' is a required property")
            model = media.TRANSCRIBE_MODELS[deployment]
            text, seconds = media.transcript(audio, controls)
            prompt = body.get("prompt") if isinstance(body.get("prompt"), str) else ""
            if body.get("stream") == "true" and media.token_usage(model):
                return await self._stream(request, media.transcription_events(text, seconds, prompt, controls.get("chunks")), controls, headers)
            task = "transcribe" if operation.endswith("transcriptions") else "translate"
            answer, content_type = media.transcription_answer(model, task, text, seconds, prompt, str(body.get("response_format") or "json"))
            return web.Response(body=answer, headers={**headers, "Content-Type": content_type})
        if operation == "audio/speech":
            audio, content_type = media.speech(str(body.get("input") or ""), str(body.get("response_format") or "mp3"))
            response = web.StreamResponse(status=200, headers={**headers, "Content-Type": content_type})
            await response.prepare(request)
            interval = float(controls.get("chunk_interval_ms", self.config.chunk_interval_ms)) / 1000.0
            for start in range(0, len(audio), 4096):  # sent as it is "spoken"
                if interval > 0 and start:
                    await asyncio.sleep(interval)
                await response.write(audio[start : start + 4096])
            await response.write_eof()
            return response
        if operation == "images/edits" and not (uploads.get("image") or uploads.get("image[]")):
            return self._error(400, "invalid_request_error", "'image' is a required property")
        base_url = f"{request.scheme}://{request.host}"
        return web.json_response(media.images_answer(media.IMAGE_MODELS[deployment], body, controls, base_url), headers=headers)

    async def stored_response(self, request: web.Request) -> web.Response:
        """GET / DELETE a stored response, its input items, or cancel it."""
        if not self._authorized(request):
            return self._error(401, "401", "Access denied due to invalid subscription key or wrong API endpoint.")
        response_id = request.match_info["response_id"]
        stored = self.stored.get(response_id)
        self._record(request, None, 200 if stored else 404)
        if stored is None:
            return self._error(404, "not_found", f"Response with id '{response_id}' not found.")
        what = request.match_info.get("what")
        if what == "input_items":
            data = stored["input"]
            return web.json_response({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                                      "last_id": data[-1]["id"] if data else None, "has_more": False})
        running = stored.get("ready_at") is not None and time.monotonic() < stored["ready_at"]
        if what == "cancel":
            if not stored["response"].get("background"):
                return self._error(400, "invalid_request_error", "Only responses created with background=true can be cancelled.")
            if running:
                stored["response"] = {**stored["response"], "status": "cancelled", "output": [], "usage": None}
                stored["ready_at"] = None
            return web.json_response(stored["response"])
        if request.method == "DELETE":
            del self.stored[response_id]
            return web.json_response({"id": response_id, "object": "response.deleted", "deleted": True})
        if running:  # a background response still being written
            return web.json_response({**stored["response"], "status": "in_progress", "output": [], "usage": None})
        return web.json_response(stored["response"])

    async def files(self, request: web.Request) -> web.StreamResponse:
        """Files: upload (multipart: file, purpose), list, retrieve, delete, content."""
        if not self._authorized(request):
            return self._error(401, "401", "Access denied due to invalid subscription key or wrong API endpoint.")
        file_id = request.match_info.get("file_id")
        self._record(request, None, 200)
        if file_id is None:
            if request.method == "GET":
                return web.json_response({"object": "list", "data": [f["object"] for f in self.files_stored.values()]})
            try:
                fields, uploads = await _form(request)
            except Exception:  # as Azure answers a form it cannot read (a field name with a control character)
                return self._error(400, "invalid_request_error", "We could not parse the multipart body of your request.")
            content = uploads.get("file")
            if content is None or "purpose" not in fields:
                return self._error(400, "invalid_request_error", "'file' and 'purpose' are required.")
            new_id = "file-" + uuid.uuid4().hex
            obj = {"id": new_id, "object": "file", "bytes": len(content), "created_at": int(time.time()), "filename": fields.get("_filename", "upload"),
                   "purpose": fields["purpose"], "status": "processed", "status_details": None}
            self.files_stored[new_id] = {"object": obj, "content": content}
            return web.json_response(obj)
        stored = self.files_stored.get(file_id)
        if stored is None:
            return self._error(404, "not_found", f"File with id '{file_id}' not found.")
        if request.match_info.get("what") == "content":
            return web.Response(body=stored["content"], content_type="application/octet-stream")
        if request.method == "DELETE":
            del self.files_stored[file_id]
            return web.json_response({"id": file_id, "object": "file", "deleted": True})
        return web.json_response(stored["object"])

    async def image_file(self, request: web.Request) -> web.Response:
        return web.Response(body=media.png(bytes.fromhex(request.match_info["name"])), content_type="image/png")

    # Operations -------------------------------------------------------------------------
    def _reply(self, body: dict[str, Any], controls: dict[str, Any], prompt: Any, limit: int | None, index: int = 0) -> list[str]:
        if isinstance(controls.get("reply"), str):
            return gen.split_reply(controls["reply"], controls.get("chunks"))
        if controls.get("echo"):
            return gen.split_reply(_last_user_text(prompt) or "(nothing to echo)", controls.get("chunks"))
        structured = _structured_reply(body, gen.seed_of(prompt, index))
        if structured is not None:
            return gen.split_reply(structured, controls.get("chunks") or max(1, len(structured) // 12))
        seed = gen.seed_of(prompt, body.get("temperature"), index)
        tokens = gen.reply_tokens(seed, limit)
        chunks = controls.get("chunks")
        return gen.split_reply("".join(tokens), chunks) if chunks else tokens

    async def _stream(self, request: web.Request, events: list[bytes], controls: dict[str, Any], headers: dict[str, str]) -> web.StreamResponse:
        quirks = self.config.quirks
        stream_headers = {**headers, "Cache-Control": "no-cache"}
        if "no_content_type" not in quirks:
            stream_headers["Content-Type"] = "text/event-stream; charset=utf-8"
        if "bare_done" in quirks and events and events[-1] == b"data: [DONE]\n\n":
            events = [*events[:-1], b"[DONE]\n\n"]
        response = web.StreamResponse(status=200, headers=stream_headers)
        await response.prepare(request)
        interval = float(controls.get("chunk_interval_ms", self.config.chunk_interval_ms)) / 1000.0
        break_after = controls.get("break_after_chunks")
        number, paced, due = 0, 0, time.monotonic()
        try:
            for number, event in enumerate(events):
                if break_after is not None and number >= int(break_after):
                    request.transport.close()  # the upstream dies mid-stream
                    return response
                if interval > 0 and number > 0 and not _trails(event):
                    # On a fixed schedule, as a model generates: a slow reader does not slow it down.
                    paced += 1
                    await asyncio.sleep(max(0.0, due + paced * interval - time.monotonic()))
                await response.write(event)
            await response.write_eof()
            self._stream_ended(request, "complete", len(events))
        except ConnectionError:
            self._stream_ended(request, "caller_left", number)  # the caller went away mid-stream
        except asyncio.CancelledError:
            self._stream_ended(request, "caller_left", number)
            raise
        return response

    def _stream_ended(self, request: web.Request, how: str, events_sent: int) -> None:
        """Tests check that a stream the gateway gave up on was really cut at the upstream."""
        client_id = request.headers.get("x-ms-client-request-id")
        for entry in reversed(self.received):
            if entry.get("client_request_id") == client_id:
                entry.update(stream_end=how, events_sent=events_sent)
                break

    async def _chat(self, request, deployment, body, controls, request_id):
        messages = body.get("messages") or []
        model = self.config.chat_deployments[deployment]
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        n = int(body.get("n") or 1)
        replies = [self._reply(body, controls, messages, limit, i) for i in range(n)]
        prompt_tokens = gen.prompt_tokens_for_messages(messages)
        completion_tokens = sum(gen.count_tokens("".join(r)) for r in replies)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0, "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
        }
        finish = "length" if limit is not None and len(replies[0]) >= int(limit) else "stop"
        created = int(time.time())
        completion_id = "chatcmpl-" + request_id.replace("-", "")[:29]
        fingerprint = "fp_b705f0c291"
        headers = self._headers(request_id)
        calls = _tool_calls(controls, request_id) or _offered_tool_calls(body, messages, request_id)
        refusal = controls.get("refusal") if isinstance(controls.get("refusal"), str) else None
        if calls:
            finish = "tool_calls"
        if "no_usage" in self.config.quirks:
            usage = None
        if not body.get("stream"):
            def message(reply: list[str]) -> dict[str, Any]:
                if calls:
                    return {"role": "assistant", "content": None, "refusal": None, "annotations": [],
                            "tool_calls": [{"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls]}
                if refusal is not None:
                    return {"role": "assistant", "content": None, "refusal": refusal, "annotations": []}
                return {"role": "assistant", "content": "".join(reply), "refusal": None, "annotations": []}

            payload = {
                "id": completion_id, "object": "chat.completion", "created": created, "model": model,
                "system_fingerprint": fingerprint,
                "choices": [
                    {"index": i, "message": message(r), "finish_reason": finish, "logprobs": None, "content_filter_results": _FILTER_OK}
                    for i, r in enumerate(replies)
                ],
                "usage": usage,
                "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": _FILTER_OK}],
            }
            return web.Response(body=orjson.dumps(payload), content_type="application/json", headers=headers)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage")) and "no_usage" not in self.config.quirks
        base = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model, "system_fingerprint": fingerprint}
        if include_usage:
            base["usage"] = None

        def chunk(choices):
            return b"data: " + orjson.dumps({**base, "choices": choices}) + b"\n\n"

        events = [b"data: " + orjson.dumps({"choices": [], "created": 0, "id": "", "model": "", "object": "", "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": _FILTER_OK}]}) + b"\n\n"]
        for i in range(n):
            events.append(chunk([{"index": i, "delta": {"role": "assistant", "content": "", "refusal": None}, "finish_reason": None, "logprobs": None, "content_filter_results": {}}]))
        if calls:
            for i in range(n):
                for number, call in enumerate(calls):
                    events.append(chunk([{"index": i, "delta": {"tool_calls": [{"index": number, "id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": ""}}]}, "finish_reason": None, "logprobs": None}]))
                    for piece in gen.split_reply(call["arguments"], controls.get("chunks")):
                        events.append(chunk([{"index": i, "delta": {"tool_calls": [{"index": number, "function": {"arguments": piece}}]}, "finish_reason": None, "logprobs": None}]))
        elif refusal is not None:
            for i in range(n):
                for piece in gen.split_reply(refusal, controls.get("chunks")):
                    events.append(chunk([{"index": i, "delta": {"refusal": piece}, "finish_reason": None, "logprobs": None}]))
        else:
            for position in range(max(len(r) for r in replies)):
                for i, reply in enumerate(replies):
                    if position < len(reply):
                        events.append(chunk([{"index": i, "delta": {"content": reply[position]}, "finish_reason": None, "logprobs": None, "content_filter_results": _FILTER_OK}]))
        if controls.get("annotations"):
            for i in range(n):
                events.append(chunk([{"index": i, "finish_reason": None, "content_filter_offsets": {"check_offset": 0, "start_offset": 0, "end_offset": 10}, "content_filter_results": _FILTER_OK}]))
        for i in range(n):
            if "finish_in_delta" in self.config.quirks:
                events.append(chunk([{"index": i, "delta": {"finish_reason": finish}}]))
            else:
                events.append(chunk([{"index": i, "delta": {}, "finish_reason": finish, "logprobs": None, "content_filter_results": {}}]))
        if include_usage:
            events.append(b"data: " + orjson.dumps({**base, "choices": [], "usage": usage}) + b"\n\n")
        events.append(b"data: [DONE]\n\n")
        return await self._stream(request, events, controls, headers)

    async def _completions(self, request, deployment, body, controls, request_id):
        prompt = body.get("prompt")
        model = self.config.chat_deployments[deployment]
        limit = body.get("max_tokens") or 16  # the completions API's own default
        reply = self._reply(body, controls, prompt, int(limit))
        prompt_tokens = gen.count_tokens(gen.text_of(prompt))
        completion_tokens = gen.count_tokens("".join(reply))
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}
        finish = "length" if len(reply) >= int(limit) else "stop"
        base = {"id": "cmpl-" + request_id.replace("-", "")[:29], "object": "text_completion", "created": int(time.time()), "model": model}
        headers = self._headers(request_id)
        if not body.get("stream"):
            payload = {**base, "choices": [{"text": "".join(reply), "index": 0, "finish_reason": finish, "logprobs": None}], "usage": usage}
            return web.Response(body=orjson.dumps(payload), content_type="application/json", headers=headers)
        events = [b"data: " + orjson.dumps({**base, "choices": [{"text": piece, "index": 0, "finish_reason": None, "logprobs": None}]}) + b"\n\n" for piece in reply]
        events.append(b"data: " + orjson.dumps({**base, "choices": [{"text": "", "index": 0, "finish_reason": finish, "logprobs": None}]}) + b"\n\n")
        if (body.get("stream_options") or {}).get("include_usage") and "no_usage" not in self.config.quirks:
            events.append(b"data: " + orjson.dumps({**base, "choices": [], "usage": usage}) + b"\n\n")
        events.append(b"data: [DONE]\n\n")
        return await self._stream(request, events, controls, headers)

    async def _embeddings(self, request, deployment, body, controls, request_id):
        model, native = self.config.embedding_deployments[deployment]
        dimensions = body.get("dimensions") or native
        if not isinstance(dimensions, int) or not 1 <= dimensions <= native:
            return self._error(400, "invalid_request_error", f"dimensions must be between 1 and {native}.")
        inputs = body.get("input")
        if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        data, tokens = [], 0
        for index, item in enumerate(inputs or []):
            text = item if isinstance(item, str) else " ".join(map(str, item))
            tokens += len(item) if isinstance(item, list) else gen.count_tokens(text)
            vector = gen.embedding(text, dimensions)
            value: Any = gen.encode_base64(vector) if body.get("encoding_format") == "base64" else vector
            data.append({"object": "embedding", "index": index, "embedding": value})
        payload = {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        return web.Response(body=orjson.dumps(payload), content_type="application/json", headers=self._headers(request_id))

    async def _responses(self, request, deployment, body, controls, request_id):
        previous = body.get("previous_response_id")
        if previous is not None and previous not in self.stored:
            return web.json_response({"error": {"message": f"Previous response with id '{previous}' not found.", "type": "invalid_request_error",
                                                 "param": "previous_response_id", "code": "previous_response_not_found"}}, status=400)
        items = body.get("input")
        if not isinstance(items, (str, list)):
            return self._invalid_type("input", "a string or an array of input items", items)
        for index, item in enumerate(items if isinstance(items, list) else []):
            if not isinstance(item, dict):  # as Azure answers: each item is an object (a message, a call output, …)
                return self._invalid_type(f"input[{index}]", "an input item", item)
        return await self._responses_answer(request, deployment, body, controls, request_id)

    @staticmethod
    def _invalid_type(param: str, expected: str, value: Any) -> web.Response:
        names = {list: "an array", dict: "an object", str: "a string", bool: "a boolean", int: "an integer", float: "a decimal number"}
        got = "null" if value is None else names.get(type(value), type(value).__name__)
        return web.json_response({"error": {"message": f"Invalid type for '{param}': expected {expected}, but got {got} instead.",
                                            "type": "invalid_request_error", "param": param, "code": "invalid_type"}}, status=400)

    async def _responses_answer(self, request, deployment, body, controls, request_id):
        model = self.config.chat_deployments[deployment]
        prompt = [body.get("instructions"), body.get("input")]
        limit = body.get("max_output_tokens")
        reply = self._reply(body, controls, prompt, limit)
        text = "".join(reply)
        input_tokens = gen.count_tokens(gen.text_of(body.get("input"))) + gen.count_tokens(body.get("instructions") or "")
        output_tokens = gen.count_tokens(text)
        response_id = "resp_" + request_id.replace("-", "")
        message_id = "msg_" + request_id.replace("-", "")[:24]
        usage = {
            "input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens,
        }
        if "no_usage" in self.config.quirks:
            usage = None
        calls = _tool_calls(controls, request_id) or _offered_tool_calls(body, body.get("input"), request_id)
        refusal = controls.get("refusal") if isinstance(controls.get("refusal"), str) else None
        if refusal is not None:
            message = {"type": "message", "id": message_id, "status": "completed", "role": "assistant",
                       "content": [{"type": "refusal", "refusal": refusal}]}
        else:
            message = {"type": "message", "id": message_id, "status": "completed", "role": "assistant",
                       "content": [{"type": "output_text", "text": text, "annotations": []}]}
        function_calls = [{"type": "function_call", "id": "fc_" + call["id"][5:], "call_id": call["id"], "name": call["name"],
                           "arguments": call["arguments"], "status": "completed"} for call in calls]
        output = function_calls if calls else [message]
        response = {
            "id": response_id, "object": "response", "created_at": int(time.time()), "status": "completed",
            "model": model, "output": output, "usage": usage, "error": None, "incomplete_details": None,
            "instructions": body.get("instructions"), "max_output_tokens": limit, "parallel_tool_calls": True,
            "temperature": body.get("temperature", 1.0), "top_p": body.get("top_p", 1.0), "tool_choice": "auto", "tools": [],
            "text": {"format": {"type": "text"}}, "truncation": "disabled", "metadata": body.get("metadata") or {},
        }
        headers = self._headers(request_id)
        if body.get("background"):
            if body.get("store") is False or body.get("stream"):
                return self._error(400, "invalid_request_error", "Background responses are stored and not streamed (store: true, stream: false).")
            response["background"] = True
        if body.get("store", True) is not False:
            items = body.get("input")
            items = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": items}]}] if isinstance(items, str) else list(items or [])
            self.stored[response_id] = {"response": response, "input": [{"id": f"msg_{i}_{response_id[5:17]}", **i} for i in items]}
            if len(self.stored) > 5_000:
                self.stored.pop(next(iter(self.stored)))
        if body.get("background"):
            # Answered at once; retrieving it shows it in progress until it is done.
            self.stored[response_id]["ready_at"] = time.monotonic() + float(controls.get("background_ms", self.config.background_ms)) / 1000.0
            return web.Response(body=orjson.dumps({**response, "status": "queued", "output": [], "usage": None}),
                                content_type="application/json", headers=headers)
        if not body.get("stream"):
            return web.Response(body=orjson.dumps(response), content_type="application/json", headers=headers)
        pending = {**response, "status": "in_progress", "output": [], "usage": None}
        sequence = iter(range(10_000))

        def event(kind: str, **fields) -> bytes:
            return f"event: {kind}\n".encode() + b"data: " + orjson.dumps({"type": kind, "sequence_number": next(sequence), **fields}) + b"\n\n"

        events = [event("response.created", response=pending), event("response.in_progress", response=pending)]
        if calls:
            for number, item in enumerate(function_calls):
                events.append(event("response.output_item.added", output_index=number, item={**item, "arguments": "", "status": "in_progress"}))
                events += [event("response.function_call_arguments.delta", item_id=item["id"], output_index=number, delta=piece)
                           for piece in gen.split_reply(item["arguments"], controls.get("chunks"))]
                events.append(event("response.function_call_arguments.done", item_id=item["id"], output_index=number, arguments=item["arguments"]))
                events.append(event("response.output_item.done", output_index=number, item=item))
            events.append(event("response.completed", response=response))
            return await self._stream(request, events, controls, headers)
        item_pending = {**message, "status": "in_progress", "content": []}
        if refusal is not None:
            part = message["content"][0]
            events += [
                event("response.output_item.added", output_index=0, item=item_pending),
                event("response.content_part.added", item_id=message_id, output_index=0, content_index=0, part={"type": "refusal", "refusal": ""}),
                *[event("response.refusal.delta", item_id=message_id, output_index=0, content_index=0, delta=piece)
                  for piece in gen.split_reply(refusal, controls.get("chunks"))],
                event("response.refusal.done", item_id=message_id, output_index=0, content_index=0, refusal=refusal),
                event("response.content_part.done", item_id=message_id, output_index=0, content_index=0, part=part),
                event("response.output_item.done", output_index=0, item=message),
                event("response.completed", response=response),
            ]
            return await self._stream(request, events, controls, headers)
        events += [
            event("response.output_item.added", output_index=0, item=item_pending),
            event("response.content_part.added", item_id=message_id, output_index=0, content_index=0, part={"type": "output_text", "text": "", "annotations": []}),
        ]
        events += [event("response.output_text.delta", item_id=message_id, output_index=0, content_index=0, delta=piece) for piece in reply]
        events += [
            event("response.output_text.done", item_id=message_id, output_index=0, content_index=0, text=text),
            event("response.content_part.done", item_id=message_id, output_index=0, content_index=0, part={"type": "output_text", "text": text, "annotations": []}),
            event("response.output_item.done", output_index=0, item=message),
            event("response.completed", response=response),
        ]
        return await self._stream(request, events, controls, headers)

    # Control routes -------------------------------------------------------------------
    async def set_faults(self, request: web.Request) -> web.Response:
        spec = await request.json()
        self.faults.append(Fault(int(spec["status"]), int(spec.get("count", 1)), int(spec.get("retry_after_ms", 1000)), spec.get("deployment")))
        return web.json_response({"faults": len(self.faults)})

    async def reset(self, request: web.Request) -> web.Response:
        self.faults.clear()
        self.received.clear()
        return web.json_response({"ok": True})

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response({"requests": self.received})

    async def models(self, request: web.Request) -> web.Response:
        data = [{"id": d, "object": "model", "created": 0, "owned_by": "simulator"} for d in [*self.config.chat_deployments, *self.config.embedding_deployments]]
        return web.json_response({"object": "list", "data": data})


def _trails(event: bytes) -> bool:
    """The usage chunk and the end marker come right after the last generated piece, as a model's
    do: the chunk interval paces generation, not these."""
    return event.endswith(b"[DONE]\n\n") or b'"choices":[]' in event


_KIND_OF = {
    "chat/completions": "chat", "completions": "chat", "responses": "chat", "embeddings": "embeddings",
    "audio/transcriptions": "transcribe", "audio/translations": "transcribe", "audio/speech": "speech",
    "images/generations": "image", "images/edits": "image",
}
_MULTIPART = {"audio/transcriptions", "audio/translations", "images/edits"}


# What Azure checks of the media operations' own fields (form fields arrive as text).
_MEDIA_FIELDS: dict[str, dict[str, Any]] = {
    "audio/speech": {"input": str, "voice": str, "instructions": str, "response_format": ("mp3", "opus", "aac", "flac", "wav", "pcm")},
    "audio/transcriptions": {"response_format": ("json", "text", "srt", "vtt", "verbose_json")},
    "audio/translations": {"response_format": ("json", "text", "srt", "vtt", "verbose_json")},
    "images/generations": {"prompt": str, "size": str, "quality": str, "n": range(1, 11), "response_format": ("url", "b64_json")},
    "images/edits": {"response_format": ("url", "b64_json")},
}
_TYPE_WORDS = {str: "a string", int: "an integer"}
_INTEGER_FIELDS = ("n", "best_of", "max_tokens", "max_completion_tokens", "max_output_tokens", "dimensions")


async def _form(request: web.Request) -> tuple[dict[str, Any], dict[str, bytes]]:
    """A multipart body: its text fields (controls as x_sim[name] fields, as the openai SDK sends
    extra_body in a form) and its files' bytes."""
    fields: dict[str, Any] = {}
    uploads: dict[str, bytes] = {}
    controls: dict[str, Any] = {}
    reader = await request.multipart()
    async for part in reader:
        if part.filename is not None:
            uploads[part.name] = await part.read()
            fields.setdefault("_filename", part.filename)
            continue
        value = (await part.read()).decode("utf-8", "replace")
        if part.name.startswith("x_sim[") and part.name.endswith("]"):
            controls[part.name[6:-1]] = int(value) if value.isdigit() else value
        else:
            fields[part.name] = value
    if controls:
        fields["x_sim"] = controls
    return fields, uploads


def _last_user_text(prompt: Any) -> str:
    """What `x_sim.echo` answers: the last user message's text (chat), or the prompt or input as sent."""
    if isinstance(prompt, str):
        return prompt
    for item in reversed(prompt if isinstance(prompt, list) else []):
        if isinstance(item, str):
            return item
        if isinstance(item, list) and (found := _last_user_text(item)):
            return found
        if isinstance(item, dict) and item.get("role") in ("user", None):
            content = item.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _function_tools(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The function tools a request offers, as {name, parameters} (chat nests them in `function`)."""
    found = []
    for tool in body.get("tools") or ():
        if isinstance(tool, dict) and tool.get("type") == "function":
            spec = tool.get("function") if isinstance(tool.get("function"), dict) else tool
            if isinstance(spec.get("name"), str):
                found.append({"name": spec["name"], "parameters": spec.get("parameters") or {"type": "object", "properties": {}}})
    return found


def _offered_tool_calls(body: dict[str, Any], conversation: Any, request_id: str) -> list[dict[str, str]]:
    """What a model does with the tools it is offered: calls one (the named one for a named
    tool_choice, else the first), or each of them for tool_choice "required" with parallel calls
    allowed; nothing for tool_choice "none", or once the conversation ends with a tool's result
    (then it answers). Arguments are valid for the tool's parameter schema."""
    tools = _function_tools(body)
    choice = body.get("tool_choice")
    if not tools or choice == "none":
        return []
    last = conversation[-1] if isinstance(conversation, list) and conversation else None
    if isinstance(last, dict) and (last.get("role") == "tool" or last.get("type") == "function_call_output"):
        return []
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if isinstance(choice.get("function"), dict) else choice.get("name")
        tools = [t for t in tools if t["name"] == name] or tools[:1]
    elif not (choice == "required" and body.get("parallel_tool_calls", True) is not False):
        tools = tools[:1]
    seed = gen.seed_of(conversation)
    return [{"id": f"call_{request_id.replace('-', '')[:20]}{number}", "name": tool["name"],
             "arguments": orjson.dumps(gen.schema_instance(tool["parameters"], gen.seed_of(seed, tool["name"]))).decode()}
            for number, tool in enumerate(tools)]


def _structured_reply(body: dict[str, Any], seed: bytes) -> str | None:
    """The reply for structured outputs: JSON valid for `response_format` (chat) or
    `text.format` (Responses) — json_schema, or json_object."""
    fmt = body.get("response_format")
    if not isinstance(fmt, dict):
        text = body.get("text")
        fmt = text.get("format") if isinstance(text, dict) else None
    if not isinstance(fmt, dict):
        return None
    if fmt.get("type") == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema") if isinstance(fmt.get("json_schema"), dict) else fmt.get("schema")
        return orjson.dumps(gen.schema_instance(schema or {"type": "object"}, seed)).decode()
    if fmt.get("type") == "json_object":
        return orjson.dumps({"answer": "".join(gen.reply_tokens(seed, 12)).strip()}).decode()
    return None


def _tool_calls(controls: dict[str, Any], request_id: str) -> list[dict[str, str]]:
    """The tool calls a request asked the simulator to make (`x_sim.tool_calls`)."""
    calls = []
    for number, call in enumerate(controls.get("tool_calls") or ()):
        if isinstance(call, dict) and isinstance(call.get("name"), str):
            arguments = call.get("arguments", "{}")
            calls.append({"id": f"call_{request_id.replace('-', '')[:20]}{number}", "name": call["name"],
                          "arguments": arguments if isinstance(arguments, str) else orjson.dumps(arguments).decode()})
    return calls


def build_app(config: SimulatorConfig | None = None) -> web.Application:
    simulator = Simulator(config or SimulatorConfig())
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app["simulator"] = simulator

    def serve(operation: str):
        async def handler(request: web.Request) -> web.StreamResponse:
            return await simulator.handle(request, operation)

        return handler

    for operation in ("chat/completions", "completions", "embeddings", *_KIND_OF.keys() - {"chat/completions", "completions", "embeddings", "responses"}):
        app.router.add_post(f"/openai/deployments/{{deployment}}/{operation}", serve(operation))
        app.router.add_post(f"/openai/v1/{operation}", serve(operation))
    app.router.add_get(r"/_sim/images/{name:[0-9a-f]{32}}.png", simulator.image_file)
    for prefix in ("/openai/files", "/openai/v1/files"):
        app.router.add_route("GET", prefix, simulator.files)
        app.router.add_route("POST", prefix, simulator.files)
        app.router.add_route("GET", prefix + "/{file_id}", simulator.files)
        app.router.add_route("DELETE", prefix + "/{file_id}", simulator.files)
        app.router.add_get(prefix + "/{file_id}/{what:content}", simulator.files)
    for prefix in ("/openai/batches", "/openai/v1/batches"):
        app.router.add_route("GET", prefix, simulator.batches.handle)
        app.router.add_route("POST", prefix, simulator.batches.handle)
        app.router.add_get(prefix + "/{batch_id}", simulator.batches.handle)
        app.router.add_post(prefix + "/{batch_id}/{what:cancel}", simulator.batches.handle)
    for prefix in ("/openai/responses", "/openai/v1/responses"):
        app.router.add_route("GET", prefix + "/{response_id}", simulator.stored_response)
        app.router.add_route("DELETE", prefix + "/{response_id}", simulator.stored_response)
        app.router.add_get(prefix + "/{response_id}/{what:input_items}", simulator.stored_response)
        app.router.add_post(prefix + "/{response_id}/{what:cancel}", simulator.stored_response)
    app.router.add_post("/openai/responses", serve("responses"))
    app.router.add_post("/openai/v1/responses", serve("responses"))
    app.router.add_get("/openai/v1/models", simulator.models)
    SimulatedContentSafety(simulator.config.api_key, simulator.config.content_safety_latency_ms).add_routes(app)  # Azure AI Content Safety, on the same port
    app.router.add_post("/_sim/faults", simulator.set_faults)
    app.router.add_post("/_sim/reset", simulator.reset)
    app.router.add_get("/_sim/stats", simulator.stats)

    async def set_cookie(request: web.Request, response: web.StreamResponse) -> None:
        if "set_cookie" in request:
            response.headers["Set-Cookie"] = request["set_cookie"]

    app.on_response_prepare.append(set_cookie)
    return app
