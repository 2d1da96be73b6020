"""The request log: one record per request that reached the gateway, written off the hot path.

`build_record` turns a finished RequestContext into the record whose fields `RECORD_FIELDS` declares. `LogWriter` queues
records in memory and writes them in batches from a background task, so that logging never
delays a response or the first streamed byte. Records the store refuses are retried; if the
store stays down and the queue passes its bound, or at shutdown, the records go to a local spool
(JSON lines on the instance's disk) that the next writer on that disk replays into the store;
only if the spool cannot be written do they go to the fallback sink (the Python logger, which
reaches Application Insights in Azure). Both are counted (`/health`); nothing is dropped silently.
"""
from __future__ import annotations

import asyncio
import csv
import fcntl
import hashlib
import io
import json
import logging
import os
import socket
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterable

import orjson

from .. import sse
from ..context import RequestContext
from ..operations import REQUEST_LOG
from ..pipeline import Stage
from ..store import EncodedLog, Store, StoreUnavailable
from ..usage import usage_of
from . import telemetry
from ..guards.personal_data import mask_values
from .credentials import without_credentials
from .rollups import Contribution, contribution, csv_cell, sum_contributions
from .telemetry import is_final

logger = logging.getLogger("sekisho.request_log")

# Which instance served a request: host name and process (Function App instances, local workers).
INSTANCE = f"{socket.gethostname()}:{os.getpid()}"

_MAX_QUEUED_RECORDS = 20_000  # encoded: some 2–4 KB each with full content logging


def _redact(value: Any) -> Any:
    """Keep the shape of content, drop the text: strings become their length."""
    if isinstance(value, str):
        return f"[redacted {len(value)} chars]"
    if isinstance(value, list):
        return [_redact(v) for v in value]
    if isinstance(value, dict):
        return {k: (v if k in ("role", "type", "name", "index") else _redact(v)) for k, v in value.items()}
    return value


def _apply_content_level(level: str, value: Any) -> Any:
    if value is None or level == "full":
        return value
    if level == "redacted":
        return _redact(value)
    return None


def _response_content(ctx: RequestContext) -> Any:
    """What the model answered (before the output guard changed it, which `guard` records)."""
    if ctx.stream_summary is not None:
        return sse.assembled_response(ctx.stream_summary)
    if ctx.result is None:
        return None
    if ctx.model_response is not None or ctx.result.json is not None:
        body = ctx.model_response if ctx.model_response is not None else ctx.result.json
        if isinstance(body, dict) and ctx.route is not None and ctx.route.operation.answer_is_vectors:
            # Vectors are large and are not what an admin reads: keep their count and size.
            data = body.get("data") or []
            return {**{k: v for k, v in body.items() if k != "data"}, "data": f"[{len(data)} embedding(s)]"}
        return body
    return ctx.result.body[:4096].decode("utf-8", "replace") if ctx.result.body else None


def _model(ctx: RequestContext) -> str | None:
    if ctx.stream_summary is not None and ctx.stream_summary.model:
        return ctx.stream_summary.model
    if ctx.result is not None and isinstance(ctx.result.json, dict) and ctx.result.json.get("model"):
        return ctx.result.json["model"]
    return (ctx.body or {}).get("model") if isinstance(ctx.body, dict) else None


