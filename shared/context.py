"""The state of one request as it moves through the pipeline."""
from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable

from starlette.requests import Request

if TYPE_CHECKING:  # an annotation only: the routes come from the operations table, which sits above
    from .routes import ModelRoute


def new_request_id() -> str:
    """32 hex characters: the time in milliseconds, then 80 random bits (like a UUIDv7).

    Ids that sort by time keep the request log's primary-key index growing at its end instead of
    touching a random page per record: half the SQLite time per record (`bench/micro.py`), and
    easier reading for an admin sorting by id."""
    return f"{time.time_ns() // 1_000_000:012x}{secrets.token_hex(10)}"


def internal_request(method: str, path: str, query: str = "", headers: dict[str, str] | None = None, client_ip: str | None = None) -> Request:
    """A request the gateway makes up to run work of its own through the pipeline's parts (an
    async job's attempt, a batch's settlement): what the stages and the upstream client read."""
    scope = {
        "type": "http", "http_version": "1.1", "scheme": "https", "method": method, "path": path,
        "raw_path": path.encode(), "query_string": query.encode(), "root_path": "",
        "headers": [(k.encode(), v.encode()) for k, v in (headers or {}).items()],
        "client": (client_ip, 0) if client_ip else None, "server": None,
    }
    return Request(scope)


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
    upstream_sent_nothing: bool = False  # an error status with no body at all (what a server says of a path it lacks)
    # Awaited looks at a whole answer, in order, once every stage's `after` has run: a stage
    # whose check must call out (Content Safety) adds one in `after`.
    reviews: list[Callable[[Any, "UpstreamResult"], Awaitable["UpstreamResult"]]] = field(default_factory=list)

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
class UpstreamCall:
    """What the call to the upstream did (upstream/client.py fills it): for the log and headers."""

    url: str | None = None
    request_id: str | None = None  # the upstream's apim-request-id / x-request-id
    backend: str | None = None  # the backend that answered last
    retries: int = 0
    attempts: list[dict[str, Any]] = field(default_factory=list)  # one per try: backend, status or error, ms
    started: float | None = None
    headers_at: float | None = None
    answer_bytes: int = 0  # a binary answer's size (audio)
    pinned_backend: str | None = None  # the backend holding the object a request is about


@dataclass
class RequestContext:
    """One request on its way through the pipeline.

    The core (who, what, the body, the answer, timings) is shared; each stage keeps its own
    typed part here (`cache`, `quota`, `accounting`, `system_prompt`, `guard_decisions`) and
    contributes its own fields to the log record through its `record` hook (pipeline.py); the
    record's fields are declared in one place, records/request_log.py."""

    request_id: str
    http: Request
    route: ModelRoute | None
    received_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    started: float = field(default_factory=time.perf_counter)

    # The request, as the validate stage read it.
    deployment: str | None = None
    api_version: str | None = None
    raw_body: bytes = b""
    body: dict[str, Any] | None = None
    body_modified: bool = False  # a stage changed `body`; the upstream gets it re-encoded
    multipart_type: str | None = None  # a multipart body the gateway rewrote (raw_body): its new content type
    stream: bool = False
    client_wants_usage: bool = False  # the client itself asked for stream_options.include_usage
    gateway_asked_usage: bool = False  # the gateway added include_usage: its usage chunk is not the client's
    properties: dict[str, str] = field(default_factory=dict)  # x-sekisho-property-* headers
    path_params: dict[str, str] = field(default_factory=dict)  # the route's parameters (deployment, response_id)

    # Who is calling, and under which policy (authenticate and access stages).
    identity: Any = None  # identity.authenticate.Identity
    policy: Any = None  # policy.policies.EffectivePolicy
    app_id: str | None = None
    app_name: str | None = None
    user_id: str | None = None
    tenant_id: str | None = None
    claimed_user_ignored: bool = False  # the app named a user but is not trusted to

    # The stages' own parts.
    system_prompt: Any = None  # policy.system_prompt.AppliedPrompt, when the app's prompt went in
    guard_decisions: list[dict[str, Any]] = field(default_factory=list)  # input and output guards
    safety: Any = None  # guards.content_safety.SafetyCheck, when the app's policy turns Content Safety on
    # guards.personal_data: the request's Placeholders (mask_upstream, when it held any), or the
    # PersonalDataPolicy (mask_in_log: the log record is masked when it is built).
    personal_data: Any = None
    keep_out_of_cache: bool = False  # the request holds personal data the cache must not keep
    cache: Any = None  # cache.responses.CacheState, when the cache is in play
    quota: Any = None  # quota.enforce.Reservation, while limits are reserved and not yet settled
    accounting: Any = None  # quota.enforce.Accounting: estimate, refusal, cost
    usage: Any = None  # usage.Usage as settled when the exchange ended (the log reports the same figures)
    job: dict[str, Any] | None = None  # the async job this request became (jobs/documents.job_summary)
    owned: dict[str, Any] | None = None  # policy.ownership: the record of the object this request is about
    referred: list[dict[str, Any]] = field(default_factory=list)  # policy.ownership: records of the objects the body names
    batch_input: dict[str, Any] | None = None  # jobs.batches: what a batch input file's lines may cost
    settles: dict[str, Any] | None = None  # jobs.deferred: the batch line or background response this record settles

    # The answer.
    upstream: UpstreamCall = field(default_factory=UpstreamCall)
    result: UpstreamResult | None = None
    model_response: Any = None  # the upstream's whole answer before a stage changed it for the client
    stream_summary: StreamSummary | None = None
    error: Exception | None = None
    status: int | None = None
    response_headers: dict[str, str] = field(default_factory=dict)
    client_disconnected: bool = False
    first_byte_at: float | None = None
    finished_at: float | None = None

    def elapsed_ms(self, since: float | None = None, until: float | None = None) -> float | None:
        if since is None:
            return None
        end = until if until is not None else time.perf_counter()
        return round((end - since) * 1000.0, 3)
