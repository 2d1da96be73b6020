"""The storage contract, run against both adapters (SQLite file, Cosmos protocol server)."""
from __future__ import annotations

import asyncio
import uuid

import pytest

from shared.store import LogQuery
from shared.store.sqlite import SqliteStore

def _record(app: str = "app-a", ts: str = "2026-11-24T10:00:00.000Z", **fields) -> dict:
    return {
        "id": uuid.uuid4().hex, "app_id": app, "user_id": fields.pop("user_id", "u1"), "timestamp": ts,
        "deployment": fields.pop("deployment", "gpt-4o-mini"), "status": fields.pop("status", 200), "ttl": 3600,
        "prompt": {"messages": [{"role": "user", "content": "こんにちは"}]}, **fields,
    }


async def test_write_then_read_back(store):
    record = _record(usage={"total_tokens": 12})
    await store.write_logs([record])
    assert await store.get_log(record["id"]) == record
    assert await store.get_log("missing") is None


async def test_writes_are_idempotent_per_id(store):
    record = _record()
    await store.write_logs([record])
    await store.write_logs([{**record, "status": 500}])
    assert (await store.get_log(record["id"]))["status"] == 500
    assert len(await store.query_logs(LogQuery(app_id="app-a"))) == 1


async def test_query_filters_and_order(store):
    records = [
        _record("app-a", "2026-11-24T10:00:00.000Z", user_id="u1"),
        _record("app-a", "2026-11-24T11:00:00.000Z", user_id="u2", status=429),
        _record("app-a", "2026-11-24T12:00:00.000Z", user_id="u1", deployment="text-embedding-3-small"),
        _record("app-b", "2026-11-24T13:00:00.000Z", user_id="u1"),
    ]
    await store.write_logs(records)
    ids = lambda found: [r["id"] for r in found]  # noqa: E731
    assert ids(await store.query_logs(LogQuery(app_id="app-a"))) == [records[2]["id"], records[1]["id"], records[0]["id"]]
    assert ids(await store.query_logs(LogQuery(user_id="u1"))) == [records[3]["id"], records[2]["id"], records[0]["id"]]
    assert ids(await store.query_logs(LogQuery(status=429))) == [records[1]["id"]]
    assert ids(await store.query_logs(LogQuery(deployment="text-embedding-3-small"))) == [records[2]["id"]]
    window = LogQuery(since="2026-11-24T11:00:00.000Z", until="2026-11-24T13:00:00.000Z")
    assert ids(await store.query_logs(window)) == [records[2]["id"], records[1]["id"]]
    assert ids(await store.query_logs(LogQuery(limit=2))) == [records[3]["id"], records[2]["id"]]


async def test_concurrent_batches(store):
    batches = [[_record(f"app-{i % 3}") for _ in range(10)] for i in range(10)]
    await asyncio.gather(*(store.write_logs(batch) for batch in batches))
    total = 0
    for i in range(3):
        total += len(await store.query_logs(LogQuery(app_id=f"app-{i}", limit=1000)))
    assert total == 100


async def test_records_carry_their_expiry(store):
    record = _record()
    record["ttl"] = 1
    await store.write_logs([record])
    if isinstance(store, SqliteStore):
        await asyncio.sleep(1.2)
        assert await store.get_log(record["id"]) is None
        assert await store.query_logs(LogQuery(app_id="app-a")) == []
    else:
        # Cosmos deletes expired items itself (per-item `ttl`, container default TTL on);
        # the test server does not implement expiry, so check the field the service acts on.
        assert (await store.get_log(record["id"]))["ttl"] == 1


# Policies ------------------------------------------------------------------------------
from shared.store import AlreadyExists, PreconditionFailed  # noqa: E402


def _policy(app: str = "app-a", doc_id: str = "app", **settings) -> dict:
    return {"id": doc_id, "app_id": app, "kind": "app", "name": "A", "settings": settings}


async def test_policy_create_read_list_delete(store):
    created = await store.put_policy(_policy(enabled=True), create_only=True)
    assert created["etag"]
    read = await store.get_policy("app-a", "app")
    assert read == created
    await store.put_policy(_policy("app-a", "user:u1", enabled=False))
    await store.put_policy(_policy("app-b"))
    assert [(d["app_id"], d["id"]) for d in await store.list_policies()] == [("app-a", "app"), ("app-a", "user:u1"), ("app-b", "app")]
    assert [d["id"] for d in await store.list_policies("app-a")] == ["app", "user:u1"]
    assert await store.delete_policy("app-a", "user:u1") is True
    assert await store.delete_policy("app-a", "user:u1") is False
    assert await store.get_policy("app-a", "user:u1") is None