# Every field a log record may have, declared once: the core fields build_record fills, and the
# fields each stage contributes from its own part of the context (Stage.record). The admin API's
# OpenAPI document and the workbook read these names.
RECORD_FIELDS: dict[str, str] = {
    # Core
    "id": "request id (x-sekisho-request-id; an async job's id)",
    "timestamp": "when the request arrived (UTC, ISO 8601)",
    "app_id": "calling app (the token's azp/appid)", "app_name": "the app's registered name",
    "user_id": "end user (delegated token's oid, the name a trusted app gave, or the app itself)",
    "tenant_id": "the token's tenant",
    "method": "HTTP method", "path": "request path", "operation": "operation name from the operations table",
    "api_style": "azure or v1", "api_version": "the api-version query", "deployment": "deployment asked for",
    "model": "model that answered", "stream": "streamed answer", "status": "HTTP status the client got",
    "error": "code and message when the request failed",
    "prompt": "the fields the model reads as content (the app's content-logging level applies)",
    "parameters": "every other request field (credentials masked)",
    "response": "the model's answer before the output guard changed it (content-logging level applies)",
    "content_logging": "full, redacted or metadata",
    "usage": "prompt/completion/total/cached tokens; estimated: true when counted by the gateway",
    "latency_ms": "total time", "upstream_latency_ms": "time to the upstream's headers",
    "time_to_first_byte_ms": "time to the first byte sent to the client",
    "upstream_request_id": "the upstream's request id", "backend": "backend that answered",
    "attempts": "each upstream try: backend, status or error, ms", "retries": "upstream tries after the first",
    "instance": "the gateway instance (host:pid)", "request_bytes": "request body size",
    "client": "client IP and user agent", "properties": "x-sekisho-property-* headers",
    "guard": "input and output guard decisions (direction, rule, action, where)",
    "client_disconnected": "the client left before the answer ended",
    "job": "the async job this request became",
    "settles": "work that ended after its request: a batch line (kind batch, the batch id, custom_id) or a background response (kind response, its id), with the id of the request that started it",
    "ttl": "seconds the record is kept (retention_days)",
    # Contributed by stages
    "gateway_key": "authenticate: the id of the gateway key used (never the key)",
    "claimed_user_ignored": "access: the app named a user but is not trusted to",
    "system_prompt": "system_prompt: mode and client_system as applied",
    "cache": "cache: HIT/MISS/BYPASS, stored, savings",
    "quota_estimate": "quota: tokens reserved before the call",
    "quota_degraded": "quota: counted in memory while the store was down",
    "quota_refused": "quota: the limit that refused the request",
    "cost": "quota: amount, currency and price used",
    "owned_object": "ownership: the stored object the request was about (kind, id)",
    "personal_data": "personal_data: the app's mode and what was found in the request, by kind (never the values)",
    "safety": "content_safety: each check (harm or shield, input or output) with its severities or attack verdicts, latency, a failure and what it led to, blocks with their categories (never the text)",
}


