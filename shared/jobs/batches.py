"""Batch input files: every line is a request, and each obeys the app's policy.

A batch runs the lines of an uploaded JSONL file (`{"custom_id", "method": "POST", "url",
"body"}`) inside Azure OpenAI, where the gateway cannot see them one by one. So the gateway
looks when the file is uploaded (purpose `batch`): each line is checked as if it were sent on its
own — its body's required fields, the deployment its `model` names (the app's policy and its
gateway key), the objects it names (another app's response or file is refused), the input guard
— and the app's system prompt goes into it. The file that reaches Azure OpenAI is the rewritten
one. A refused line refuses the whole upload, with a message naming the line. What the lines may
cost (prompt estimate and answer budget, per deployment) is kept with the file's ownership
record; creating a batch from the file reserves it at the batch price (quota/enforce.py), and
its end settles it line by line (jobs/deferred.py).

A batch may only read its own app's input file, uploaded through the gateway for batch: another
app's file is 404 (ownership), a file uploaded for another purpose is refused.
"""
from __future__ import annotations

from typing import Any

import orjson

from .. import errors
from ..context import RequestContext
from ..errors import GatewayError
from ..operations import BATCH_ENDPOINTS, BATCH_INPUT, INPUT_GUARD, OWNERSHIP, SYSTEM_PROMPT, Style, batch_line_operation, completion_budget
from ..pipeline import Stage
from ..policy.access import check_deployment
from ..routes import MODEL_ROUTES, ModelRoute
from ..validation import check_body, encode_multipart, upload_of

MAX_LINES = 100_000  # Azure's limit per batch input file
# The stages a line passes, besides the checks here: what the request would meet on its own
# before the model (identity, policy and quota are the upload's and the batch's).
_LINE_STAGES = (OWNERSHIP, INPUT_GUARD, SYSTEM_PROMPT)


def line_route(url: str) -> ModelRoute:
    """The v1 route of the operation a batch line's `url` names (its deployment is in `model`)."""
    operation = batch_line_operation(url)
    return next(r.for_method("POST") for r in MODEL_ROUTES if r.operation is operation and r.style is Style.V1)


def normalized_endpoint(url: str) -> str:
    """`/v1/chat/completions` and `/chat/completions` name one operation."""
    return url[3:] if url.startswith("/v1/") else url