async def test_policy_etags(store):
    first = await store.put_policy(_policy(enabled=True), create_only=True)
    with pytest.raises(AlreadyExists):
        await store.put_policy(_policy(enabled=False), create_only=True)
    second = await store.put_policy(_policy(enabled=False), if_match=first["etag"])
    assert second["etag"] != first["etag"]
    with pytest.raises(PreconditionFailed):  # a writer holding the old version loses
        await store.put_policy(_policy(enabled=True), if_match=first["etag"])
    with pytest.raises(PreconditionFailed):
        await store.delete_policy("app-a", "app", if_match=first["etag"])
    with pytest.raises(PreconditionFailed):
        await store.put_policy(_policy("app-z"), if_match=first["etag"])
    assert (await store.get_policy("app-a", "app"))["settings"] == {"enabled": False}
    # An empty If-Match is the empty list of ETags (RFC 9110): no version matches it.
    with pytest.raises(PreconditionFailed):
        await store.put_policy(_policy(enabled=True), if_match="")
    with pytest.raises(PreconditionFailed):
        await store.delete_policy("app-a", "app", if_match="")
    assert await store.delete_policy("app-a", "app", if_match=second["etag"]) is True


async def test_large_numbers_read_back_as_json_can_write_them(store):
    """A body's 18446744073709551616 is parsed as a float; Cosmos keeps doubles and answers that
    one as the integer 18446744073709552000, which orjson cannot write: the log's API and export
    failed on the record (found by the admin contract run against Cosmos)."""
    import orjson

    record = _record(prompt={"x_big": 1.8446744073709552e19, "x_small": -9.3e18, "nested": [{"n": 2.5e25}], "ok": 7})
    await store.write_logs([record])
    for found in (await store.get_log(record["id"]), (await store.query_logs(LogQuery(app_id="app-a")))[0]):
        assert orjson.loads(orjson.dumps(found))["prompt"] == record["prompt"]
        assert found["prompt"]["ok"] == 7 and isinstance(found["prompt"]["ok"], int)


# Quota counters -------------------------------------------------------------------------
from shared.store import CounterCharge  # noqa: E402


async def test_reserve_is_all_or_nothing(store):
    subject = "app:" + uuid.uuid4().hex
    user = "user:" + uuid.uuid4().hex
    first = await store.reserve([CounterCharge(subject, "rpm:w1", 1, 2, 120), CounterCharge(user, "tpd:d1", 40, 100, 120)])
    assert first.admitted and first.used == [1, 40]
    refused = await store.reserve([CounterCharge(subject, "rpm:w1", 1, 2, 120), CounterCharge(user, "tpd:d1", 70, 100, 120)])
    assert not refused.admitted and refused.failed == 1 and refused.used[1] == 40
    # the first charge of the refused reservation was not kept
    assert await store.read_counters(subject, ["rpm:w1"]) == {"rpm:w1": 1}
    assert (await store.reserve([CounterCharge(subject, "rpm:w1", 1, 2, 120)])).used == [2]
    assert not (await store.reserve([CounterCharge(subject, "rpm:w1", 1, 2, 120)])).admitted
    # another window is another counter
    assert (await store.reserve([CounterCharge(subject, "rpm:w2", 1, 2, 120)])).used == [1]


async def test_concurrent_reservations_never_cross_the_limit(store):
    subject = "app:" + uuid.uuid4().hex
    outcomes = await asyncio.gather(*(store.reserve([CounterCharge(subject, "rpm:race", 1, 50, 120)]) for _ in range(200)))
    assert sum(o.admitted for o in outcomes) == 50
    assert await store.read_counters(subject, ["rpm:race"]) == {"rpm:race": 50}


async def test_adjust_and_reset(store):
    subject = "user:" + uuid.uuid4().hex
    await store.reserve([CounterCharge(subject, "tpm:w", 100, 1000, 120)])
    await store.adjust([CounterCharge(subject, "tpm:w", -30, None, 120), CounterCharge(subject, "spend:m", 5_000, None, 120)])
    assert await store.read_counters(subject, ["tpm:w", "spend:m", "tpd:x"]) == {"tpm:w": 70, "spend:m": 5_000, "tpd:x": 0}
    await store.reset_counters(subject, ["tpm:w"])
    assert await store.read_counters(subject, ["tpm:w", "spend:m"]) == {"tpm:w": 0, "spend:m": 5_000}


async def test_expired_window_starts_from_zero(store):
    if not isinstance(store, SqliteStore):
        pytest.skip("Cosmos expires counters by TTL itself; window keys make an expired document irrelevant")
    subject = "app:" + uuid.uuid4().hex
    await store.reserve([CounterCharge(subject, "rpm:w", 5, 5, 1)])
    await asyncio.sleep(1.1)
    assert (await store.reserve([CounterCharge(subject, "rpm:w", 5, 5, 1)])).admitted