def build_record(ctx: RequestContext, content_level: str, retention_days: int, contributions: Iterable[dict[str, Any]] = ()) -> dict[str, Any]:
    body = ctx.body if isinstance(ctx.body, dict) else {}
    if ctx.route is not None:
        body = without_credentials(ctx.route.operation, body)  # never a credential at rest
    content_fields = ctx.route.operation.content_fields if ctx.route else ()
    prompt = {k: body[k] for k in content_fields if k in body} or None
    parameters = {k: v for k, v in body.items() if k not in content_fields}
    error = None
    if ctx.error is not None:
        error = {"code": getattr(ctx.error, "code", "internal_error"), "message": str(ctx.error)}
    elif ctx.stream_summary is not None and ctx.stream_summary.error:
        error = {k: ctx.stream_summary.error.get(k) for k in ("code", "message")}
    elif ctx.result is not None and ctx.result.status >= 400 and isinstance(ctx.result.json, dict):
        upstream_error = ctx.result.json.get("error") or {}
        if isinstance(upstream_error, dict):
            error = {"code": upstream_error.get("code"), "message": upstream_error.get("message"), "source": "upstream"}
    upstream = ctx.upstream
    record: dict[str, Any] = {
        "id": ctx.request_id,
        "timestamp": ctx.received_at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "app_id": ctx.app_id or "anonymous",
        "app_name": ctx.app_name,
        "user_id": ctx.user_id,
        "tenant_id": ctx.tenant_id,
        "method": ctx.http.method,
        "path": ctx.http.scope["path"],
        "operation": ctx.route.operation.name if ctx.route else None,
        "api_style": ctx.route.style.value if ctx.route else None,
        "api_version": ctx.api_version,
        "deployment": ctx.deployment,
        "model": _model(ctx),
        "stream": ctx.stream,
        "status": ctx.status,
        "error": error,
        "prompt": _apply_content_level(content_level, prompt),
        "parameters": parameters,
        "response": _apply_content_level(content_level, _response_content(ctx)),
        "content_logging": content_level,
        "usage": (ctx.usage if ctx.usage is not None else usage_of(ctx)).as_dict(),
        "latency_ms": ctx.elapsed_ms(ctx.started, ctx.finished_at),
        "upstream_latency_ms": ctx.elapsed_ms(upstream.started, upstream.headers_at),
        "time_to_first_byte_ms": ctx.elapsed_ms(ctx.started, ctx.first_byte_at),
        "upstream_request_id": upstream.request_id,
        "backend": upstream.backend,
        "instance": INSTANCE,
        "retries": upstream.retries,
        "request_bytes": len(ctx.raw_body),
        "client": {"ip": ctx.http.client.host if ctx.http.client else None, "user_agent": ctx.http.headers.get("user-agent")},
        "properties": ctx.properties,
        "guard": ctx.guard_decisions,
        "ttl": retention_days * 86400,
    }
    if upstream.attempts:
        record["attempts"] = upstream.attempts
    if ctx.client_disconnected:
        record["client_disconnected"] = True
    if ctx.job is not None:
        record["job"] = ctx.job
    if ctx.settles is not None:
        record["settles"] = ctx.settles
    kept_private = ctx.personal_data
    if getattr(kept_private, "mode", None) == "mask_in_log":  # the model got the values; the log never does
        for name in ("prompt", "parameters", "response"):
            record[name] = mask_values(record[name], kept_private.kinds)
    for part in contributions:
        for name, value in part.items():
            if name in RECORD_FIELDS:
                record[name] = value
            else:  # a stage wrote a field nobody declared: a bug, kept out of the store's schema
                logger.error("log record field %r is not declared in RECORD_FIELDS; left out", name)
    return record


class LogRequest(Stage):
    """Last stage: every request that reached the gateway leaves exactly one record, built from
    the core of the context and each stage's own part (`Stage.record`)."""

    name = REQUEST_LOG

    def __init__(self, writer: "LogWriter", default_content: str, default_retention_days: int) -> None:
        self._writer = writer
        self._default_content = default_content
        self._default_retention = default_retention_days
        self.pipelines: dict[Any, list[Stage]] = {}  # per operation; the gateway fills it

    async def finish(self, ctx: RequestContext) -> None:
        policy = ctx.policy
        content = policy.content_logging if policy else self._default_content
        retention = policy.retention_days if policy else self._default_retention
        stages = self.pipelines.get(ctx.route.operation, ()) if ctx.route is not None else ()
        record = build_record(ctx, content, retention, (stage.record(ctx) for stage in stages))
        self._writer.submit(record)
        telemetry.emit(record)


def _spool_line(record: dict[str, Any]) -> str:
    return json.dumps(record, default=str, ensure_ascii=False)  # default=str: a spool never refuses a record


def _write_lines(handle, records: list[dict[str, Any]]) -> None:
    for record in records:
        handle.write(_spool_line(record) + "\n")
    handle.flush()


