"""SQLite adapter: the embedded default.

All database work runs on one dedicated thread that owns the connection, so the event loop
never blocks on disk and writes are serialised without locks in Python. WAL mode lets other
processes (more local workers, the CLI, tests) read while this one writes; `busy_timeout`
makes concurrent writers from several processes wait instead of failing.
"""
from __future__ import annotations

import asyncio
import functools
import os
import sqlite3
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, TypeVar

import orjson

from ..records.rollups import ROLLUP_COUNTERS
from ..records.telemetry import is_final
from .base import (
    ADMIN_SESSIONS, BUDGET_ALERTS, DEPLOYMENTS, GATEWAY_KEYS, JOBS, OWNED_OBJECTS, POLICIES, PRICES, QUOTA_COUNTERS, REQUEST_LOGS, RESPONSE_CACHE, USAGE_ROLLUPS, AlreadyExists, CounterCharge,
    MAX_LOG_PAGE, EncodedLog, LogQuery, PreconditionFailed, ReserveOutcome, Store, StoreUnavailable, owned_sort_key,
)

T = TypeVar("T")

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {REQUEST_LOGS.name} (
    id TEXT PRIMARY KEY,
    app_id TEXT NOT NULL,
    user_id TEXT,
    deployment TEXT,
    status INTEGER,
    timestamp TEXT NOT NULL,
    expires_at REAL,
    doc BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS ix_logs_time ON {REQUEST_LOGS.name}(timestamp);
CREATE INDEX IF NOT EXISTS ix_logs_app_time ON {REQUEST_LOGS.name}(app_id, timestamp);
CREATE INDEX IF NOT EXISTS ix_logs_user_time ON {REQUEST_LOGS.name}(user_id, timestamp);
CREATE INDEX IF NOT EXISTS ix_logs_expiry ON {REQUEST_LOGS.name}(expires_at);
CREATE TABLE IF NOT EXISTS {POLICIES.name} (
    app_id TEXT NOT NULL,
    id TEXT NOT NULL,
    etag TEXT NOT NULL,
    doc BLOB NOT NULL,
    PRIMARY KEY (app_id, id)
);
CREATE TABLE IF NOT EXISTS {QUOTA_COUNTERS.name} (
    subject TEXT NOT NULL,
    counter TEXT NOT NULL,
    used INTEGER NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (subject, counter)
);
CREATE TABLE IF NOT EXISTS {PRICES.name} (
    id TEXT PRIMARY KEY,
    doc BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS {DEPLOYMENTS.name} (
    id TEXT PRIMARY KEY,
    doc BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS {RESPONSE_CACHE.name} (
    scope TEXT NOT NULL,
    key TEXT NOT NULL,
    expires_at REAL NOT NULL,
    doc BLOB NOT NULL,
    PRIMARY KEY (scope, key)
);
CREATE TABLE IF NOT EXISTS {ADMIN_SESSIONS.name} (
    id TEXT PRIMARY KEY,
    doc BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS {GATEWAY_KEYS.name} (
    id TEXT PRIMARY KEY,
    doc BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS {USAGE_ROLLUPS.name} (
    app_id TEXT NOT NULL,
    id TEXT NOT NULL,
    day TEXT NOT NULL,
    user_id TEXT NOT NULL,
    deployment TEXT NOT NULL,
    model TEXT NOT NULL,
    operation TEXT NOT NULL DEFAULT '-',
    {", ".join(f"{c} INTEGER NOT NULL DEFAULT 0" for c in ROLLUP_COUNTERS)},
    PRIMARY KEY (app_id, id)
);
CREATE INDEX IF NOT EXISTS ix_rollups_day ON {USAGE_ROLLUPS.name}(day);
CREATE TABLE IF NOT EXISTS {OWNED_OBJECTS.name} (
    app_id TEXT NOT NULL,
    id TEXT NOT NULL,
    kind TEXT NOT NULL,
    sort_key TEXT NOT NULL,
    expires_at REAL NOT NULL,
    doc BLOB NOT NULL,
    PRIMARY KEY (app_id, id)
);
CREATE INDEX IF NOT EXISTS ix_owned_listing ON {OWNED_OBJECTS.name}(app_id, kind, sort_key);
CREATE INDEX IF NOT EXISTS ix_owned_open ON {OWNED_OBJECTS.name}(sort_key) WHERE json_extract(doc, '$.open') = 1;
CREATE TABLE IF NOT EXISTS {BUDGET_ALERTS.name} (
    app_id TEXT NOT NULL,
    id TEXT NOT NULL,
    sort_key TEXT NOT NULL,
    expires_at REAL NOT NULL,
    doc BLOB NOT NULL,
    PRIMARY KEY (app_id, id)
);
CREATE INDEX IF NOT EXISTS ix_budget_alerts_sort ON {BUDGET_ALERTS.name}(sort_key);
CREATE TABLE IF NOT EXISTS {JOBS.name} (
    app_id TEXT NOT NULL,
    id TEXT NOT NULL,
    etag TEXT NOT NULL,
    expires_at REAL NOT NULL,
    doc BLOB NOT NULL,
    PRIMARY KEY (app_id, id)
);
"""

# Columns added after a table was first created: (table, column, definition). CREATE TABLE IF
# NOT EXISTS leaves an existing table as it was, so a database made by an earlier version gets them here.
_ADDED_COLUMNS = ((USAGE_ROLLUPS.name, "operation", "TEXT NOT NULL DEFAULT '-'"),)


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    for table, column, definition in _ADDED_COLUMNS:
        if column not in {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")


_PURGE_EVERY_SECONDS = 300
_BACKGROUND_CHUNK = 4  # background calls per turn, so that urgent ones wait for at most this many


_RESERVE = (
    f"INSERT INTO {QUOTA_COUNTERS.name} (subject, counter, used, expires_at)"
    " SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]'), ?1 + json_extract(value, '$[4]')"
    " FROM json_each(?2)"
    " WHERE NOT EXISTS ("
    "  SELECT 1 FROM json_each(?2) AS charge"
    f"  LEFT JOIN {QUOTA_COUNTERS.name} AS q ON q.subject = json_extract(charge.value, '$[0]')"
    "   AND q.counter = json_extract(charge.value, '$[1]') AND q.expires_at > ?1"
    "  WHERE json_extract(charge.value, '$[3]') IS NOT NULL"
    "   AND COALESCE(q.used, 0) + json_extract(charge.value, '$[2]') > json_extract(charge.value, '$[3]'))"
    " ON CONFLICT(subject, counter) DO UPDATE SET"
    " used = CASE WHEN expires_at > ?1 THEN used + excluded.used ELSE excluded.used END,"
    " expires_at = excluded.expires_at"
)


_LOG_COLUMNS = "(id, app_id, user_id, deployment, status, timestamp, expires_at, doc)"
_ROWS_PER_STATEMENT = 64


@functools.lru_cache(maxsize=4 * _ROWS_PER_STATEMENT)  # a few statement heads, each 1 to 64 rows
def _values_statement(head: str, width: int, rows: int) -> str:
    row = "(" + ",".join("?" * width) + ")"
    return f"{head} VALUES {','.join([row] * rows)}"


def _inserts(head: str, rows: list[list[Any]]) -> list[tuple[str, list[Any]]]:
    """`head` ("INSERT … INTO table (columns)") for every row, as statements with the values bound
    as parameters, up to _ROWS_PER_STATEMENT rows each: one SQLite step (one hand-over of the GIL)
    per statement, not per row as executemany would, and no statement text made per batch (at most
    that many distinct statements in sqlite3's cache). Made on the event loop's side, so that the
    SQLite thread holds the GIL for as little Python as may be (a point read on the loop's thread
    waits for it).

    Documents go in as bound text, never through SQLite's JSON functions: a batch bound as one
    JSON array for json_each had SQLite parse each record's document once per extracted column
    and write it out again (24 → 15 µs of SQLite time per record of 1.1 KB, `bench/micro.py`; more for
    bigger records)."""
    statements = []
    if rows:
        width = len(rows[0])
        for start in range(0, len(rows), _ROWS_PER_STATEMENT):
            chunk = rows[start : start + _ROWS_PER_STATEMENT]
            statements.append((_values_statement(head, width, len(chunk)), [value for row in chunk for value in row]))
    return statements


def _execute_all(conn: sqlite3.Connection, statements: list[tuple[str, list[Any]]]) -> None:
    for sql, parameters in statements:
        conn.execute(sql, parameters)


def _log_rows(items: list[EncodedLog], now: float) -> list[list[Any]]:
    """[id, app, user, deployment, status, timestamp, expires_at, record] per record."""
    return [[i.id, i.app_id, i.user_id if isinstance(i.user_id, str) else None,
             i.deployment if isinstance(i.deployment, str) else None,
             i.status if isinstance(i.status, int) else None, i.timestamp, now + i.ttl if i.ttl else None,
             i.blob.decode("utf-8")]  # stored as text, as JSON is
            for i in items]


_SQLITE_THREAD_NICE = 10


def _yield_cpu_to_requests() -> None:
    """Give the SQLite thread a lower CPU priority than the event loop (Linux, per thread).

    Its work is mostly background writes (log batches, cache entries, settlements) in bursts of a
    few milliseconds. At normal priority such a burst took the CPU from whatever a request was
    waiting for — on the 2-core bench machine, the upstream answering (added stream first byte
    1.32 → 1.12 ms between two `make bench` runs that differ by this change). At nice 10 it still
    gets an idle core whole and about a tenth of a contended one; a request waits on this thread
    only when a quota lease runs out."""
    if not sys.platform.startswith("linux"):  # elsewhere a thread id is not what setpriority takes
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _SQLITE_THREAD_NICE)
    except OSError:  # not permitted (a sandbox): run at normal priority
        pass


def _settle(done: list) -> None:
    for future, value, error in done:
        if future.cancelled():
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)


class SqliteStore(Store):
    name = "sqlite"

    def __init__(self, path: str) -> None:
        self._path = path
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._last_purge = 0.0
        self._last_cache_purge = 0.0
        self._queue_lock = threading.Lock()
        self._urgent: list = []
        self._background: list = []
        self._draining = False

    async def _run(self, fn: Callable[[sqlite3.Connection], T], urgent: bool = True) -> T:
        """Run `fn(connection)` on the SQLite thread.

        Calls are queued and the thread runs everything queued per wake-up, answering the event
        loop once per batch: under load one thread hop carries many calls. `urgent` calls (what a
        request waits for: reads, quota reservations) go before background writes (logs, cache
        entries, settlements), so a request never queues behind a big batch of log records."""
        if self._executor is None:
            raise StoreUnavailable("the SQLite store is not open")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._queue_lock:
            (self._urgent if urgent else self._background).append((fn, future))
            start, self._draining = not self._draining, True
        if start:
            self._executor.submit(self._drain, loop)
        try:
            return await future
        except (sqlite3.OperationalError, sqlite3.ProgrammingError) as exc:  # locked, unwritable, closed
            raise StoreUnavailable(f"SQLite: {exc}") from exc

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """A point read (rows by their key) on the caller's thread, through a read-only connection.

        In WAL mode a reader never waits for a writer, and one keyed lookup takes microseconds:
        done here, it neither pays a thread hop nor queues behind a batch of background writes on
        the SQLite thread (which was the latency tail of a cache lookup). Should SQLite ever be
        busy for a reader (WAL recovery), it goes through the SQLite thread like everything else."""
        reader = self._reader
        if reader is not None:
            try:
                return fn(reader)
            except sqlite3.Error:
                pass
        return await self._run(fn)

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the SQLite thread: urgent calls first, then background calls a few at a time."""
        while True:
            with self._queue_lock:
                # Every turn: all urgent calls, then a few background ones — so that background
                # writes neither delay a request by much nor starve under sustained load.
                batch = self._urgent + self._background[:_BACKGROUND_CHUNK]
                self._urgent, self._background = [], self._background[_BACKGROUND_CHUNK:]
                if not batch:
                    self._draining = False
                    return
            done = []
            for fn, future in batch:
                try:
                    done.append((future, fn(self._conn), None))
                except BaseException as exc:  # handed to the caller, whatever it is
                    done.append((future, None, exc))
            loop.call_soon_threadsafe(_settle, done)

    async def open(self) -> None:
        if self._executor is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sekisho-sqlite")

        def connect(_unused) -> None:
            _yield_cpu_to_requests()
            if self._path != ":memory:":
                Path(self._path).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA busy_timeout=10000")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SCHEMA)
            _add_missing_columns(conn)
            self._conn = conn
            if self._path != ":memory:":  # another connection to :memory: would be another database
                reader = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
                reader.execute("PRAGMA busy_timeout=0")  # never wait on the event loop (see _read)
                reader.execute("PRAGMA query_only=1")
                self._reader = reader

        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, connect, None)

    async def close(self) -> None:
        if self._executor is None:
            return

        def close(conn: sqlite3.Connection) -> None:
            conn.close()

        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()
        await self._run(close, urgent=False)  # after every call queued before it
        self._executor.shutdown(wait=True)
        self._executor = None
        self._conn = None

    # Request log ---------------------------------------------------------------
    async def write_logs(self, records: list[dict[str, Any]]) -> None:
        await self.write_encoded_logs([EncodedLog.of(r, is_final(r)) for r in records])

    async def write_encoded_logs(self, items: list[EncodedLog]) -> None:
        if not items:
            return
        now = time.time()
        purge = now - self._last_purge > _PURGE_EVERY_SECONDS
        if purge:
            self._last_purge = now
        # Many rows per statement: row by row (executemany), the SQLite thread gives the GIL back
        # and waits for it once per row — under load, the event loop holds it for up to the switch
        # interval each time, and the writer falls behind the requests.
        statements = (_inserts(f"INSERT OR IGNORE INTO {REQUEST_LOGS.name} {_LOG_COLUMNS}", _log_rows([i for i in items if not i.final], now))
                      + _inserts(f"INSERT OR REPLACE INTO {REQUEST_LOGS.name} {_LOG_COLUMNS}", _log_rows([i for i in items if i.final], now)))

        def write(conn: sqlite3.Connection) -> None:
            with conn:  # one transaction for the batch
                conn.execute("BEGIN IMMEDIATE")
                _execute_all(conn, statements)
                if purge:
                    conn.execute(f"DELETE FROM {REQUEST_LOGS.name} WHERE expires_at < ?", (now,))

        await self._run(write, urgent=False)

    async def get_log(self, request_id: str) -> dict[str, Any] | None:
        now = time.time()

        def read(conn: sqlite3.Connection):
            return conn.execute(
                f"SELECT doc FROM {REQUEST_LOGS.name} WHERE id = ? AND (expires_at IS NULL OR expires_at > ?)",
                (request_id, now),
            ).fetchone()

        row = await self._read(read)
        return orjson.loads(row[0]) if row else None

    async def query_logs(self, query: LogQuery) -> list[dict[str, Any]]:
        clauses = ["(expires_at IS NULL OR expires_at > ?)"]
        params: list[Any] = [time.time()]
        for column in ("app_id", "user_id", "deployment", "status"):
            value = getattr(query, column)
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if query.since:
            clauses.append("timestamp >= ?")
            params.append(query.since)
        if query.until:
            clauses.append("timestamp < ?")
            params.append(query.until)
        if query.cache:
            clauses.append("json_extract(CAST(doc AS TEXT), '$.cache.status') = ?")
            params.append(query.cache)
        if query.guard is not None:
            clauses.append(f"COALESCE(json_array_length(CAST(doc AS TEXT), '$.guard'), 0) {'>' if query.guard else '='} 0")
        if query.after is not None:
            clauses.append("(timestamp < ? OR (timestamp = ? AND id < ?))")
            params.extend((query.after[0], query.after[0], query.after[1]))
        params.append(max(1, min(query.limit, MAX_LOG_PAGE + 1)))
        sql = (
            f"SELECT doc FROM {REQUEST_LOGS.name} WHERE {' AND '.join(clauses)}"
            " ORDER BY timestamp DESC, id DESC LIMIT ?"
        )

        def read(conn: sqlite3.Connection):
            return conn.execute(sql, params).fetchall()

        return [orjson.loads(row[0]) for row in await self._run(read)]

    # Policies --------------------------------------------------------------------------
    async def get_policy(self, app_id: str, doc_id: str) -> dict[str, Any] | None:
        def read(conn: sqlite3.Connection):
            return conn.execute(f"SELECT doc, etag FROM {POLICIES.name} WHERE app_id = ? AND id = ?", (app_id, doc_id)).fetchone()

        row = await self._read(read)
        return {**orjson.loads(row[0]), "etag": row[1]} if row else None

    async def list_policies(self, app_id: str | None = None) -> list[dict[str, Any]]:
        def read(conn: sqlite3.Connection):
            if app_id is None:
                return conn.execute(f"SELECT doc, etag FROM {POLICIES.name} ORDER BY app_id, id").fetchall()
            return conn.execute(f"SELECT doc, etag FROM {POLICIES.name} WHERE app_id = ? ORDER BY id", (app_id,)).fetchall()

        return [{**orjson.loads(doc), "etag": etag} for doc, etag in await self._run(read)]

    async def put_policy(self, doc: dict[str, Any], if_match: str | None = None, create_only: bool = False) -> dict[str, Any]:
        stored = {k: v for k, v in doc.items() if k != "etag"}
        etag = uuid.uuid4().hex
        blob = orjson.dumps(stored)

        def write(conn: sqlite3.Connection) -> None:
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                row = conn.execute(f"SELECT etag FROM {POLICIES.name} WHERE app_id = ? AND id = ?", (stored["app_id"], stored["id"])).fetchone()
                if create_only and row is not None:
                    raise AlreadyExists(f"policy {stored['app_id']}/{stored['id']} exists")
                if if_match is not None and (row is None or row[0] != if_match):
                    raise PreconditionFailed(f"policy {stored['app_id']}/{stored['id']} has changed (ETag mismatch)")
                conn.execute(
                    f"INSERT OR REPLACE INTO {POLICIES.name} (app_id, id, etag, doc) VALUES (?, ?, ?, ?)",
                    (stored["app_id"], stored["id"], etag, blob),
                )

        await self._run(write)
        return {**stored, "etag": etag}

    async def delete_policy(self, app_id: str, doc_id: str, if_match: str | None = None) -> bool:
        def delete(conn: sqlite3.Connection) -> bool:
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                row = conn.execute(f"SELECT etag FROM {POLICIES.name} WHERE app_id = ? AND id = ?", (app_id, doc_id)).fetchone()
                if row is None:
                    if if_match is not None:
                        raise PreconditionFailed(f"policy {app_id}/{doc_id} does not exist")
                    return False
                if if_match is not None and row[0] != if_match:
                    raise PreconditionFailed(f"policy {app_id}/{doc_id} has changed (ETag mismatch)")
                conn.execute(f"DELETE FROM {POLICIES.name} WHERE app_id = ? AND id = ?", (app_id, doc_id))
                return True

        return await self._run(delete)

    # Quota counters ----------------------------------------------------------------------
    # Counters are read and written one statement per call, the charges bound as one JSON
    # array: one SQLite step, so one hand-over of the GIL, whatever the number of counters.
    @staticmethod
    def _current_all(conn: sqlite3.Connection, charges: list[CounterCharge], now: float) -> list[int]:
        keys = orjson.dumps([[c.subject, c.counter] for c in charges]).decode()
        (found,) = conn.execute(
            f"SELECT json_group_array(json_array(subject, counter, used)) FROM {QUOTA_COUNTERS.name}"
            " WHERE expires_at > ? AND (subject, counter) IN"
            " (SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each(?))",
            (now, keys),
        ).fetchone()
        used = {(subject, counter): value for subject, counter, value in orjson.loads(found)}
        return [used.get((c.subject, c.counter), 0) for c in charges]

    @staticmethod
    def _add_all(conn: sqlite3.Connection, charges: list[CounterCharge], now: float) -> None:
        # An expired row is a finished window: start from zero.
        rows = orjson.dumps([[c.subject, c.counter, c.amount, c.ttl] for c in charges]).decode()
        conn.execute(
            f"INSERT INTO {QUOTA_COUNTERS.name} (subject, counter, used, expires_at)"
            " SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]'), ?1 + json_extract(value, '$[3]')"
            " FROM json_each(?2) WHERE true"
            " ON CONFLICT(subject, counter) DO UPDATE SET"
            " used = CASE WHEN expires_at > ?1 THEN used + excluded.used ELSE excluded.used END,"
            " expires_at = excluded.expires_at",
            (now, rows),
        )

    async def reserve(self, charges: list[CounterCharge]) -> ReserveOutcome:
        rows = orjson.dumps([[c.subject, c.counter, c.amount, c.limit, c.ttl] for c in charges]).decode()

        def reserve(conn: sqlite3.Connection) -> ReserveOutcome:
            now = time.time()
            for _ in range(2):
                current = self._current_all(conn, charges, now)  # for the answer's remaining-quota headers
                # One statement checks every limit and adds every charge, or adds nothing: atomic
                # on its own, across processes too, without a transaction of several steps.
                if conn.execute(_RESERVE, (now, rows)).rowcount > 0:
                    return ReserveOutcome(True, [u + c.amount for u, c in zip(current, charges)])
                current = self._current_all(conn, charges, now)  # refused: say which limit, as it is now
                for index, (charge, used) in enumerate(zip(charges, current)):
                    if charge.limit is not None and used + charge.amount > charge.limit:
                        return ReserveOutcome(False, current, index)
                # Refused, then freed by another process meanwhile: try once more.
            return ReserveOutcome(False, current, 0)

        if not charges:
            return ReserveOutcome(True, [])

        return await self._run(reserve)

    async def adjust(self, charges: list[CounterCharge]) -> None:
        def adjust(conn: sqlite3.Connection) -> None:
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                self._add_all(conn, charges, time.time())

        await self._run(adjust, urgent=False)

    async def read_counters(self, subject: str, counters: list[str]) -> dict[str, int]:
        def read(conn: sqlite3.Connection) -> dict[str, int]:
            charges = [CounterCharge(subject, c, 0, None, 0) for c in counters]
            return dict(zip(counters, self._current_all(conn, charges, time.time())))

        return await self._run(read)

    async def reset_counters(self, subject: str, counters: list[str]) -> None:
        def reset(conn: sqlite3.Connection) -> None:
            with conn:
                conn.executemany(
                    f"DELETE FROM {QUOTA_COUNTERS.name} WHERE subject = ? AND counter = ?", [(subject, c) for c in counters]
                )

        await self._run(reset)

    # Documents keyed by id alone (prices, the deployment catalogue) ----------------------------
    async def _get_doc(self, table: str, doc_id: str) -> dict[str, Any] | None:
        row = await self._read(lambda conn: conn.execute(f"SELECT doc FROM {table} WHERE id = ?", (doc_id,)).fetchone())
        return orjson.loads(row[0]) if row else None

    async def _list_docs(self, table: str) -> list[dict[str, Any]]:
        rows = await self._run(lambda conn: conn.execute(f"SELECT doc FROM {table} ORDER BY id").fetchall())
        return [orjson.loads(r[0]) for r in rows]

    async def _put_doc(self, table: str, doc: dict[str, Any]) -> dict[str, Any]:
        def write(conn: sqlite3.Connection) -> None:
            with conn:
                conn.execute(f"INSERT OR REPLACE INTO {table} (id, doc) VALUES (?, ?)", (doc["id"], orjson.dumps(doc)))

        await self._run(write)
        return doc

    async def _delete_doc(self, table: str, doc_id: str) -> bool:
        def delete(conn: sqlite3.Connection) -> bool:
            with conn:
                return conn.execute(f"DELETE FROM {table} WHERE id = ?", (doc_id,)).rowcount > 0

        return await self._run(delete)

    # Response cache ----------------------------------------------------------------------------
    async def cache_get(self, scope: str, key: str) -> dict[str, Any] | None:
        now = time.time()
        row = await self._read(lambda conn: conn.execute(
            f"SELECT doc FROM {RESPONSE_CACHE.name} WHERE scope = ? AND key = ? AND expires_at > ?", (scope, key, now)
        ).fetchone())
        return orjson.loads(row[0]) if row else None

    async def cache_put(self, scope: str, key: str, entry: dict[str, Any], ttl: int) -> None:
        await self.cache_put_many([(scope, key, entry, orjson.dumps(entry), ttl)])

    async def cache_put_many(self, items: list[tuple[str, str, dict[str, Any], bytes, int]]) -> None:
        if not items:
            return
        now = time.time()
        statements = _inserts(f"INSERT OR REPLACE INTO {RESPONSE_CACHE.name} (scope, key, expires_at, doc)",
                              [[scope, key, now + ttl, blob.decode("utf-8")] for scope, key, _, blob, ttl in items])

        def write(conn: sqlite3.Connection) -> None:
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                _execute_all(conn, statements)
                if now - self._last_cache_purge > _PURGE_EVERY_SECONDS:
                    self._last_cache_purge = now
                    conn.execute(f"DELETE FROM {RESPONSE_CACHE.name} WHERE expires_at < ?", (now,))

        await self._run(write, urgent=False)

    async def cache_purge(self, scope: str) -> int:
        def purge(conn: sqlite3.Connection) -> int:
            with conn:
                return conn.execute(f"DELETE FROM {RESPONSE_CACHE.name} WHERE scope = ?", (scope,)).rowcount

        return await self._run(purge)

    # Objects apps create upstream --------------------------------------------------------------
    async def get_owned(self, app_id: str, kind: str, object_id: str) -> dict[str, Any] | None:
        now = time.time()
        row = await self._read(lambda conn: conn.execute(
            f"SELECT doc FROM {OWNED_OBJECTS.name} WHERE app_id = ? AND id = ? AND expires_at > ?", (app_id, f"{kind}:{object_id}", now)
        ).fetchone())
        return orjson.loads(row[0]) if row else None

    async def put_owned(self, doc: dict[str, Any], if_match: str | None = None) -> str:
        now = time.time()
        key = f"{doc['kind']}:{doc['object_id']}"
        etag = uuid.uuid4().hex
        # The ETag lives in the document itself: conditional writes compare it inside the transaction.
        stored = {**{k: v for k, v in doc.items() if k != "etag"}, "id": key, "sort_key": owned_sort_key(doc), "etag": etag}
        blob = orjson.dumps(stored)

        def write(conn: sqlite3.Connection) -> None:
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                if if_match is not None:
                    row = conn.execute(f"SELECT json_extract(doc, '$.etag') FROM {OWNED_OBJECTS.name} WHERE app_id = ? AND id = ? AND expires_at > ?",
                                       (doc["app_id"], key, now)).fetchone()
                    if row is None or row[0] != if_match:
                        raise PreconditionFailed(f"{key} has changed")
                conn.execute(f"INSERT OR REPLACE INTO {OWNED_OBJECTS.name} (app_id, id, kind, sort_key, expires_at, doc) VALUES (?, ?, ?, ?, ?, ?)",
                             (doc["app_id"], key, doc["kind"], stored["sort_key"], now + doc["ttl"], blob))

        await self._run(write)
        return etag

    async def list_owned(self, app_id: str, kind: str, limit: int, before: str | None = None) -> list[dict[str, Any]]:
        now = time.time()
        rows = await self._read(lambda conn: conn.execute(
            f"SELECT doc FROM {OWNED_OBJECTS.name} WHERE app_id = ? AND kind = ? AND sort_key < ? AND expires_at > ?"
            f" ORDER BY sort_key DESC LIMIT ?", (app_id, kind, before or "~", now, limit)
        ).fetchall())
        return [orjson.loads(row[0]) for row in rows]

    async def list_open_owned(self, limit: int) -> list[dict[str, Any]]:
        now = time.time()
        rows = await self._read(lambda conn: conn.execute(
            f"SELECT doc FROM {OWNED_OBJECTS.name} WHERE json_extract(doc, '$.open') = 1 AND expires_at > ? ORDER BY sort_key LIMIT ?",
            (now, limit)).fetchall())
        return [orjson.loads(row[0]) for row in rows]

    async def delete_owned(self, app_id: str, kind: str, object_id: str) -> bool:
        def delete(conn: sqlite3.Connection) -> bool:
            with conn:
                return conn.execute(f"DELETE FROM {OWNED_OBJECTS.name} WHERE app_id = ? AND id = ?", (app_id, f"{kind}:{object_id}")).rowcount > 0

        return await self._run(delete)

    # Budget alerts -----------------------------------------------------------------------------
    async def claim_alert(self, doc: dict[str, Any]) -> bool:
        now = time.time()

        def write(conn: sqlite3.Connection) -> bool:
            with conn:
                conn.execute(f"DELETE FROM {BUDGET_ALERTS.name} WHERE app_id = ? AND id = ? AND expires_at <= ?", (doc["app_id"], doc["id"], now))
                return conn.execute(
                    f"INSERT OR IGNORE INTO {BUDGET_ALERTS.name} (app_id, id, sort_key, expires_at, doc) VALUES (?, ?, ?, ?, ?)",
                    (doc["app_id"], doc["id"], doc["sort_key"], now + doc["ttl"], orjson.dumps(doc))).rowcount == 1

        return await self._run(write)

    async def update_alert(self, doc: dict[str, Any]) -> None:
        def write(conn: sqlite3.Connection) -> None:
            with conn:
                conn.execute(f"UPDATE {BUDGET_ALERTS.name} SET doc = ? WHERE app_id = ? AND id = ?", (orjson.dumps(doc), doc["app_id"], doc["id"]))

        await self._run(write, urgent=False)

    async def list_alerts(self, app_id: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        now = time.time()
        where, params = ("app_id = ? AND ", [app_id]) if app_id is not None else ("", [])
        rows = await self._read(lambda conn: conn.execute(
            f"SELECT doc FROM {BUDGET_ALERTS.name} WHERE {where}expires_at > ? ORDER BY sort_key DESC LIMIT ?", (*params, now, int(limit))
        ).fetchall())
        return [orjson.loads(row[0]) for row in rows]

    # Async jobs --------------------------------------------------------------------------------
    async def get_job(self, app_id: str, job_id: str) -> dict[str, Any] | None:
        now = time.time()
        row = await self._read(lambda conn: conn.execute(
            f"SELECT doc, etag FROM {JOBS.name} WHERE app_id = ? AND id = ? AND expires_at > ?", (app_id, job_id, now)
        ).fetchone())
        return {**orjson.loads(row[0]), "etag": row[1]} if row else None

    async def put_job(self, doc: dict[str, Any], if_match: str | None = None) -> str:
        now = time.time()
        stored = {k: v for k, v in doc.items() if k != "etag"}
        blob, etag = orjson.dumps(stored), uuid.uuid4().hex

        def write(conn: sqlite3.Connection) -> None:
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                if if_match is not None:
                    row = conn.execute(f"SELECT etag FROM {JOBS.name} WHERE app_id = ? AND id = ?", (stored["app_id"], stored["id"])).fetchone()
                    if row is None or row[0] != if_match:
                        raise PreconditionFailed(f"job {stored['id']} has changed")
                conn.execute(
                    f"INSERT OR REPLACE INTO {JOBS.name} (app_id, id, etag, expires_at, doc) VALUES (?, ?, ?, ?, ?)",
                    (stored["app_id"], stored["id"], etag, now + stored["ttl"], blob),
                )
                conn.execute(f"DELETE FROM {JOBS.name} WHERE expires_at < ?", (now,))

        await self._run(write)
        return etag
    # Usage roll-ups ----------------------------------------------------------------------------
    async def add_rollups(self, deltas: list[Any]) -> None:
        if not deltas:
            return
        columns = ", ".join(ROLLUP_COUNTERS)
        picks = ", ".join(f"json_extract(value, '$[{i}]')" for i in range(7 + len(ROLLUP_COUNTERS)))
        updates = ", ".join(f"{c} = {c} + excluded.{c}" for c in ROLLUP_COUNTERS)
        sql = (f"INSERT INTO {USAGE_ROLLUPS.name} (app_id, id, day, user_id, deployment, model, operation, {columns}) "
               f"SELECT {picks} FROM json_each(?) WHERE true ON CONFLICT (app_id, id) DO UPDATE SET {updates}")
        rows = orjson.dumps([[d.app_id, d.id, d.day, d.user_id, d.deployment, d.model, d.operation, *(d.counts.get(c, 0) for c in ROLLUP_COUNTERS)]
                             for d in deltas]).decode()

        def write(conn: sqlite3.Connection) -> None:
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(sql, (rows,))  # one statement for the batch (see _add_all)

        await self._run(write, urgent=False)

    async def query_rollups(self, app_id: str | None = None, since: str | None = None, until: str | None = None) -> list[dict[str, Any]]:
        clauses, params = [], []
        for clause, value in (("app_id = ?", app_id), ("day >= ?", since), ("day <= ?", until)):
            if value is not None:
                clauses.append(clause)
                params.append(value)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""

        def read(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            cursor = conn.execute(f"SELECT app_id, id, day, user_id, deployment, model, operation, {', '.join(ROLLUP_COUNTERS)} FROM {USAGE_ROLLUPS.name} {where} ORDER BY day", params)
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row)) for row in cursor.fetchall()]

        return await self._run(read)
