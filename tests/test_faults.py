"""Faults: the store unavailable for a while, the client leaving mid-stream. For each: the
gateway answers as documented, recovers, and loses no log record. (Upstream hanging, unreachable
and breaking mid-stream are in test_errors.py and test_streaming.py.)"""
from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import threading
import time
import uuid

import aiohttp

from shared.store import EncodedLog, LogQuery
from shared.store.cosmos import CosmosStore
from shared.store.sqlite import SqliteStore

from .conftest import _gateway_env, _seed
from .servers import COSMOS_KEY, start_cosmos_server, start_local_host, stop

ADMIN = "/sekisho/admin"
CHAT = "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"


def _log_records(prefix: str, app_id: str, count: int, tokens: int = 1) -> list[dict]:
    """Finished chat records as the gateway writes them, enough for the writer and the roll-ups."""
    return [{"id": f"{prefix}{i}", "app_id": app_id, "timestamp": "2026-11-24T10:00:00.000Z", "status": 200, "ttl": 3600,
             "operation": "chat.completions", "usage": {"total_tokens": tokens}} for i in range(count)]


async def _register(url, admin_token) -> str:
    app_id = str(uuid.uuid4())
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin_token}"}) as session:
        async with session.put(f"{url}{ADMIN}/policies/apps/{app_id}", json={"name": "faults", "settings": {}}) as response:
            assert response.status == 201
    return app_id


async def _chats(url, token, count, tag) -> list[tuple[int, float, str]]:
    async def one(session):
        started = time.monotonic()
        async with session.post(url + CHAT, json={"messages": [{"role": "user", "content": tag}]}) as response:
            await response.read()
            return response.status, time.monotonic() - started, response.headers["x-sekisho-request-id"]

    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
        return [await one(session) for _ in range(count)]


