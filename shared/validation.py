"""Validation stage: size, JSON, required fields, and which deployment the request is for."""
from __future__ import annotations

import re
import secrets
from typing import Any
from urllib.parse import parse_qsl

import orjson
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from . import errors
from .context import RequestContext
from .operations import STREAM_USAGE, VALIDATE, Operation, Style, whole_number
from .upstream import api_versions
from .pipeline import Stage
from .routes import match_template

# Later stages walk the body recursively, and orjson writes at most 255 levels (the log record
# and the cache key nest the body one or two levels deeper), while it reads up to 1024.
MAX_JSON_DEPTH = 128

# Counts that the quota estimate multiplies (max tokens × n): whole numbers, in Azure's ranges.
_COUNT_LIMITS = {"n": 128, "best_of": 128}
_MAX_COUNT = 2**31 - 1


async def read_body(ctx: RequestContext, limit: int, what: str = "body") -> bytes:
    """Read the body, refusing it as soon as it passes `limit` (Content-Length or streamed)."""
    declared = ctx.http.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise errors.request_too_large(limit, what)
        except ValueError:
            raise errors.invalid_request("Content-Length is not a number.") from None
    chunks: list[bytes] = []
    size = 0
    async for chunk in ctx.http.stream():
        size += len(chunk)
        if size > limit:
            raise errors.request_too_large(limit, what)
        chunks.append(chunk)
    return b"".join(chunks)


_MAX_FORM_FIELDS = 64


async def form_fields(content_type: str, raw: bytes) -> dict[str, Any]:
    """A multipart/form-data body as the stages read it: its text fields as strings (a field
    given several times, like `timestamp_granularities[]`, as a list), each file as a descriptor
    (name, type, size) — never its bytes, which go upstream as they came."""
    if not content_type.lower().startswith("multipart/form-data") or "boundary=" not in content_type:
        raise errors.invalid_request("This operation takes a multipart/form-data body (a file upload).")
    form = await _parse_form(content_type, raw)
    fields: dict[str, Any] = {}
    try:
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                value = {"filename": value.filename, "content_type": value.content_type, "bytes": value.size}
            elif name == "stream":
                value = value.strip().lower() == "true"
            if name in fields:
                previous = fields[name]
                fields[name] = [*previous, value] if isinstance(previous, list) else [previous, value]
            else:
                fields[name] = value
    finally:
        await form.close()
    return fields


async def _parse_form(content_type: str, raw: bytes):
    async def once():
        yield raw

    try:
        return await MultiPartParser(Headers({"content-type": content_type}), once(), max_files=8, max_fields=_MAX_FORM_FIELDS).parse()
    except (MultiPartException, ValueError) as exc:
        raise errors.invalid_request(f"The multipart body could not be read: {exc}.") from None


