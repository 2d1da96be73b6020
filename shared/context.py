"""The state of one request as it moves through the pipeline."""
from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, AsyncIterator

from starlette.requests import Request

from .routes import ModelRoute


def new_request_id() -> str:
    """32 hex characters: the time in milliseconds, then 80 random bits (like a UUIDv7).

    Ids that sort by time keep the request log's primary-key index growing at its end instead of
    touching a random page per record: half the SQLite time per record (`bench/micro.py`), and
    easier reading for an admin sorting by id."""
    return f"{time.time_ns() // 1_000_000:012x}{secrets.token_hex(10)}"


@dataclass
class UpstreamResult:
    """What came back from the model: a whole body, or a stream of SSE events.

    Stages after the upstream call may replace `events` with a wrapping generator (the output
    guard does), so a stream is never buffered whole."""

    status: int
    headers: dict[str, str]
    body: bytes = b""
    json: Any = None  # parsed body of a whole JSON response
    events: AsyncIterator[Any] | None = None  # sse.Event items, each one complete SSE event

    @property
    def is_stream(self) -> bool:
        return self.events is not None


@dataclass
class StreamSummary:
    """What a relayed stream said, assembled as it passed: for the log and for settling usage."""

    choices: dict[int, dict[str, Any]] = field(default_factory=dict)
    usage: dict[str, Any] | None = None
    model: str | None = None
    response_id: str | None = None
    final_response: dict[str, Any] | None = None  # Responses API: the `response.completed` object
    chunks: int = 0
    error: dict[str, Any] | None = None


@dataclass
class RequestContext:
    request_id: str
    http: Request
    route: ModelRoute | None
    received_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    started: float = field(default_factory=time.perf_counter)

    deployment: str | None = None
    api_version: str | None = None
    raw_body: bytes = b""
    body: dict[str, Any] | None = None
    body_modified: bool = False  # a stage changed `body`; the upstream gets it re-encoded
    stream: bool = False
    client_wants_usage: bool = False  # the client itself asked for stream_options.include_usage

    # Filled by the identity and access stages; cache, quota and guards add theirs.
    identity: Any = None  # identity.Identity
    policy: Any = None  # policy.EffectivePolicy
    quota: Any = None  # quota.Reservation, when limits apply
    cache: Any = None  # response_cache.CacheState, when the cache is in play
    system_prompt: str | None = None  # the app's prompt as applied (leak protection compares with it)
    client_instructions: str | None = None  # Responses: the client's own instructions, shown back instead of the injected ones
    usage: Any = None  # usage.Usage as settled when the exchange ended (the log reports the same figures)
    guard_decisions: list[dict[str, Any]] = field(default_factory=list)
    model_response: Any = None  # the upstream's whole answer before the output guard changed it
    app_id: str | None = None
    app_name: str | None = None
    user_id: str | None = None
    tenant_id: str | None = None
    properties: dict[str, str] = field(default_factory=dict)

    result: UpstreamResult | None = None
    error: Exception | None = None
    status: int | None = None
    response_headers: dict[str, str] = field(default_factory=dict)

    upstream_started: float | None = None
    upstream_headers_at: float | None = None
    first_byte_at: float | None = None
    finished_at: float | None = None
    upstream_url: str | None = None
    upstream_request_id: str | None = None
    retries: int = 0
    backend: str | None = None
    stream_summary: StreamSummary | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def elapsed_ms(self, since: float | None = None, until: float | None = None) -> float | None:
        if since is None:
            return None
        end = until if until is not None else time.perf_counter()
        return round((end - since) * 1000.0, 3)