class LogSpool:
    """Records the store could not take, kept on local disk until a writer can write them.

    One file per writer process, locked (flock) by its writer while that process lives. A
    starting writer replays the files it can lock — those of writers that are gone — for the
    same store only, holding the lock while it works, so two workers never replay one file."""

    def __init__(self, directory: str | Path, store_key: str) -> None:
        self._dir = Path(directory)
        self._prefix = "spool-" + hashlib.sha256(store_key.encode()).hexdigest()[:12]
        self._file = self._dir / f"{self._prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        self._own = None  # our file, opened and locked on first use

    def _open_own(self) -> None:
        if self._own is None:
            self._dir.mkdir(parents=True, exist_ok=True)
            self._own = open(self._file, "a", encoding="utf-8")
            fcntl.flock(self._own, fcntl.LOCK_EX)

    def append_encoded(self, items: list[EncodedLog]) -> None:
        self._open_own()
        for item in items:
            self._own.write(item.blob.decode("utf-8") + "\n")
        self._own.flush()

    def take_own(self) -> tuple[list[dict[str, Any]], int]:
        """What this writer spooled, and where that ends in its file (it holds the lock). The file
        stays as it is until `finish_own`: a crash meanwhile loses nothing."""
        if self._own is None:
            return [], 0
        with open(self._file, "r", encoding="utf-8") as source:
            text = source.read()
        records = self.read(io.StringIO(text))
        return records, len(text.encode("utf-8"))

    def finish_own(self, offset: int, left: list[dict[str, Any]]) -> None:
        """Keep only what was not written, plus what was appended since `take_own`."""
        with open(self._file, "r", encoding="utf-8") as source:
            source.seek(offset)
            appended = source.read()
        self._own.truncate(0)
        self._own.seek(0)
        _write_lines(self._own, left)
        self._own.write(appended)
        self._own.flush()

    def close(self) -> None:
        if self._own is not None:
            self._own.close()  # releases the lock: a later writer may replay it
            self._own = None

    def others(self):
        """(path, locked file) for every spool file of this store that no live writer holds."""
        for path in sorted(self._dir.glob(f"{self._prefix}-*.jsonl")) if self._dir.is_dir() else ():
            if path == self._file:
                continue
            try:
                handle = open(path, "r+", encoding="utf-8")
            except OSError:
                continue
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.close()  # its writer is alive, or another writer is replaying it
                continue
            yield path, handle

    @staticmethod
    def read(handle) -> list[dict[str, Any]]:
        records = []
        for line in handle.read().split("\n"):  # not splitlines(): JSON text may hold U+2028 and friends
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except ValueError:
                logger.error("unreadable line in the log spool skipped")
        return records

    @staticmethod
    def keep_only(handle, records: list[dict[str, Any]]) -> None:
        """Rewrite a locked spool file with what is still to be written."""
        handle.seek(0)
        handle.truncate()
        _write_lines(handle, records)