async def test_prices(store):
    await store.put_price({"id": "my-model", "input_per_1m": 1.0, "cached_input_per_1m": None, "output_per_1m": 2.0})
    assert [p["id"] for p in await store.list_prices()] == ["my-model"]
    assert await store.delete_price("my-model") is True
    assert await store.delete_price("my-model") is False


# Response cache ---------------------------------------------------------------------------
async def test_cache_put_get_expire_purge(store):
    scope = "app-" + uuid.uuid4().hex[:8]
    entry = {"response": {"choices": [{"message": {"content": "こんにちは"}}]}, "usage": {"total_tokens": 9}}
    await store.cache_put(scope, "k1", entry, ttl=60)
    await store.cache_put(scope, "k2", entry, ttl=1)
    assert await store.cache_get(scope, "k1") == entry
    assert await store.cache_get("other-scope", "k1") is None  # scopes do not share
    await asyncio.sleep(1.1)
    assert await store.cache_get(scope, "k2") is None  # expired (both adapters check on read)
    assert await store.cache_purge(scope) >= 1
    assert await store.cache_get(scope, "k1") is None


async def test_deployment_catalogue(store):
    doc = {"id": "gpt-4o-mini", "backends": [{"name": "a", "endpoint": "https://a.example"}]}
    assert await store.get_deployment("gpt-4o-mini") is None
    await store.put_deployment(doc)
    await store.put_deployment({**doc, "id": "gpt-4o"})
    assert await store.get_deployment("gpt-4o-mini") == doc
    assert [d["id"] for d in await store.list_deployments()] == ["gpt-4o", "gpt-4o-mini"]
    assert await store.delete_deployment("gpt-4o") is True
    assert await store.delete_deployment("gpt-4o") is False


async def test_jobs_are_kept_per_app_and_replaced_whole(store):
    from shared.store import PreconditionFailed

    job = {"id": uuid.uuid4().hex, "app_id": "app-a", "user_id": "u1", "status": "queued", "ttl": 3600,
           "request": {"body": {"messages": [{"role": "user", "content": "こんにちは"}]}}, "result": None}
    first = await store.put_job(job)
    stored = await store.get_job("app-a", job["id"])
    assert {k: v for k, v in stored.items() if k != "etag"} == job and stored["etag"] == first
    assert await store.get_job("app-b", job["id"]) is None  # another app's partition
    second = await store.put_job({**job, "status": "running"}, if_match=first)  # a conditional step wins...
    with pytest.raises(PreconditionFailed):
        await store.put_job({**job, "status": "succeeded"}, if_match=first)  # ...and a second run of it loses
    assert second != first
    await store.put_job({**job, "status": "succeeded", "result": {"status": 200, "body": {"ok": True}}}, if_match=second)
    assert (await store.get_job("app-a", job["id"]))["status"] == "succeeded"
    expired = {**job, "id": uuid.uuid4().hex, "ttl": -1}  # already past its retention
    await store.put_job(expired)
    assert await store.get_job("app-a", expired["id"]) is None


async def test_a_provisional_record_never_replaces_a_final_one(store):
    final = _record(status=200, job={"status": "succeeded"})
    await store.write_logs([final])
    await store.write_logs([{**final, "status": 202, "job": {"status": "queued"}}])  # a late 202
    assert (await store.get_log(final["id"]))["status"] == 200
    provisional = _record(status=202, job={"status": "queued"})
    await store.write_logs([provisional])
    await store.write_logs([{**provisional, "status": 200, "job": {"status": "succeeded"}}])
    assert (await store.get_log(provisional["id"]))["status"] == 200


async def test_reserving_nothing_is_admitted(store):
    outcome = await store.reserve([])
    assert outcome.admitted and outcome.used == []


async def test_owned_objects_belong_to_their_app(store):
    doc = {"app_id": "app-a", "kind": "response", "object_id": "resp_1", "user_id": "u1", "backend": "default",
           "deployment": "gpt-4o-mini", "ttl": 3600}
    await store.put_owned(doc)
    found = await store.get_owned("app-a", "response", "resp_1")
    assert found["user_id"] == "u1" and found["deployment"] == "gpt-4o-mini" and found["object_id"] == "resp_1"
    assert await store.get_owned("app-b", "response", "resp_1") is None  # another app: as if missing
    assert await store.get_owned("app-a", "file", "resp_1") is None  # another kind
    await store.put_owned({**doc, "deployment": "gpt-4o"})  # an update replaces
    assert (await store.get_owned("app-a", "response", "resp_1"))["deployment"] == "gpt-4o"
    assert not await store.delete_owned("app-b", "response", "resp_1")
    assert await store.delete_owned("app-a", "response", "resp_1")
    assert await store.get_owned("app-a", "response", "resp_1") is None
    await store.put_owned({**doc, "object_id": "resp_2", "ttl": -1})  # already expired
    assert await store.get_owned("app-a", "response", "resp_2") is None


