"""The storage interface every adapter implements, and the data layout both share.

Records are plain JSON-able dicts. Each kind of record lives in one named container (a Cosmos
container, an SQLite table) with one partition key; `CONTAINERS` is the single list of them,
read by the adapters and checked against the Bicep by the tests. Policies, counters and the
response cache join this list in their own issues.
"""
from __future__ import annotations

import abc
import asyncio
import re
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import orjson


@dataclass(frozen=True)
class Container:
    name: str
    partition_key: str  # a top-level field of every record, as a Cosmos path
    default_ttl: bool  # records expire (per-record `ttl` seconds)


REQUEST_LOGS = Container("request_logs", "/app_id", default_ttl=True)
POLICIES = Container("policies", "/app_id", default_ttl=False)
QUOTA_COUNTERS = Container("quota_counters", "/subject", default_ttl=True)
PRICES = Container("prices", "/id", default_ttl=False)
RESPONSE_CACHE = Container("response_cache", "/scope", default_ttl=True)
DEPLOYMENTS = Container("deployments", "/id", default_ttl=False)
JOBS = Container("jobs", "/app_id", default_ttl=True)
USAGE_ROLLUPS = Container("usage_rollups", "/app_id", default_ttl=False)
ADMIN_SESSIONS = Container("admin_sessions", "/id", default_ttl=True)
OWNED_OBJECTS = Container("owned_objects", "/app_id", default_ttl=True)  # what an app created upstream (stored responses)
GATEWAY_KEYS = Container("gateway_keys", "/id", default_ttl=False)  # api-keys for tools that cannot send a token (their hashes)
BUDGET_ALERTS = Container("budget_alerts", "/app_id", default_ttl=True)  # one per threshold crossed per window (quota/alerts.py)
CONTAINERS: tuple[Container, ...] = (
    REQUEST_LOGS, POLICIES, QUOTA_COUNTERS, PRICES, RESPONSE_CACHE, DEPLOYMENTS, JOBS, USAGE_ROLLUPS, ADMIN_SESSIONS, OWNED_OBJECTS,
    GATEWAY_KEYS, BUDGET_ALERTS,
)


@dataclass(slots=True)
class EncodedLog:
    """A log record encoded once, when it is queued: its JSON, and the fields stores index.
    Queued records are kept like this (a fraction of the memory of the dicts they came from)."""

    id: str
    app_id: str
    user_id: str | None
    deployment: str | None
    status: int | None
    timestamp: str
    ttl: int | None
    final: bool  # False: a submitted job's 202, which never replaces a record (see write_logs)
    blob: bytes

    @classmethod
    def of(cls, record: dict[str, Any], final: bool) -> "EncodedLog":
        return cls(str(record["id"]), str(record.get("app_id") or "anonymous"), record.get("user_id"), record.get("deployment"),
                   record.get("status"), str(record.get("timestamp") or ""), record.get("ttl"), final, orjson.dumps(record))

    def record(self) -> dict[str, Any]:
        return orjson.loads(self.blob)


class StoreError(Exception):
    """The store refused an operation (bad data, conflict)."""


class StoreUnavailable(StoreError):
    """The store could not be reached; the caller may retry later."""


class AlreadyExists(StoreError):
    """Create-only write of a record that exists."""


class PreconditionFailed(StoreError):
    """The record changed since it was read (ETag mismatch), or is gone."""


class CounterCharge(NamedTuple):
    """Add `amount` to one counter (subject + counter name, e.g. "app:X" + "tpm:2026-11-24T10:05"),
    but only if the result stays within `limit` (None: no limit). `ttl` seconds after its window.

    A named tuple rather than a frozen dataclass: every request with limits makes one per limit,
    and a frozen dataclass is four times slower to make (each field set through object.__setattr__)."""

    subject: str
    counter: str
    amount: int
    limit: int | None
    ttl: int


@dataclass(frozen=True)
class ReserveOutcome:
    admitted: bool
    used: list[int]  # each counter's value after the reservation (or now, if refused)
    failed: int | None = None  # index of the first charge that would have crossed its limit