class LogWriter:
    """Batches log records in memory and writes them from one background task.

    Records are encoded when they are queued (`EncodedLog`: their JSON and indexed fields) and
    their roll-up contribution worked out then, so a backlog under load holds bytes, not the
    request's objects. Past `_MAX_QUEUED_RECORDS` the oldest go to this writer's spool, which
    it replays itself once it has caught up."""

    def __init__(self, store: Store, flush_interval: float, batch_size: int, zone=None, spool: LogSpool | None = None) -> None:
        self._store = store
        self._spool = spool
        self._zone = zone  # the roll-ups' day boundaries; None: no roll-ups (tests of the writer alone)
        self._interval = flush_interval
        self._batch_size = batch_size
        self._queue: list[tuple[EncodedLog, Contribution | None]] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task | None = None
        self._closing = False
        self._hurry = False  # a flush asked to write now instead of gathering a batch
        self._own_spooled = 0  # records this writer spooled while running, to replay when caught up
        self.written = 0
        self.failed_attempts = 0
        self.spilled = 0  # to the fallback sink (the Python logger)
        self.spooled = 0  # to the local spool, for a later writer to replay
        self.replayed = 0
        self.rollup_failures = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="sekisho-log-writer")

    @property
    def queued(self) -> int:
        return len(self._queue)

    def _encode(self, record: dict[str, Any]) -> tuple[EncodedLog, Contribution | None] | None:
        try:
            encoded = EncodedLog.of(record, is_final(record))
        except Exception:  # a record that cannot be encoded (a bug): keep its text where it can be found
            logger.exception("request log record %s cannot be encoded", record.get("id"))
            self.spilled += 1
            logger.error("request log record not stored: %s", _spool_line(record))
            return None
        try:
            share = contribution(record, self._zone) if self._zone else None
        except Exception:  # the record is still stored; only the roll-ups miss it (counted)
            logger.exception("request log record %s has no roll-up contribution", record.get("id"))
            self.rollup_failures += 1
            share = None
        return encoded, share

    def submit(self, record: dict[str, Any]) -> None:
        """Queue one record; never blocks, never raises."""
        item = self._encode(record)
        if item is None:
            return
        self._queue.append(item)
        self._idle.clear()
        if len(self._queue) > _MAX_QUEUED_RECORDS:
            overflow = len(self._queue) - _MAX_QUEUED_RECORDS // 2
            self._spill(self._queue[:overflow])
            self._own_spooled += overflow
            del self._queue[:overflow]
        if len(self._queue) == 1 or len(self._queue) >= self._batch_size:
            self._wake.set()

    def _spill(self, items: list[tuple[EncodedLog, Contribution | None]]) -> None:
        """The store cannot take these now: to the spool, else to the fallback sink."""
        if self._spool is not None:
            try:
                self._spool.append_encoded([encoded for encoded, _ in items])
                self.spooled += len(items)
                return
            except OSError:
                logger.exception("log spool not writable; %s records go to the fallback sink", len(items))
        self._to_fallback(items)

    def _to_fallback(self, items: list[tuple[EncodedLog, Contribution | None]]) -> None:
        self.spilled += len(items)
        for encoded, _ in items:
            logger.error("request log record not stored: %s", encoded.blob.decode("utf-8", "replace"))

    async def _write_all(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Write spooled records in batches; returns those not written (the store went away)."""
        pairs = [(record, item) for record, item in ((r, self._encode(r)) for r in records) if item is not None]
        done = 0
        try:
            while done < len(pairs):
                batch = [item for _, item in pairs[done : done + self._batch_size]]
                await self._store.write_encoded_logs([encoded for encoded, _ in batch])
                await self._roll_up(batch)
                done += len(batch)
                self.replayed += len(batch)
        except StoreUnavailable as exc:
            logger.warning("log spool replay stopped, the rest kept for later: %s", exc)
        except Exception:
            logger.exception("log spool records the store refuses go to the fallback sink")
            self._to_fallback([item for _, item in pairs[done:]])
            return []
        return [record for record, _ in pairs[done:]]

    async def _replay_spool(self) -> None:
        """Write what earlier writers on this disk could not; what still fails stays spooled."""
        if self._spool is None:
            return
        for path, handle in self._spool.others():
            try:
                left = await self._write_all(self._spool.read(handle))
                if left:
                    self._spool.keep_only(handle, left)  # only what was not written
                    return
                path.unlink(missing_ok=True)
            finally:
                handle.close()

    async def _replay_own(self) -> None:
        """Caught up after an overflow: write what this writer spooled meanwhile."""
        self._own_spooled = 0
        records, offset = self._spool.take_own()
        left = await self._write_all(records)
        self._spool.finish_own(offset, left)  # what still fails stays for a later start

    async def _run(self) -> None:
        backoff = self._interval
        await self._replay_spool()
        while True:
            if not self._queue:
                if self._own_spooled and self._spool is not None and not self._closing:
                    await self._replay_own()
                    continue
                self._idle.set()
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if len(self._queue) < self._batch_size and not (self._closing or self._hurry):
                # Let a batch gather for up to one interval; a full batch or a flush ends the wait.
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=self._interval)
                except asyncio.TimeoutError:
                    pass
            self._hurry = False
            while self._queue:
                # A bigger batch when behind: one transaction carries more, and the backlog shrinks.
                size = self._batch_size if len(self._queue) < 4 * self._batch_size else 4 * self._batch_size
                # Off the queue before the write: an overflow meanwhile must not spool these too.
                batch = self._queue[:size]
                del self._queue[:size]
                try:
                    await self._store.write_encoded_logs([encoded for encoded, _ in batch])
                except StoreUnavailable as exc:
                    self.failed_attempts += 1
                    self._queue[:0] = batch  # back to the front, in order
                    logger.warning("request log write failed (%s records queued): %s", len(self._queue), exc)
                    if self._closing:
                        self._spill(self._queue)
                        self._queue.clear()
                        break
                    await asyncio.sleep(min(backoff, 5.0))
                    backoff *= 2
                    continue
                except Exception:  # refused (StoreError) or a bug: a bad record must not stop the others
                    logger.exception("request log batch refused; writing it one by one")
                    await self._write_one_by_one(batch)
                    continue
                backoff = self._interval
                self.written += len(batch)
                await self._roll_up(batch)

    async def _write_one_by_one(self, batch: list[tuple[EncodedLog, Contribution | None]]) -> None:
        written = []
        for item in batch:
            try:
                await self._store.write_encoded_logs([item[0]])
                written.append(item)
            except StoreUnavailable:
                self._spill([item])  # the store went away meanwhile: keep it for later
            except Exception:
                self._to_fallback([item])  # this record itself is refused: a spool would not help
        self.written += len(written)
        await self._roll_up(written)

    async def _roll_up(self, batch: list[tuple[EncodedLog, Contribution | None]]) -> None:
        """Add a written batch to the usage roll-ups. Not retried: a retry after a partial
        failure would count twice; failures are counted and logged (a recount repairs them)."""
        if self._zone is None:
            return
        deltas = sum_contributions(item[1] for item in batch)
        if not deltas:
            return
        try:
            await self._store.add_rollups(deltas)
        except Exception:
            self.rollup_failures += 1
            logger.exception("usage roll-up update failed for %s records", len(batch))

    async def flush(self) -> None:
        """Wait until every queued record has been written (or spilled)."""
        if self._task is None:
            return
        self._hurry = True
        self._wake.set()
        await self._idle.wait()

    async def close(self) -> None:
        if self._task is None:
            return
        self._closing = True
        self._wake.set()
        try:
            await asyncio.wait_for(self._task, timeout=30)
        except asyncio.TimeoutError:
            self._task.cancel()
            self._spill(self._queue)
            self._queue.clear()
        self._task = None
        if self._spool is not None:
            self._spool.close()


# The export's CSV: one row per record, the columns an analyst filters and sums by (the JSON lines
# export has every field).
CSV_COLUMNS: tuple[tuple[str, Callable[[dict[str, Any]], Any]], ...] = (
    ("id", lambda r: r.get("id")), ("timestamp", lambda r: r.get("timestamp")), ("app_id", lambda r: r.get("app_id")),
    ("app_name", lambda r: r.get("app_name")), ("user_id", lambda r: r.get("user_id")), ("operation", lambda r: r.get("operation")),
    ("deployment", lambda r: r.get("deployment")), ("model", lambda r: r.get("model")), ("stream", lambda r: r.get("stream")),
    ("status", lambda r: r.get("status")), ("error_code", lambda r: (r.get("error") or {}).get("code")),
    ("prompt_tokens", lambda r: (r.get("usage") or {}).get("prompt_tokens")),
    ("completion_tokens", lambda r: (r.get("usage") or {}).get("completion_tokens")),
    ("cached_tokens", lambda r: (r.get("usage") or {}).get("cached_tokens")),
    ("total_tokens", lambda r: (r.get("usage") or {}).get("total_tokens")),
    ("cost", lambda r: (r.get("cost") or {}).get("amount")), ("currency", lambda r: (r.get("cost") or {}).get("currency")),
    ("latency_ms", lambda r: r.get("latency_ms")), ("cache_status", lambda r: (r.get("cache") or {}).get("status")),
    ("guard_actions", lambda r: ",".join(sorted({str(d.get("action")) for d in r.get("guard") or ()}))),
    ("backend", lambda r: r.get("backend")), ("retries", lambda r: r.get("retries")),
)


async def jsonl_lines(records: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    """The JSON lines export: every field of every record, a line each."""
    async for record in records:
        yield orjson.dumps(record) + b"\n"


async def csv_lines(records: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    """The CSV export, a line at a time (cells that look like formulas are kept as text)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)

    def line(cells) -> bytes:
        buffer.seek(0)
        buffer.truncate()
        writer.writerow(cells)
        return buffer.getvalue().encode()

    yield line([name for name, _ in CSV_COLUMNS])
    async for record in records:
        yield line([csv_cell(read(record)) for _, read in CSV_COLUMNS])
