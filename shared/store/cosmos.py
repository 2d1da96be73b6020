"""Cosmos DB (NoSQL API) adapter: production.

Uses the async azure-cosmos client. Authentication is Entra ID (the Function App's managed
identity, with the "Cosmos DB Built-in Data Contributor" data-plane role) unless a key is set,
which only the local emulator and tests do. The database and containers are created at start
when missing; records expire through Cosmos TTL (`ttl` on each record, default TTL -1 on the
container so that TTL is on and records without one never expire).
"""
from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import quote

from azure.core import MatchConditions
from azure.core.exceptions import ServiceRequestError, ServiceResponseError
from azure.cosmos import PartitionKey, exceptions
from azure.cosmos.aio import CosmosClient

from ..records.rollups import ROLLUP_COUNTERS
from ..records.telemetry import is_final
from .base import (
    BUDGET_ALERTS, CONTAINERS, JOBS, MAX_LOG_PAGE, OWNED_OBJECTS, POLICIES, QUOTA_COUNTERS, REQUEST_LOGS, RESPONSE_CACHE, USAGE_ROLLUPS, AlreadyExists, CounterCharge, LogQuery,
    PreconditionFailed, ReserveOutcome, Store, StoreError, StoreUnavailable, owned_sort_key, sorted_newest_first,
)

_WRITE_CONCURRENCY = 16
_MAX_IN_FLIGHT = 48
_COSMOS_FIELDS = ("_rid", "_self", "_etag", "_attachments", "_ts", "_lsn")


async def _first(items) -> dict[str, Any] | None:
    """The first result of a query, reading the pager to its end: leaving an async pager
    half-read keeps its HTTP connection out of the pool, and enough of them exhaust it."""
    found = [item async for item in items]
    return found[0] if found else None


def _clean(doc: dict[str, Any]) -> dict[str, Any]:
    for key in _COSMOS_FIELDS:
        doc.pop(key, None)
    _as_written(doc)
    return doc


_INT_RANGE = (-(2**63), 2**64 - 1)  # what orjson writes (and reads) as an integer


def _as_written(value: Any) -> None:
    """Cosmos keeps numbers as doubles and answers a large one without an exponent: a field that
    went in as 1.8446744073709552e+19 comes back as the integer 18446744073709552000, which orjson
    cannot write (the log's API and export would fail on that record). Such integers are turned
    back into the floats they were, in place."""
    stack = [value]
    while stack:
        item = stack.pop()
        pairs = item.items() if isinstance(item, dict) else enumerate(item)
        for key, child in pairs:
            if isinstance(child, int) and not isinstance(child, bool) and not _INT_RANGE[0] <= child <= _INT_RANGE[1]:
                item[key] = float(child)
            elif isinstance(child, (dict, list)):
                stack.append(child)


def _if_match(etag: str | None) -> dict[str, Any]:
    """The SDK's conditional-write arguments. An empty If-Match is the empty list of ETags
    (RFC 9110): no version matches it, so the write is refused as a failed precondition (the
    SDK itself refuses an empty ETag with a ValueError)."""
    if etag is None:
        return {}
    if not etag:
        raise PreconditionFailed("an empty If-Match matches no version")
    return {"etag": etag, "match_condition": MatchConditions.IfNotModified}


async def _write_versioned(container, body: dict[str, Any], if_match: str | None) -> str:
    """Create or replace an item; with `if_match`, only that version of it. Returns the new ETag."""
    try:
        if if_match is None:
            item = await container.upsert_item(body)
        else:
            item = await container.replace_item(body["id"], body, **_if_match(if_match))
    except (exceptions.CosmosResourceNotFoundError, exceptions.CosmosAccessConditionFailedError):
        raise PreconditionFailed(f"{body['id']} has changed") from None
    return item["_etag"]


def _owned(item: dict[str, Any]) -> dict[str, Any]:
    _as_written(item)
    return {**{k: v for k, v in item.items() if not k.startswith("_") and k != "expires_at"}, "etag": item.get("_etag")}