@dataclass(frozen=True)
class LogQuery:
    """Filters for the request log; every field is optional. Newest first."""

    app_id: str | None = None
    user_id: str | None = None
    deployment: str | None = None
    status: int | None = None
    since: str | None = None  # ISO-8601 UTC timestamp, inclusive
    until: str | None = None  # exclusive
    cache: str | None = None  # HIT, MISS or BYPASS
    guard: bool | None = None  # True: a guard acted (blocked or redacted); False: none did
    limit: int = 100  # at most MAX_LOG_PAGE + 1 (one more than a page: is there more?)
    # Paging: only records after this one in the order (newest first: timestamp, then id).
    after: tuple[str, str] | None = None


MAX_LOG_PAGE = 1000


# Any timestamp and id (the order compares them as strings); no control characters.
_CURSOR = re.compile(r"([^~\x00-\x1f\x7f]{1,64})~([^\x00-\x1f\x7f]{1,256})")


def log_cursor(record: dict[str, Any]) -> str:
    """A cursor naming a record's place in the log's order: its timestamp and id, `<time>~<id>`.
    Any such place is a valid cursor (the next page starts after it), so nothing in it is secret
    or needs checking beyond its shape."""
    return f"{record['timestamp']}~{record['id']}"


def read_log_cursor(cursor: str) -> tuple[str, str]:
    """The (timestamp, id) a cursor names; ValueError when it does not have the shape."""
    found = _CURSOR.fullmatch(cursor)
    if found is None:
        raise ValueError("not a log cursor: <timestamp>~<request id>, as next_cursor gives it")
    return found.group(1), found.group(2)