async def test_owned_objects_list_newest_first_in_pages(store):
    for number in range(5):
        await store.put_owned({"app_id": "app-l", "kind": "file", "object_id": f"file-{number}", "created_ms": 1_000 + number, "ttl": 3600})
    await store.put_owned({"app_id": "app-l", "kind": "response", "object_id": "resp-x", "created_ms": 9_999, "ttl": 3600})
    await store.put_owned({"app_id": "app-other", "kind": "file", "object_id": "file-9", "created_ms": 9_999, "ttl": 3600})
    first = await store.list_owned("app-l", "file", 2)
    assert [d["object_id"] for d in first] == ["file-4", "file-3"]
    rest = await store.list_owned("app-l", "file", 10, before=first[-1]["sort_key"])
    assert [d["object_id"] for d in rest] == ["file-2", "file-1", "file-0"]


async def test_owned_records_change_only_from_the_version_read(store):
    """Settling a batch closes its record conditionally: of two instances that read one version,
    only the first may write; the open records of every app are found for the reconciling timer."""
    doc = {"app_id": "app-o", "kind": "batch", "object_id": "batch_1", "created_ms": 1_000, "ttl": 3600, "open": True}
    first_etag = await store.put_owned(doc)
    await store.put_owned({"app_id": "app-p", "kind": "response", "object_id": "resp_1", "created_ms": 2_000, "ttl": 3600, "open": True})
    await store.put_owned({"app_id": "app-p", "kind": "file", "object_id": "file-1", "created_ms": 500, "ttl": 3600})
    await store.put_owned({"app_id": "app-q", "kind": "batch", "object_id": "batch_old", "created_ms": 100, "ttl": -1, "open": True})
    read = await store.get_owned("app-o", "batch", "batch_1")
    assert read["etag"] == first_etag
    opened = await store.list_open_owned(10)
    assert [(d["app_id"], d["object_id"]) for d in opened] == [("app-o", "batch_1"), ("app-p", "resp_1")]  # oldest first, expired left out
    assert opened[0]["etag"] == first_etag
    second_etag = await store.put_owned({**read, "open": False}, if_match=read["etag"])
    assert second_etag != first_etag
    with pytest.raises(PreconditionFailed):  # the other instance read the same version: too late
        await store.put_owned({**read, "open": False, "settled_by": "other"}, if_match=read["etag"])
    with pytest.raises(PreconditionFailed):  # nothing to replace
        await store.put_owned({**doc, "object_id": "batch_missing"}, if_match=first_etag)
    assert "settled_by" not in await store.get_owned("app-o", "batch", "batch_1")
    assert [d["object_id"] for d in await store.list_open_owned(10)] == ["resp_1"]


def test_a_sqlite_database_from_before_the_operation_roll_up_gains_its_column(tmp_path):
    """A database made by an earlier version keeps its roll-ups, and counts new ones per operation."""
    import sqlite3

    from shared.records.rollups import ROLLUP_COUNTERS, RollupDelta, group

    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    counters = ", ".join(f"{c} INTEGER NOT NULL DEFAULT 0" for c in ROLLUP_COUNTERS)
    conn.execute("CREATE TABLE usage_rollups (app_id TEXT NOT NULL, id TEXT NOT NULL, day TEXT NOT NULL, user_id TEXT NOT NULL,"
                 f" deployment TEXT NOT NULL, model TEXT NOT NULL, {counters}, PRIMARY KEY (app_id, id))")
    conn.execute("INSERT INTO usage_rollups (app_id, id, day, user_id, deployment, model, requests)"
                 " VALUES ('app-a', '2026-11-01|u|d|m', '2026-11-01', 'u', 'd', 'm', 3)")
    conn.commit()
    conn.close()

    async def run():
        store = SqliteStore(str(path))
        await store.open()
        try:
            await store.add_rollups([RollupDelta("app-a", "2026-11-01", "u", "d", "m", "embeddings", {"requests": 2})])
            return group(await store.query_rollups("app-a"), "operation")
        finally:
            await store.close()

    rows = asyncio.run(run())
    assert {r["operation"]: r["requests"] for r in rows} == {"-": 3, "embeddings": 2}