class CosmosStore(Store):
    name = "cosmos"

    def __init__(self, endpoint: str, key: str | None, database: str, verify_tls: bool = True) -> None:
        self._endpoint = endpoint
        self._key = key
        self._database_name = database
        self._verify_tls = verify_tls
        self._client: CosmosClient | None = None
        self._credential = None
        self._containers: dict[str, Any] = {}
        # Bounds the requests in flight from this instance: under a burst the SDK's own
        # connection pool otherwise fills up with requests whose retries need it too.
        self._in_flight = asyncio.Semaphore(_MAX_IN_FLIGHT)

    async def open(self) -> None:
        if self._client is not None:
            return
        if self._key:
            credential: Any = self._key
        else:
            from azure.identity.aio import DefaultAzureCredential

            credential = self._credential = DefaultAzureCredential()
        kwargs: dict[str, Any] = {}
        if not self._verify_tls:
            kwargs["connection_verify"] = False
        self._client = CosmosClient(self._endpoint, credential=credential, **kwargs)
        try:
            database = await self._client.create_database_if_not_exists(self._database_name)
            for container in CONTAINERS:
                self._containers[container.name] = await database.create_container_if_not_exists(
                    container.name,
                    partition_key=PartitionKey(path=container.partition_key),
                    default_ttl=-1 if container.default_ttl else None,
                )
        except (ServiceRequestError, ServiceResponseError) as exc:
            await self.close()
            raise StoreUnavailable(f"Cosmos DB at {self._endpoint} is unreachable: {exc}") from exc

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
        if self._credential is not None:
            await self._credential.close()
            self._credential = None

    def _container(self, name: str):
        if name not in self._containers:
            raise StoreUnavailable("the Cosmos store is not open")
        return self._containers[name]

    # Request log ---------------------------------------------------------------
    async def write_logs(self, records: list[dict[str, Any]]) -> None:
        container = self._container(REQUEST_LOGS.name)
        limit = asyncio.Semaphore(_WRITE_CONCURRENCY)

        async def write(record: dict[str, Any]) -> None:
            async with limit:
                if is_final(record):
                    await container.upsert_item(record)
                    return
                try:
                    await container.create_item(record)  # a late 202 never replaces the job's record
                except exceptions.CosmosResourceExistsError:
                    pass

        results = await asyncio.gather(*(write(r) for r in records), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            first = failures[0]
            if isinstance(first, exceptions.CosmosHttpResponseError) and first.status_code in (400, 413):
                raise StoreError(f"Cosmos refused {len(failures)} log record(s): {first.message}")
            raise StoreUnavailable(f"{len(failures)} of {len(records)} log writes failed: {first}") from first

    async def get_log(self, request_id: str) -> dict[str, Any] | None:
        container = self._container(REQUEST_LOGS.name)
        query = "SELECT * FROM c WHERE c.id = @id"
        item = await _first(container.query_items(query, parameters=[{"name": "@id", "value": request_id}]))
        return _clean(item) if item else None

    async def query_logs(self, query: LogQuery) -> list[dict[str, Any]]:
        container = self._container(REQUEST_LOGS.name)
        clauses, params = [], []
        for field in ("app_id", "user_id", "deployment", "status"):
            value = getattr(query, field)
            if value is not None:
                clauses.append(f"c.{field} = @{field}")
                params.append({"name": f"@{field}", "value": value})
        if query.since:
            clauses.append("c.timestamp >= @since")
            params.append({"name": "@since", "value": query.since})
        if query.until:
            clauses.append("c.timestamp < @until")
            params.append({"name": "@until", "value": query.until})
        if query.cache:
            clauses.append("c.cache.status = @cache")
            params.append({"name": "@cache", "value": query.cache})
        if query.guard is not None:
            clauses.append("ARRAY_LENGTH(c.guard) > 0" if query.guard else "(NOT IS_DEFINED(c.guard) OR ARRAY_LENGTH(c.guard) = 0)")
        if query.after is not None:
            clauses.append("(c.timestamp < @after_time OR (c.timestamp = @after_time AND c.id < @after_id))")
            params += [{"name": "@after_time", "value": query.after[0]}, {"name": "@after_id", "value": query.after[1]}]
        limit = max(1, min(query.limit, MAX_LOG_PAGE + 1))
        kwargs: dict[str, Any] = {}
        if query.app_id is not None:
            kwargs["partition_key"] = query.app_id

        async def select(extra: str, extra_params: list, top: str) -> list[dict[str, Any]]:
            where = " AND ".join(clauses + ([extra] if extra else []))
            sql = f"SELECT {top}* FROM c{' WHERE ' + where if where else ''} ORDER BY c.timestamp DESC"
            return [_clean(item) async for item in container.query_items(sql, parameters=params + extra_params, **kwargs)]

        # ORDER BY takes the timestamp alone (a second key would need a composite index): when the
        # page ends inside a run of equal timestamps, read that whole run, so that the page is
        # exactly the first `limit` records by (timestamp, id) and the next cursor misses none.
        page = await select("", [], f"TOP {limit} ")
        if len(page) == limit:
            last = page[-1]["timestamp"]
            ties = await select("c.timestamp = @tie", [{"name": "@tie", "value": last}], "")
            page = sorted_newest_first(list({r["id"]: r for r in page + ties}.values()))[:limit]
        return sorted_newest_first(page)

    # Policies --------------------------------------------------------------------------
    @staticmethod
    def _with_etag(item: dict[str, Any]) -> dict[str, Any]:
        etag = item.get("_etag")
        return {**_clean(item), "etag": etag}

    async def get_policy(self, app_id: str, doc_id: str) -> dict[str, Any] | None:
        container = self._container(POLICIES.name)
        # A single-partition query rather than read_item: the Cosmos test server fails point
        # reads of deleted items, and policy reads are cached in memory, so the RU cost is moot.
        # (The test server also wants the partition key named in the filter.)
        query = "SELECT * FROM c WHERE c.app_id = @app AND c.id = @id"
        params = [{"name": "@app", "value": app_id}, {"name": "@id", "value": doc_id}]
        item = await _first(container.query_items(query, parameters=params, partition_key=app_id))
        return self._with_etag(item) if item else None

    async def list_policies(self, app_id: str | None = None) -> list[dict[str, Any]]:
        container = self._container(POLICIES.name)
        if app_id is None:
            items = container.query_items("SELECT * FROM c ORDER BY c.app_id")
        else:
            items = container.query_items("SELECT * FROM c WHERE c.app_id = @app ORDER BY c.id", parameters=[{"name": "@app", "value": app_id}], partition_key=app_id)
        found = [self._with_etag(item) async for item in items]
        return sorted(found, key=lambda d: (d["app_id"], d["id"]))

    async def put_policy(self, doc: dict[str, Any], if_match: str | None = None, create_only: bool = False) -> dict[str, Any]:
        container = self._container(POLICIES.name)
        body = {k: v for k, v in doc.items() if k != "etag"}
        try:
            if create_only:
                item = await container.create_item(body)
            elif if_match is not None:
                item = await container.replace_item(body["id"], body, **_if_match(if_match))
            else:
                item = await container.upsert_item(body)
        except exceptions.CosmosResourceExistsError:
            raise AlreadyExists(f"policy {body['app_id']}/{body['id']} exists") from None
        except exceptions.CosmosResourceNotFoundError:
            raise PreconditionFailed(f"policy {body['app_id']}/{body['id']} does not exist") from None
        except exceptions.CosmosAccessConditionFailedError:
            raise PreconditionFailed(f"policy {body['app_id']}/{body['id']} has changed (ETag mismatch)") from None
        return self._with_etag(item)

    async def delete_policy(self, app_id: str, doc_id: str, if_match: str | None = None) -> bool:
        container = self._container(POLICIES.name)
        try:
            if if_match is not None:
                await container.delete_item(doc_id, partition_key=app_id, **_if_match(if_match))
            else:
                await container.delete_item(doc_id, partition_key=app_id)
        except exceptions.CosmosResourceNotFoundError:
            if if_match is not None:
                raise PreconditionFailed(f"policy {app_id}/{doc_id} does not exist") from None
            return False
        except exceptions.CosmosAccessConditionFailedError:
            raise PreconditionFailed(f"policy {app_id}/{doc_id} has changed (ETag mismatch)") from None
        return True

    # Quota counters ----------------------------------------------------------------------
    # One document per subject and window ("tpm:2026-11-24T10:05" in partition "app:<id>"), so
    # there is no single hot document; an atomic `incr` patch with a filter predicate admits a
    # charge only while it fits. Documents expire through TTL after their window.
    @staticmethod
    def _counter_id(subject: str, counter: str) -> str:
        # Unique across partitions, not only within one: the Cosmos test server evaluates a patch's
        # filter predicate across the whole container, and ids reused per subject would let
        # another subject's counter satisfy it. (Cosmos ids may not contain / \ ? #.)
        return quote(subject, safe=":@._-") + "|" + counter

    async def _charge(self, container, charge: CounterCharge, conditional: bool) -> int | None:
        """Apply one charge; returns the new value, or None if the limit refused it."""
        item_id = self._counter_id(charge.subject, charge.counter)
        operations = [{"op": "incr", "path": "/used", "value": charge.amount}]
        kwargs: dict[str, Any] = {}
        if conditional and charge.limit is not None:
            kwargs["filter_predicate"] = f"FROM c WHERE c.used <= {charge.limit - charge.amount}"
        for _ in range(3):
            try:
                async with self._in_flight:
                    item = await container.patch_item(item_id, partition_key=charge.subject, patch_operations=operations, **kwargs)
                return int(item["used"])
            except exceptions.CosmosAccessConditionFailedError:
                return None
            except exceptions.CosmosResourceNotFoundError:
                try:  # first charge of this window: create the counter, then patch it
                    async with self._in_flight:
                        await container.create_item({"id": item_id, "counter": charge.counter, "subject": charge.subject, "used": 0, "ttl": charge.ttl})
                except exceptions.CosmosResourceExistsError:
                    pass  # another request created it first
        raise StoreUnavailable(f"counter {charge.subject}/{charge.counter} could not be charged")

    async def reserve(self, charges: list[CounterCharge]) -> ReserveOutcome:
        container = self._container(QUOTA_COUNTERS.name)
        applied: list[tuple[CounterCharge, int]] = []
        try:
            for index, charge in enumerate(charges):
                used = await self._charge(container, charge, conditional=True)
                if used is None:
                    await self._undo(container, [c for c, _ in applied])
                    now = [(await self.read_counters(c.subject, [c.counter]))[c.counter] for c in charges]
                    return ReserveOutcome(False, now, index)
                applied.append((charge, used))
        except (exceptions.CosmosHttpResponseError, ServiceRequestError, ServiceResponseError) as exc:
            await self._undo(container, [c for c, _ in applied])
            raise StoreUnavailable(f"Cosmos counters: {exc}") from exc
        return ReserveOutcome(True, [used for _, used in applied])

    async def _undo(self, container, charges: list[CounterCharge]) -> None:
        for charge in charges:
            try:
                await self._charge(container, CounterCharge(charge.subject, charge.counter, -charge.amount, None, charge.ttl), False)
            except Exception:  # the reservation leaks until its window ends; say so
                import logging

                logging.getLogger("sekisho.store").exception("could not undo a quota charge on %s/%s", charge.subject, charge.counter)

    async def adjust(self, charges: list[CounterCharge]) -> None:
        container = self._container(QUOTA_COUNTERS.name)
        try:
            for charge in charges:
                if charge.amount:
                    await self._charge(container, charge, conditional=False)
        except (exceptions.CosmosHttpResponseError, ServiceRequestError, ServiceResponseError) as exc:
            raise StoreUnavailable(f"Cosmos counters: {exc}") from exc

    async def read_counters(self, subject: str, counters: list[str]) -> dict[str, int]:
        container = self._container(QUOTA_COUNTERS.name)
        found = {c: 0 for c in counters}
        query = "SELECT * FROM c WHERE c.subject = @subject"
        async for item in container.query_items(query, parameters=[{"name": "@subject", "value": subject}], partition_key=subject):
            if item.get("counter") in found:
                found[item["counter"]] = int(item["used"])
        return found

    async def reset_counters(self, subject: str, counters: list[str]) -> None:
        container = self._container(QUOTA_COUNTERS.name)
        existing = await self.read_counters(subject, counters)
        for counter, used in existing.items():
            if used:
                await self._charge(container, CounterCharge(subject, counter, -used, None, 0), conditional=False)

    # Documents keyed by id alone (prices, the deployment catalogue; partition key /id) ----------
    async def _get_doc(self, container_name: str, doc_id: str) -> dict[str, Any] | None:
        query = "SELECT * FROM c WHERE c.id = @id"
        item = await _first(self._container(container_name).query_items(query, parameters=[{"name": "@id", "value": doc_id}], partition_key=doc_id))
        return _clean(item) if item else None

    async def _list_docs(self, container_name: str) -> list[dict[str, Any]]:
        return [_clean(item) async for item in self._container(container_name).query_items("SELECT * FROM c ORDER BY c.id")]

    async def _put_doc(self, container_name: str, doc: dict[str, Any]) -> dict[str, Any]:
        return _clean(await self._container(container_name).upsert_item(doc))

    async def _delete_doc(self, container_name: str, doc_id: str) -> bool:
        try:
            await self._container(container_name).delete_item(doc_id, partition_key=doc_id)
        except exceptions.CosmosResourceNotFoundError:
            return False
        return True

    # Response cache ----------------------------------------------------------------------------
    # One item per entry, partitioned by scope (the app), expiring through its `ttl`. Reads check
    # the expiry too: Cosmos deletes expired items in the background, not at the second.
    async def cache_get(self, scope: str, key: str) -> dict[str, Any] | None:
        container = self._container(RESPONSE_CACHE.name)
        query = "SELECT * FROM c WHERE c.scope = @scope AND c.id = @id"
        params = [{"name": "@scope", "value": scope}, {"name": "@id", "value": key}]
        item = await _first(container.query_items(query, parameters=params, partition_key=scope))
        if item is not None and item.get("expires_at", 0) > time.time():
            _as_written(item)
            return item.get("entry")
        return None

    async def cache_put(self, scope: str, key: str, entry: dict[str, Any], ttl: int) -> None:
        container = self._container(RESPONSE_CACHE.name)
        await container.upsert_item({"id": key, "scope": scope, "entry": entry, "ttl": ttl, "expires_at": time.time() + ttl})

    async def cache_purge(self, scope: str) -> int:
        container = self._container(RESPONSE_CACHE.name)
        query = "SELECT c.id FROM c WHERE c.scope = @scope"
        ids = [item["id"] async for item in container.query_items(query, parameters=[{"name": "@scope", "value": scope}], partition_key=scope)]
        for item_id in ids:
            try:
                await container.delete_item(item_id, partition_key=scope)
            except exceptions.CosmosResourceNotFoundError:
                pass
        return len(ids)

    # Objects apps create upstream: one item per object in its app's partition, expiring by `ttl` --
    async def get_owned(self, app_id: str, kind: str, object_id: str) -> dict[str, Any] | None:
        query = "SELECT * FROM c WHERE c.app_id = @app AND c.id = @id"
        params = [{"name": "@app", "value": app_id}, {"name": "@id", "value": f"{kind}:{object_id}"}]
        item = await _first(self._container(OWNED_OBJECTS.name).query_items(query, parameters=params, partition_key=app_id))
        if item is None or item.get("expires_at", 0) <= time.time():
            return None
        return _owned(item)

    async def put_owned(self, doc: dict[str, Any], if_match: str | None = None) -> str:
        body = {**{k: v for k, v in doc.items() if k != "etag"}, "id": f"{doc['kind']}:{doc['object_id']}", "sort_key": owned_sort_key(doc),
                "expires_at": time.time() + doc["ttl"]}
        return await _write_versioned(self._container(OWNED_OBJECTS.name), body, if_match)

    async def list_owned(self, app_id: str, kind: str, limit: int, before: str | None = None) -> list[dict[str, Any]]:
        query = (f"SELECT TOP {int(limit)} * FROM c WHERE c.app_id = @app AND c.kind = @kind AND c.sort_key < @before"
                 " AND c.expires_at > @now ORDER BY c.sort_key DESC")
        params = [{"name": "@app", "value": app_id}, {"name": "@kind", "value": kind}, {"name": "@before", "value": before or "~"},
                  {"name": "@now", "value": time.time()}]
        items = [item async for item in self._container(OWNED_OBJECTS.name).query_items(query, parameters=params, partition_key=app_id)]
        return [_owned(item) for item in items]

    async def list_open_owned(self, limit: int) -> list[dict[str, Any]]:
        # Across partitions: only the reconciling timer asks, every few minutes.
        query = f"SELECT TOP {int(limit)} * FROM c WHERE c.open = true AND c.expires_at > @now ORDER BY c.sort_key"
        params = [{"name": "@now", "value": time.time()}]
        container = self._container(OWNED_OBJECTS.name)
        return [_owned(item) async for item in container.query_items(query, parameters=params)]

    async def delete_owned(self, app_id: str, kind: str, object_id: str) -> bool:
        try:
            await self._container(OWNED_OBJECTS.name).delete_item(f"{kind}:{object_id}", partition_key=app_id)
        except exceptions.CosmosResourceNotFoundError:
            return False
        return True

    # Budget alerts: one item per threshold crossed per window, in the app's partition ------------
    async def claim_alert(self, doc: dict[str, Any]) -> bool:
        try:
            await self._container(BUDGET_ALERTS.name).create_item(doc)  # create-only: one caller wins, in every instance
        except exceptions.CosmosResourceExistsError:
            return False
        return True

    async def update_alert(self, doc: dict[str, Any]) -> None:
        await self._container(BUDGET_ALERTS.name).upsert_item(doc)

    async def list_alerts(self, app_id: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        query = f"SELECT TOP {int(limit)} * FROM c" + (" WHERE c.app_id = @app" if app_id is not None else "") + " ORDER BY c.sort_key DESC"
        kwargs: dict[str, Any] = {"parameters": [{"name": "@app", "value": app_id}], "partition_key": app_id} if app_id is not None else {}
        return [_clean(item) async for item in self._container(BUDGET_ALERTS.name).query_items(query, **kwargs)]

    # Async jobs: one item per job in its app's partition, expiring through its `ttl` -----------
    async def get_job(self, app_id: str, job_id: str) -> dict[str, Any] | None:
        query = "SELECT * FROM c WHERE c.app_id = @app AND c.id = @id"
        params = [{"name": "@app", "value": app_id}, {"name": "@id", "value": job_id}]
        item = await _first(self._container(JOBS.name).query_items(query, parameters=params, partition_key=app_id))
        if item is None or item.pop("expires_at", 0) <= time.time():
            return None
        return self._with_etag(item)

    async def put_job(self, doc: dict[str, Any], if_match: str | None = None) -> str:
        body = {**{k: v for k, v in doc.items() if k != "etag"}, "expires_at": time.time() + doc["ttl"]}
        return await _write_versioned(self._container(JOBS.name), body, if_match)

    # Usage roll-ups: one item per (day, user, deployment, model) in the app's partition, summed with
    # `incr` patches (atomic on the server); created on first use, a lost creation race patched.
    async def add_rollups(self, deltas: list[Any]) -> None:
        container = self._container(USAGE_ROLLUPS.name)

        async def add(delta) -> None:
            operations = [{"op": "incr", "path": f"/{name}", "value": value} for name, value in delta.counts.items() if value]
            async with self._in_flight:
                for _ in range(3):
                    try:
                        if operations:
                            await container.patch_item(delta.id, partition_key=delta.app_id, patch_operations=operations)
                        return
                    except exceptions.CosmosResourceNotFoundError:
                        pass
                    try:
                        item = {c: 0 for c in ROLLUP_COUNTERS}
                        item.update(delta.counts, id=delta.id, app_id=delta.app_id, day=delta.day, user_id=delta.user_id, deployment=delta.deployment,
                                    model=delta.model, operation=delta.operation)
                        await container.create_item(item)
                        return
                    except exceptions.CosmosResourceExistsError:
                        continue  # created meanwhile by another writer: patch it
                raise StoreError(f"roll-up {delta.app_id}/{delta.id} could not be updated")

        results = await asyncio.gather(*(add(d) for d in deltas), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise StoreUnavailable(f"{len(failed)} roll-up update(s) failed: {failed[0]}")

    async def query_rollups(self, app_id: str | None = None, since: str | None = None, until: str | None = None) -> list[dict[str, Any]]:
        clauses, params = [], []
        for clause, name, value in (("c.app_id = @app", "@app", app_id), ("c.day >= @since", "@since", since), ("c.day <= @until", "@until", until)):
            if value is not None:
                clauses.append(clause)
                params.append({"name": name, "value": value})
        query = "SELECT * FROM c" + (f" WHERE {' AND '.join(clauses)}" if clauses else "")
        container = self._container(USAGE_ROLLUPS.name)
        items = container.query_items(query, parameters=params, partition_key=app_id) if app_id else container.query_items(query, parameters=params)
        rows = [_clean(item) async for item in items]
        return sorted(rows, key=lambda r: r["day"])