def sorted_newest_first(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(records, key=lambda r: (r.get("timestamp") or "", r.get("id") or ""), reverse=True)


class Store(abc.ABC):
    """Async storage used by the gateway. Adapters must be safe for concurrent use in one event loop."""

    name: str = "abstract"

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and create what is missing (tables, database, containers)."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    # Request log ---------------------------------------------------------------
    @abc.abstractmethod
    async def write_logs(self, records: list[dict[str, Any]]) -> None:
        """Write records, replacing a record with the same id — except records that are not final
        (the 202 of a submitted job, `telemetry.is_final`), which never replace an existing one:
        a late 202 must not overwrite the job's own record."""

        """Write log records (each has `id`, `app_id`, `timestamp`, `ttl`). Idempotent per `id`."""

    async def write_encoded_logs(self, items: list[EncodedLog]) -> None:
        """write_logs for records queued encoded; adapters that store JSON as it is override it."""
        await self.write_logs([item.record() for item in items])

    @abc.abstractmethod
    async def get_log(self, request_id: str) -> dict[str, Any] | None: ...

    @abc.abstractmethod
    async def query_logs(self, query: LogQuery) -> list[dict[str, Any]]:
        """Records matching the filters, newest first (timestamp, then id), at most `limit`,
        after `query.after` when given. Paging with the last record's place as the next `after`
        returns every record that existed when paging began exactly once, whatever is written
        meanwhile (ids never change place: a record's timestamp is when its request arrived)."""

    async def iter_logs(self, query: LogQuery, page_size: int = 500):
        """Every matching record, newest first, a page at a time: memory stays one page deep
        whatever the range (exports)."""
        after = query.after
        while True:
            page = await self.query_logs(replace(query, limit=page_size, after=after))
            for record in page:
                yield record
            if len(page) < page_size:
                return
            after = (page[-1]["timestamp"], page[-1]["id"])

    # Policies (optimistic concurrency with ETags) -------------------------------------
    @abc.abstractmethod
    async def get_policy(self, app_id: str, doc_id: str) -> dict[str, Any] | None:
        """The document with its current `etag`, or None."""

    @abc.abstractmethod
    async def list_policies(self, app_id: str | None = None) -> list[dict[str, Any]]: ...

    @abc.abstractmethod
    async def put_policy(self, doc: dict[str, Any], if_match: str | None = None, create_only: bool = False) -> dict[str, Any]:
        """Write a document; returns it with its new `etag`.

        `if_match`: only replace the stored version with this ETag (PreconditionFailed otherwise,
        also when it does not exist). `create_only`: fail with AlreadyExists if it exists."""

    @abc.abstractmethod
    async def delete_policy(self, app_id: str, doc_id: str, if_match: str | None = None) -> bool:
        """Delete; False if it did not exist. PreconditionFailed on an ETag mismatch."""

    # Quota counters ------------------------------------------------------------------
    @abc.abstractmethod
    async def reserve(self, charges: list[CounterCharge]) -> ReserveOutcome:
        """All or nothing: apply every charge, or none if any would cross its limit.

        Under concurrency no counter ever ends above its limit. (Cosmos applies the charges one
        by one with conditional patches and undoes them on a refusal, so a concurrent request may
        briefly see another's undone charge and be refused conservatively.)"""

    @abc.abstractmethod
    async def adjust(self, charges: list[CounterCharge]) -> None:
        """Add (or, negative, take back) amounts without a limit check: settlement and release."""

    @abc.abstractmethod
    async def read_counters(self, subject: str, counters: list[str]) -> dict[str, int]: ...

    @abc.abstractmethod
    async def reset_counters(self, subject: str, counters: list[str]) -> None: ...

    # Documents keyed by id alone: adapters provide these four, prices and the catalogue use them
    @abc.abstractmethod
    async def _get_doc(self, container: str, doc_id: str) -> dict[str, Any] | None: ...

    @abc.abstractmethod
    async def _list_docs(self, container: str) -> list[dict[str, Any]]: ...

    @abc.abstractmethod
    async def _put_doc(self, container: str, doc: dict[str, Any]) -> dict[str, Any]: ...

    @abc.abstractmethod
    async def _delete_doc(self, container: str, doc_id: str) -> bool: ...

    # Prices --------------------------------------------------------------------------
    async def list_prices(self) -> list[dict[str, Any]]:
        return await self._list_docs(PRICES.name)

    async def put_price(self, doc: dict[str, Any]) -> dict[str, Any]:
        return await self._put_doc(PRICES.name, doc)

    async def delete_price(self, model: str) -> bool:
        return await self._delete_doc(PRICES.name, model)

    # Response cache ----------------------------------------------------------------------
    @abc.abstractmethod
    async def cache_get(self, scope: str, key: str) -> dict[str, Any] | None:
        """The entry, or None when missing or expired."""

    @abc.abstractmethod
    async def cache_put(self, scope: str, key: str, entry: dict[str, Any], ttl: int) -> None: ...

    async def cache_put_many(self, items: list[tuple[str, str, dict[str, Any], bytes, int]]) -> None:
        """(scope, key, entry, entry as JSON, ttl) for several entries; adapters may do it in one call."""
        results = await asyncio.gather(*(self.cache_put(scope, key, entry, ttl) for scope, key, entry, _, ttl in items), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise failed[0]

    @abc.abstractmethod
    async def cache_purge(self, scope: str) -> int:
        """Delete every entry of a scope; returns how many."""

    # Deployment catalogue (backends per deployment) -----------------------------------------
    async def get_deployment(self, name: str) -> dict[str, Any] | None:
        return await self._get_doc(DEPLOYMENTS.name, name)

    async def list_deployments(self) -> list[dict[str, Any]]:
        return await self._list_docs(DEPLOYMENTS.name)

    async def put_deployment(self, doc: dict[str, Any]) -> dict[str, Any]:
        return await self._put_doc(DEPLOYMENTS.name, doc)

    async def delete_deployment(self, name: str) -> bool:
        return await self._delete_doc(DEPLOYMENTS.name, name)

    # Objects apps create upstream (one document per object, partitioned by the owning app) ------
    @abc.abstractmethod
    async def get_owned(self, app_id: str, kind: str, object_id: str) -> dict[str, Any] | None:
        """The record of `object_id` if the app created it (and it has not expired), else None:
        another app's object is indistinguishable from a missing one."""

    @abc.abstractmethod
    async def put_owned(self, doc: dict[str, Any], if_match: str | None = None) -> str:
        """Record (or update) an object an app created: `app_id`, `kind`, `object_id`, `ttl`, …;
        returns the record's new ETag (get_owned answers it as `etag`). `if_match`: only replace
        that version (PreconditionFailed if it changed or is gone), so that two instances noticing
        the end of one batch cannot both settle it."""

    @abc.abstractmethod
    async def delete_owned(self, app_id: str, kind: str, object_id: str) -> bool: ...

    @abc.abstractmethod
    async def list_owned(self, app_id: str, kind: str, limit: int, before: str | None = None) -> list[dict[str, Any]]:
        """The app's objects of a kind, newest first (by `sort_key`, which put_owned sets), at most
        `limit`, only those sorting before `before` (a sort key) when given."""

    @abc.abstractmethod
    async def list_open_owned(self, limit: int) -> list[dict[str, Any]]:
        """Records of every app whose work is still running upstream (`open: true`: batches and
        background responses not yet settled), oldest first, at most `limit`, with their `etag`."""


    # Async jobs (one document per job, partitioned by the app that owns it) -------------------
    @abc.abstractmethod
    async def get_job(self, app_id: str, job_id: str) -> dict[str, Any] | None:
        """The job with its current `etag`, or None when missing, expired, or another app's."""

    @abc.abstractmethod
    async def put_job(self, doc: dict[str, Any], if_match: str | None = None) -> str:
        """Create or replace a job document (expiring `doc["ttl"]` seconds after this write);
        returns its new ETag. `if_match`: only replace that version (PreconditionFailed if it
        changed), so that two runs of one job step cannot both finish it."""

    # Usage roll-ups (rollups.py) -----------------------------------------------------------------
    @abc.abstractmethod
    async def add_rollups(self, deltas: list[Any]) -> None:
        """Add each RollupDelta's counts to its document (created at zero when missing)."""

    @abc.abstractmethod
    async def query_rollups(self, app_id: str | None = None, since: str | None = None, until: str | None = None) -> list[dict[str, Any]]:
        """Roll-up documents of one app (or all), for days from `since` to `until` inclusive."""

    # Budget alerts: one document per threshold crossed per window, in its app's partition -------
    @abc.abstractmethod
    async def claim_alert(self, doc: dict[str, Any]) -> bool:
        """Create the alert document (`id`, `app_id`, `sort_key`, `ttl`, …) unless one with its id
        exists: True for the one caller, across every instance, that created it."""

    @abc.abstractmethod
    async def update_alert(self, doc: dict[str, Any]) -> None:
        """Replace a claimed alert's document (its delivery state)."""

    @abc.abstractmethod
    async def list_alerts(self, app_id: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Alerts of one app (or every app), newest first (by `sort_key`), at most `limit`."""

    # Gateway keys: one document per key, by its id (the key's public part); never the key ------
    async def get_gateway_key(self, key_id: str) -> dict[str, Any] | None:
        return await self._get_doc(GATEWAY_KEYS.name, key_id)

    async def list_gateway_keys(self, app_id: str) -> list[dict[str, Any]]:
        return [doc for doc in await self._list_docs(GATEWAY_KEYS.name) if doc.get("app_id") == app_id]

    async def put_gateway_key(self, doc: dict[str, Any]) -> None:
        await self._put_doc(GATEWAY_KEYS.name, doc)

    # Admin page sign-in: one-time login codes and sessions, by the hash of their secret -----------
    async def put_admin_session(self, doc: dict[str, Any]) -> None:
        await self._put_doc(ADMIN_SESSIONS.name, doc)

    async def get_admin_session(self, doc_id: str) -> dict[str, Any] | None:
        return await self._get_doc(ADMIN_SESSIONS.name, doc_id)

    async def delete_admin_session(self, doc_id: str) -> bool:
        return await self._delete_doc(ADMIN_SESSIONS.name, doc_id)


def owned_sort_key(doc: dict[str, Any]) -> str:
    """Newest first, ties broken by id: the creation time in milliseconds, then the object id."""
    return f"{int(doc.get('created_ms') or doc.get('created_at', 0) * 1000):015d}:{doc['object_id']}"