async def _all_logged(store, app_id, ids, timeout=30.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        records = await store.query_logs(LogQuery(app_id=app_id, limit=1000))
        if {r["id"] for r in records} >= set(ids) or time.monotonic() > deadline:
            return records
        await asyncio.sleep(0.2)


async def _health(url) -> dict:
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/health") as response:
            return await response.json()


async def test_sqlite_locked_for_a_while_answers_go_on_and_no_record_is_lost(simulator, tmp_path, data_dir, admin_token, issuer):
    path = str(tmp_path / "locked.db")
    host = start_local_host(_gateway_env(simulator, SEKISHO_SQLITE_PATH=path), data_dir)
    try:
        app_id = await _register(host.url, admin_token)
        token = issuer.mint(app_id)
        await _chats(host.url, token, 1, "warm")  # the policy is in the gateway's cache now
        # Another process holds the write lock for 3 s: the store cannot be written meanwhile.
        release = threading.Event()

        def hold_lock():
            conn = sqlite3.connect(path, isolation_level=None)
            conn.execute("BEGIN EXCLUSIVE")
            release.wait(3.0)
            conn.execute("ROLLBACK")
            conn.close()

        locker = threading.Thread(target=hold_lock)
        locker.start()
        await asyncio.sleep(0.2)
        during = await _chats(host.url, token, 15, "during")
        locker.join()
        assert all(status == 200 for status, _, _ in during)
        assert max(seconds for _, seconds, _ in during) < 1.0  # logging is off the answer's path
        after = await _chats(host.url, token, 3, "after")
        store = SqliteStore(path)
        await store.open()
        try:
            records = await _all_logged(store, app_id, [i for *_, i in during + after])
        finally:
            await store.close()
        assert {r["id"] for r in records} >= {i for *_, i in during + after}
        assert (await _health(host.url))["request_log"]["spilled_to_fallback"] == 0
    finally:
        stop(host.process)


async def test_cosmos_unreachable_for_a_while_answers_go_on_and_no_record_is_lost(simulator, data_dir, admin_token, issuer):
    cosmos = start_cosmos_server()
    database = "faults_" + uuid.uuid4().hex[:8]
    env = _gateway_env(simulator, SEKISHO_STORE="cosmos", SEKISHO_COSMOS_ENDPOINT=cosmos.endpoint, SEKISHO_COSMOS_KEY=COSMOS_KEY,
                       SEKISHO_COSMOS_DATABASE=database, SEKISHO_COSMOS_VERIFY_TLS="false", SEKISHO_POLICY_CACHE_SECONDS="30")
    host = start_local_host(env, data_dir)
    try:
        app_id = await _register(host.url, admin_token)
        token = issuer.mint(app_id)
        await _chats(host.url, token, 1, "warm")
        os.kill(cosmos.process.pid, signal.SIGSTOP)  # the store stops answering (connections hang)
        try:
            during = await _chats(host.url, token, 10, "during")
            await asyncio.sleep(2.0)
        finally:
            os.kill(cosmos.process.pid, signal.SIGCONT)
        assert all(status == 200 for status, _, _ in during)
        after = await _chats(host.url, token, 3, "after")
        store = CosmosStore(cosmos.endpoint, COSMOS_KEY, database, verify_tls=False)
        await store.open()
        try:
            records = await _all_logged(store, app_id, [i for *_, i in during + after])
        finally:
            await store.close()
        assert {r["id"] for r in records} >= {i for *_, i in during + after}
    finally:
        stop(host.process)
        stop(cosmos.process)


async def test_client_leaving_mid_stream_cuts_the_upstream_stream(gateway, simulator, token):
    body = {"messages": [{"role": "user", "content": "x"}], "stream": True,
            "x_sim": {"reply": " ".join(["word"] * 40), "chunk_interval_ms": 100}}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
        async with session.post(gateway.url + CHAT, json=body) as response:
            request_id = response.headers["x-sekisho-request-id"]
            await response.content.readuntil(b"\n\n")  # the first event, then hang up
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        entry = next((r for r in simulator.received() if r.get("client_request_id") == request_id), None)
        if entry and "stream_end" in entry:
            break
        await asyncio.sleep(0.1)
    assert entry["stream_end"] == "caller_left" and entry["events_sent"] < 10  # cut at once, not relayed to the end


async def test_upstream_cookies_are_never_sent_back(simulator, tmp_path, data_dir, token):
    """One app's answer setting a cookie (an affinity cookie, say) must not ride along on the next
    calls, which may be another app's: the upstream session keeps no cookie jar. The upstream is
    named by host name here, as in Azure (a cookie jar ignores cookies of bare IP addresses)."""
    path = str(tmp_path / "cookies.db")
    await _seed(SqliteStore(path))
    endpoint = simulator.url.replace("127.0.0.1", "localhost")
    host = start_local_host(_gateway_env(simulator, AZURE_OPENAI_ENDPOINT=endpoint, SEKISHO_SQLITE_PATH=path), data_dir)
    try:
        ids = []
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
            for sim in ({"set_cookie": "ARRAffinity=instance-7; Path=/"}, {}):
                body = {"messages": [{"role": "user", "content": "x"}], "x_sim": sim}
                async with session.post(host.url + CHAT, json=body) as response:
                    assert response.status == 200
                    assert "set-cookie" not in response.headers  # not relayed to the client either
                    ids.append(response.headers["x-sekisho-request-id"])
    finally:
        stop(host.process)
    received = {r.get("client_request_id"): r for r in simulator.received()}
    assert received[ids[1]]["cookie"] is None


class _LogStoreWith:
    """What a LogWriter needs of a store: `store`'s writes, each batch first handed to `before`
    (which may wait, or raise to fail the write)."""

    def __init__(self, store, before) -> None:
        self._store, self._before = store, before

    async def write_encoded_logs(self, items):
        await self._before(items)
        await self._store.write_encoded_logs(items)

    async def add_rollups(self, deltas):
        await self._store.add_rollups(deltas)


async def test_records_the_store_cannot_take_are_spooled_and_replayed_by_the_next_writer(tmp_path):
    from shared.records.request_log import LogSpool, LogWriter
    from shared.store import StoreUnavailable

    class DownStore:
        async def write_logs(self, records):
            raise StoreUnavailable("down")

        async def write_encoded_logs(self, items):
            raise StoreUnavailable("down")

        async def add_rollups(self, deltas):
            raise StoreUnavailable("down")

    records = _log_records(uuid.uuid4().hex[:8], "app-s", 3, tokens=5)
    down = LogWriter(DownStore(), 0.01, 10, spool=LogSpool(tmp_path / "spool", "store-a"))
    down.start()
    for record in records:
        down.submit(record)
    await asyncio.sleep(0.1)
    await down.close()  # the store never came back: the records go to the spool, not away
    assert down.spooled == 3 and down.spilled == 0
    store = SqliteStore(str(tmp_path / "s.db"))
    await store.open()
    try:
        other = LogWriter(store, 0.01, 10, spool=LogSpool(tmp_path / "spool", "store-b"))  # another store: not its spool
        other.start()
        await other.close()
        assert other.replayed == 0
        from zoneinfo import ZoneInfo

        writer = LogWriter(store, 0.01, 10, ZoneInfo("UTC"), spool=LogSpool(tmp_path / "spool", "store-a"))
        writer.start()
        await writer.flush()
        await writer.close()
        assert writer.replayed == 3
        assert [await store.get_log(r["id"]) for r in records] == records
        assert sum(r["requests"] for r in await store.query_rollups("app-s")) == 3  # counted once, when they landed
        assert list((tmp_path / "spool").iterdir()) == []
    finally:
        await store.close()


async def test_a_live_writers_spool_is_not_taken_and_a_partial_replay_keeps_only_the_rest(tmp_path):
    from zoneinfo import ZoneInfo

    from shared.records.request_log import LogSpool, LogWriter
    from shared.store import StoreUnavailable

    live = LogSpool(tmp_path / "spool", "store-a")
    live.append_encoded([EncodedLog.of({"id": "held"}, True)])  # a writer that is still running holds its file
    records = _log_records("r", "app-p", 5)
    gone = LogSpool(tmp_path / "spool", "store-a")
    gone.append_encoded([EncodedLog.of(r, True) for r in records])
    gone.close()  # its writer ended
    store = SqliteStore(str(tmp_path / "p.db"))
    await store.open()

    calls = []

    async def fail_the_second_batch(batch):
        calls.append(len(batch))
        if len(calls) == 2:
            raise StoreUnavailable("down again")

    try:
        writer = LogWriter(_LogStoreWith(store, fail_the_second_batch), 0.01, 2, ZoneInfo("UTC"), spool=LogSpool(tmp_path / "spool", "store-a"))
        writer.start()
        await writer.close()
        assert writer.replayed == 2  # the first batch; the second failed
        writer = LogWriter(store, 0.01, 2, ZoneInfo("UTC"), spool=LogSpool(tmp_path / "spool", "store-a"))
        writer.start()
        await writer.close()
        assert writer.replayed == 3  # only what was left, so nothing is counted twice
        assert sum(r["requests"] for r in await store.query_rollups("app-p")) == 5
        assert await store.get_log("held") is None  # the live writer's file was not touched
        live.close()
    finally:
        await store.close()


async def test_a_record_the_store_cannot_serialise_does_not_stop_the_others(tmp_path):
    from shared.records.request_log import LogWriter

    store = SqliteStore(str(tmp_path / "s.db"))
    await store.open()
    try:
        writer = LogWriter(store, 0.01, 10)
        writer.start()
        writer.submit({"id": "bad", "app_id": "a", "timestamp": "2026-11-24T10:00:00Z", "ttl": 60, "huge": 2**70})
        writer.submit({"id": "good", "app_id": "a", "timestamp": "2026-11-24T10:00:00Z", "ttl": 60})
        await asyncio.wait_for(writer.flush(), timeout=5)
        writer.submit({"id": "later", "app_id": "a", "timestamp": "2026-11-24T10:00:01Z", "ttl": 60})
        await asyncio.wait_for(writer.flush(), timeout=5)
        await writer.close()
        assert await store.get_log("good") is not None and await store.get_log("later") is not None
        assert writer.spilled == 1  # the bad one went to the fallback sink, counted
    finally:
        await store.close()


async def test_an_overflowing_queue_spools_and_the_writer_replays_it_when_caught_up(tmp_path, monkeypatch):
    from zoneinfo import ZoneInfo

    from shared.records import request_log
    from shared.records.request_log import LogSpool, LogWriter

    monkeypatch.setattr(request_log, "_MAX_QUEUED_RECORDS", 4)
    store = SqliteStore(str(tmp_path / "o.db"))
    await store.open()
    try:
        writer = LogWriter(store, 0.01, 3, ZoneInfo("UTC"), spool=LogSpool(tmp_path / "spool", "store-o"))
        records = _log_records("o", "app-o", 10)
        for record in records:  # faster than the writer (not even started): the queue overflows
            writer.submit(record)
        assert writer.queued <= 4 and writer.spooled >= 6
        writer.start()
        await writer.flush()
        await writer.close()
        assert all([await store.get_log(r["id"]) for r in records])
        assert sum(r["requests"] for r in await store.query_rollups("app-o")) == 10  # each counted once
    finally:
        await store.close()


async def test_spooled_records_with_line_separators_survive_the_round_trip(tmp_path):
    import io

    from shared.records.request_log import LogSpool

    spool = LogSpool(tmp_path / "spool", "store-u")
    records = [{"id": "u1", "text": "a\u2028b\u2029c\u0085d"}, {"id": "u2", "text": "plain"}]
    spool.append_encoded([EncodedLog.of(r, True) for r in records])
    spool.close()
    with open(next((tmp_path / "spool").iterdir()), encoding="utf-8") as handle:
        assert LogSpool.read(io.StringIO(handle.read())) == records


async def test_overflow_while_a_batch_is_being_written_loses_and_doubles_nothing(tmp_path, monkeypatch):
    from zoneinfo import ZoneInfo

    from shared.records import request_log
    from shared.records.request_log import LogSpool, LogWriter

    monkeypatch.setattr(request_log, "_MAX_QUEUED_RECORDS", 6)
    store = SqliteStore(str(tmp_path / "f.db"))
    await store.open()

    async def slowly(items):
        await asyncio.sleep(0.05)  # the queue overflows while this write is in flight

    try:
        writer = LogWriter(_LogStoreWith(store, slowly), 0.01, 3, ZoneInfo("UTC"), spool=LogSpool(tmp_path / "spool", "store-f"))
        writer.start()
        records = _log_records("f", "app-f", 40)
        for record in records:
            writer.submit(record)
            await asyncio.sleep(0.005)
        await writer.flush()
        await writer.close()
        assert writer.spooled > 0  # the overflow did happen
        assert all([await store.get_log(r["id"]) for r in records])
        assert sum(r["requests"] for r in await store.query_rollups("app-f")) == 40  # none counted twice
    finally:
        await store.close()


async def test_the_sqlite_thread_yields_the_cpu_to_requests(tmp_path):
    """Background writes run at a lower CPU priority than the event loop (Linux)."""
    import sys

    import pytest

    if not sys.platform.startswith("linux"):
        pytest.skip("per-thread priorities are a Linux feature")
    store = SqliteStore(str(tmp_path / "nice.db"))
    await store.open()
    try:
        thread_id = await store._run(lambda conn: threading.get_native_id())
        assert os.getpriority(os.PRIO_PROCESS, thread_id) > os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    finally:
        await store.close()