def nesting_exceeds(raw: bytes, value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """True when `value` (parsed from `raw`) nests arrays and objects more than `limit` deep."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False  # too few brackets to nest that deep: no walk needed
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


def _check_fields_read_later(operation: Operation, body: dict[str, Any]) -> None:
    """Fields that later stages read (quota estimate, system prompt) must have the type they assume."""
    for field in operation.counts:
        value = body.get(field)
        most = _COUNT_LIMITS.get(field, _MAX_COUNT)
        number = whole_number(value)
        if value is not None and (number is None or not 0 <= number <= most):
            raise errors.invalid_request(f"'{field}' must be a whole number from 0 to {most}.", field)
    if operation.check_body is not None:
        operation.check_body(body)


def page_limit(params, most: int, default: int = 100) -> int:
    """A list's page size from the query string: a whole number from 1 to `most`, refused with 400
    otherwise (never clamped: what the document calls invalid is refused)."""
    limit = params.get("limit", str(default))
    if not (limit.isascii() and limit.isdigit() and 1 <= int(limit) <= most):
        raise errors.invalid_request(f"'limit' must be a whole number from 1 to {most}.", "limit")
    return int(limit)


def _last_value(query: bytes, name: str) -> str | None:
    """`request.query_params.get(name)` (the last value wins) without building the whole mapping."""
    found = None
    for key, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        if key == name:
            found = value
    return found


def _type_name(types: tuple[type, ...]) -> str:
    names = {str: "a string", list: "an array", dict: "an object"}
    return " or ".join(names.get(t, t.__name__) for t in types)


class ValidateRequest(Stage):
    name = VALIDATE

    def __init__(self, max_body_bytes: int, max_upload_bytes: int) -> None:
        self._limit = max_body_bytes
        self._upload_limit = max_upload_bytes  # multipart bodies: audio and image uploads
    # Runs after authentication, so an unauthenticated caller cannot make the gateway read a body.

    async def before(self, ctx: RequestContext) -> None:
        route = ctx.route
        # Parsing the query string costs more than this check; most v1 calls have none.
        query = ctx.http.scope.get("query_string", b"")
        if b"api-version" in query:
            ctx.api_version = _last_value(query, "api-version")
        operation = route.operation
        if "{" in route.template:
            # The host matched the route and decoded the segments once (Functions host and local host).
            params = dict(ctx.http.path_params) or match_template(route.template, ctx.http.url.path) or {}
            ctx.path_params = {name: value for name, value in params.items() if isinstance(value, str)}
            for name, value in ctx.path_params.items():
                refuse_control_characters(value, name)
            ctx.deployment = ctx.path_params.get("deployment") or None
        if operation.body == "none":
            return  # a GET, DELETE or bodiless POST
        if operation.body == "multipart":
            raw = ctx.raw_body = await read_body(ctx, self._upload_limit, "upload")
            body: Any = await form_fields(ctx.http.headers.get("content-type", ""), raw)
        else:
            raw = ctx.raw_body = await read_body(ctx, self._limit)
            if not raw.strip():
                raise errors.invalid_request("The request body is empty; a JSON object is expected.")
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise errors.invalid_request(f"The request body is not valid JSON: {exc}.") from None
            if not isinstance(body, dict):
                raise errors.invalid_request("The request body must be a JSON object.")
            if nesting_exceeds(raw, body):
                raise errors.invalid_request(f"The request body nests arrays and objects more than {MAX_JSON_DEPTH} levels deep.")
        ctx.body = body
        if operation.needs_deployment:  # files belong to the resource, not to a deployment
            _read_deployment(ctx, body)
        ctx.stream = check_body(operation, body)


# Optional fields the gateway reads, wherever they appear: `user` names the end user (apps that
# trust it), `stream_options` is merged with the usage the gateway asks for.
_TYPED_WHEN_PRESENT = (("user", str, "a string"), ("stream_options", dict, "an object"))


def check_body(operation: Operation, body: dict[str, Any]) -> bool:
    """The body's required fields and the fields later stages read; whether it asks to stream."""
    for field, types in operation.required:
        if field not in body:
            raise errors.invalid_request(f"Missing required parameter: '{field}'.", field)
        if not isinstance(body[field], types):
            raise errors.invalid_request(f"'{field}' must be {_type_name(types)}.", field)
    _check_fields_read_later(operation, body)
    for field, types, described in _TYPED_WHEN_PRESENT:
        if body.get(field) is not None and not isinstance(body[field], types):
            raise errors.invalid_request(f"'{field}' must be {described}.", field)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise errors.invalid_request("'stream' must be true or false.", "stream")
    if stream and not operation.streams:
        raise errors.invalid_request(f"The {operation.name} operation cannot be streamed.", "stream")
    return stream


async def upload_of(content_type: str, raw: bytes, name: str) -> tuple[dict[str, str], bytes]:
    """A multipart body's text fields and the bytes of its file `name` (a stage that must read an
    upload: a batch input file)."""
    form = await _parse_form(content_type, raw)
    try:
        fields = {key: value for key, value in form.multi_items() if isinstance(value, str)}
        upload = form.get(name)
        if not isinstance(upload, UploadFile):
            raise errors.invalid_request(f"Missing required parameter: '{name}' (a multipart file upload).", name)
        content = await upload.read()
        fields["_filename"] = upload.filename or "upload.jsonl"
        fields["_content_type"] = upload.content_type or "application/octet-stream"
    finally:
        await form.close()
    return fields, content


def encode_multipart(fields: dict[str, str], file_field: str, filename: str, content_type: str, content: bytes) -> tuple[bytes, str]:
    """A multipart/form-data body of text fields and one file; returns it and its content type."""
    boundary = "sekisho-" + secrets.token_hex(16)
    parts = []
    for key, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{_quoted(key)}"\r\n\r\n{value}\r\n'.encode())
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{_quoted(file_field)}"; filename="{_quoted(filename)}"\r\n'
                 f"Content-Type: {content_type}\r\n\r\n".encode() + content + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def _quoted(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def refuse_control_characters(name: str, param: str) -> None:
    """A name (deployment, object id) with control characters: no deployment or object has one,
    and they would reach logs, headers and upstream URLs."""
    if _CONTROL.search(name):
        raise errors.invalid_request(f"'{param}' contains control characters.", param)


def _read_deployment(ctx: RequestContext, body: dict[str, Any]) -> None:
    """The deployment: the body's `model` on routes without one in the path."""
    route = ctx.route
    if not route.deployment_in_path:
        model = body.get("model")
        if not isinstance(model, str) or not model.strip():
            raise errors.invalid_request("Missing required parameter: 'model' (the deployment name).", "model")
        refuse_control_characters(model, "model")
        ctx.deployment = model
    elif route.style is Style.AZURE and not ctx.deployment:
        raise errors.invalid_request("The deployment name in the path is empty.", "deployment")
    elif ctx.deployment in (".", ".."):
        # A dot segment would be resolved away in the upstream URL, reaching another path.
        raise errors.invalid_request("The deployment name in the path is not valid.", "deployment")


class RequestStreamUsage(Stage):
    """Ask the upstream for the usage chunk on streams, so cost is exact — where the request's
    api-version accepts `stream_options` (upstream/api_versions.py); an older version gets the
    request as the client sent it, and the gateway counts the stream's tokens itself.

    The client's own choice is remembered; the upstream relay strips the usage chunk only when
    the gateway, not the client, asked for it."""

    name = STREAM_USAGE

    def __init__(self, default_api_version: str) -> None:
        self._default_api_version = default_api_version  # what Azure-style routes send when the client sent none

    async def before(self, ctx: RequestContext) -> None:
        if not ctx.stream or not ctx.route.operation.stream_usage_option:
            return
        options = ctx.body.get("stream_options")  # an object or absent: check_body saw to it
        ctx.client_wants_usage = isinstance(options, dict) and options.get("include_usage") is True
        upstream_version = (ctx.api_version or self._default_api_version) if ctx.route.style is Style.AZURE else None
        if ctx.client_wants_usage or not api_versions.accepts(upstream_version, "stream_options"):
            return
        ctx.body["stream_options"] = {**(options or {}), "include_usage": True}
        ctx.body_modified = ctx.gateway_asked_usage = True
