"""Component micro-benchmarks behind three of the performance changes, each as a ratio in one run.

    .venv/bin/python bench/micro.py

1. SQLite time per request-log record, 600 batches of 100 through the store's own statement:
   random ids (uuid4) against time-ordered ids (shared/context.new_request_id).
2. The same with time-ordered ids, the batch bound as one JSON array read with json_each (how the
   store wrote batches before) against the store's rows of bound values (shared/store/sqlite.py).
3. Setting up a streamed response on an ASGI 2.3 server: Starlette's StreamingResponse (anyio task
   group) against RelayResponse (shared/upstream/relay_response.py), 3 events per stream, no I/O.
"""
from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
import tempfile
import time
import uuid
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from shared.context import new_request_id  # noqa: E402
from shared.store.sqlite import _LOG_COLUMNS, _SCHEMA, _execute_all, _inserts  # noqa: E402
from shared.upstream.relay_response import RelayResponse  # noqa: E402


_JSON_EACH_INSERT = (  # the batch as one JSON array: SQLite parses each record once per column it extracts
    f"INSERT OR REPLACE INTO request_logs {_LOG_COLUMNS} SELECT "
    + ", ".join(f"json_extract(value, '$[{i}]')" for i in range(8)) + " FROM json_each(?)"
)


def _json_each_rows(conn: sqlite3.Connection, rows: list[list]) -> None:
    conn.execute(_JSON_EACH_INSERT, ("[" + ",".join(orjson.dumps(row[:-1]).decode()[:-1] + "," + row[-1] + "]" for row in rows) + "]",))


def _bound_rows(conn: sqlite3.Connection, rows: list[list]) -> None:
    _execute_all(conn, _inserts(f"INSERT OR REPLACE INTO request_logs {_LOG_COLUMNS}", rows))


def log_write_us(new_id, insert=_bound_rows) -> float:
    """µs of SQLite time per record (600 batches of 100, the table growing to 60,000 rows)."""
    path = os.path.join(tempfile.mkdtemp(), "logs.db")
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(_SCHEMA)
    blob = orjson.dumps({"request": {"messages": [{"role": "user", "content": "Summarise the request path. " * 6}]},
                         "response": {"content": "word " * 150}, "usage": {"total_tokens": 170}}).decode()
    spent = 0.0
    for batch in range(600):
        rows = [[new_id(), "app", "user", "gpt-4o-mini", 200, f"2026-11-24T21:{batch // 60 % 60:02d}:{batch % 60:02d}.{i:06d}",
                 time.time() + 86400, blob] for i in range(100)]
        started = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        insert(conn, rows)
        conn.execute("COMMIT")
        spent += time.perf_counter() - started
    conn.close()
    return spent / 60_000 * 1e6


async def stream_setup_us(response_class, streams: int = 5000) -> float:
    """µs per streamed response of 3 events, on an ASGI 2.3 server whose client stays."""
    async def events():
        for _ in range(3):
            yield b"data: {}\n\n"

    async def send(message):
        pass

    async def receive():
        await asyncio.Event().wait()

    scope = {"type": "http", "asgi": {"spec_version": "2.3"}}
    started = time.perf_counter()
    for _ in range(streams):
        await response_class(events(), media_type="text/event-stream")(scope, receive, send)
    return (time.perf_counter() - started) / streams * 1e6


def main() -> None:
    import uvloop
    from starlette.responses import StreamingResponse

    uvloop.install()
    rows = []
    random_ids = log_write_us(lambda: uuid.uuid4().hex)
    ordered_ids = log_write_us(new_request_id)
    rows.append(("request log write, SQLite time per record", "uuid4 ids", random_ids, "time-ordered ids", ordered_ids))
    json_each = log_write_us(new_request_id, _json_each_rows)
    bound = log_write_us(new_request_id)
    rows.append(("request log write, SQLite time per record (time-ordered ids)", "JSON array, json_each", json_each, "bound rows", bound))
    starlette = asyncio.run(stream_setup_us(StreamingResponse))
    relay = asyncio.run(stream_setup_us(RelayResponse))
    rows.append(("streamed response, 3 events, ASGI 2.3", "StreamingResponse", starlette, "RelayResponse", relay))
    print("| measure | before | µs | after | µs | after / before |\n|---|---|---:|---|---:|---:|")
    for name, before, b, after, a in rows:
        print(f"| {name} | {before} | {b:.1f} | {after} | {a:.1f} | {a / b:.2f} |")


if __name__ == "__main__":
    main()