class CheckBatchInput(Stage):
    name = BATCH_INPUT

    def __init__(self) -> None:
        self.stages: list[Stage] = []  # the gateway's stages; a line runs those of _LINE_STAGES its operation has

    async def before(self, ctx: RequestContext) -> None:
        operation = ctx.route.operation
        if operation.batch_lines:
            self._batch_of(ctx)
        elif ctx.body.get("purpose") == "batch":
            await self._check_upload(ctx)

    @staticmethod
    def _batch_of(ctx: RequestContext) -> None:
        """Creating a batch: its input file must be one the gateway checked, for this endpoint."""
        summary = next((doc.get("batch_input") for doc in ctx.referred), None)
        if summary is None:
            raise errors.invalid_request("'input_file_id' names a file that was not uploaded with purpose 'batch' through the gateway.",
                                         "input_file_id")
        if normalized_endpoint(summary["endpoint"]) != normalized_endpoint(ctx.body["endpoint"]):
            raise errors.invalid_request(f"The input file's requests are for {summary['endpoint']}, not {ctx.body['endpoint']}.", "endpoint")
        ctx.batch_input = {**summary, "input_file_id": ctx.body["input_file_id"]}

    async def _check_upload(self, ctx: RequestContext) -> None:
        fields, content = await upload_of(ctx.http.headers.get("content-type", ""), ctx.raw_body, "file")
        lines = content.splitlines()
        if len(lines) > MAX_LINES:
            raise errors.invalid_request(f"A batch input file holds at most {MAX_LINES} requests.", "file")
        endpoint = None
        seen: set[str] = set()
        deployments: dict[str, dict[str, int]] = {}
        rewritten: list[bytes] = []
        changed = False  # a line's body changed (the system prompt went in): the file is re-encoded
        count = 0
        for number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            count += 1
            line, url = _parse_line(raw, number, seen)
            if endpoint is None:
                endpoint = url
            elif normalized_endpoint(url) != normalized_endpoint(endpoint):
                raise _line_error(number, line["custom_id"], errors.invalid_request(
                    f"every request of a batch goes to one endpoint ({endpoint}), this one to {url}.", "url"))
            try:
                body, prompt, completion = await self._check_line(ctx, number, line_route(url), line["body"])
            except GatewayError as exc:
                raise _line_error(number, line["custom_id"], exc) from None
            part = deployments.setdefault(body["model"], {"lines": 0, "prompt_tokens": 0, "completion_tokens": 0})
            part["lines"] += 1
            part["prompt_tokens"] += prompt
            part["completion_tokens"] += completion
            if body is not line["body"]:
                raw, changed = orjson.dumps({**line, "body": body}), True
            rewritten.append(raw)
        if not count:
            raise errors.invalid_request("The batch input file holds no requests.", "file")
        ctx.batch_input = {"lines": count, "endpoint": endpoint, "deployments": deployments}
        if changed:
            filename, content_type = fields.pop("_filename"), fields.pop("_content_type")
            ctx.raw_body, ctx.multipart_type = encode_multipart(fields, "file", filename, content_type, b"\n".join(rewritten) + b"\n")

    async def _check_line(self, parent: RequestContext, number: int, route: ModelRoute, body: dict[str, Any]) -> tuple[dict[str, Any], int, int]:
        """One line as its own request, under the uploader's identity and policy: returns its body
        as it goes upstream, its prompt estimate and its answer budget."""
        operation = route.operation
        if check_body(operation, body):
            raise errors.invalid_request("A batch request cannot be streamed.", "stream")
        model = body.get("model")
        if not isinstance(model, str) or not model.strip():
            raise errors.invalid_request("Missing required parameter: 'model' (the deployment name).", "model")
        ctx = RequestContext(request_id=parent.request_id, http=parent.http, route=route)
        ctx.identity, ctx.policy, ctx.app_id, ctx.app_name = parent.identity, parent.policy, parent.app_id, parent.app_name
        ctx.user_id, ctx.tenant_id, ctx.body, ctx.deployment = parent.user_id, parent.tenant_id, body, model
        check_deployment(ctx)
        try:
            for stage in self.stages:
                if stage.name in _LINE_STAGES and operation.applies(stage.name):
                    await stage.before(ctx)
        finally:
            parent.guard_decisions.extend({**decision, "where": f"batch line {number}"} for decision in ctx.guard_decisions)
        prompt = operation.prompt_estimate(ctx.body, operation.reads) if operation.prompt_estimate else 0
        return ctx.body, prompt, completion_budget(operation, ctx.body, parent.policy.default_completion_tokens)


def _parse_line(raw: bytes, number: int, seen: set[str]) -> tuple[dict[str, Any], str]:
    try:
        line = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise errors.invalid_request(f"Batch input line {number} is not valid JSON.", "file") from None
    if not isinstance(line, dict):
        raise errors.invalid_request(f"Batch input line {number} must be a JSON object.", "file")
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise errors.invalid_request(f"Batch input line {number} has no 'custom_id'.", "file")
    if custom_id in seen:
        raise errors.invalid_request(f"Batch input line {number}: the custom_id {custom_id!r} is used twice.", "file")
    seen.add(custom_id)
    if line.get("method") != "POST":
        raise _line_error(number, custom_id, errors.invalid_request("'method' must be POST.", "method"))
    url = line.get("url")
    if url not in BATCH_ENDPOINTS:
        raise _line_error(number, custom_id, errors.invalid_request(f"'url' must be one of {', '.join(sorted(BATCH_ENDPOINTS))}.", "url"))
    if not isinstance(line.get("body"), dict):
        raise _line_error(number, custom_id, errors.invalid_request("'body' must be a JSON object.", "body"))
    return line, url


def _line_error(number: int, custom_id: str, error: GatewayError) -> GatewayError:
    """A line's refusal, as the upload's: its status and code, the line named."""
    return GatewayError(error.status, error.code, f"Batch input line {number} (custom_id {custom_id!r}): {error.message}",
                        param="file", error_type=error.error_type, details=error.details, headers=error.headers)
