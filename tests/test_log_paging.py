"""The request log read in full: cursor paging that returns every record exactly once while writes
go on (both stores), and a streamed export of any range in bounded memory (API and CLI)."""
from __future__ import annotations

import csv
import io
import json
import random
import time
import tracemalloc
import uuid

import aiohttp
import pytest

from shared.store import LogQuery
from shared.store.base import log_cursor, read_log_cursor

from .test_store_contract import _record

ADMIN = "/sekisho/admin"
CHAT = "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"


def _stamp(second: int, millisecond: int = 0) -> str:
    return f"2026-11-24T10:{second // 60:02d}:{second % 60:02d}.{millisecond:03d}Z"


async def _pages(store, query: LogQuery, size: int, between=None) -> list[list[dict]]:
    pages, after = [], None
    while True:
        page = await store.query_logs(LogQuery(**{**query.__dict__, "limit": size, "after": after}))
        pages.append(page)
        if between is not None:
            await between(len(pages))
        if len(page) < size:
            return pages
        after = (page[-1]["timestamp"], page[-1]["id"])


async def test_paging_returns_every_record_exactly_once_while_writes_go_on(store):
    app = "paging-" + uuid.uuid4().hex[:6]
    # 240 records on 30 distinct milliseconds: runs of equal timestamps cross page boundaries.
    records = [_record(app, _stamp(5, i % 30)) for i in range(240)]
    random.Random(7).shuffle(records)
    await store.write_logs(records)
    written = 0

    async def write_meanwhile(page_number: int) -> None:
        nonlocal written
        # New records keep arriving: newer ones, and late ones with the same and older timestamps.
        await store.write_logs([_record(app, _stamp(9, page_number)), _record(app, _stamp(5, 15)), _record(app, _stamp(1, page_number))])
        written += 3

    pages = await _pages(store, LogQuery(app_id=app), 17, write_meanwhile)
    seen = [r["id"] for page in pages for r in page]
    assert len(seen) == len(set(seen)), "a record came twice"
    assert {r["id"] for r in records} <= set(seen), "a record that existed when paging began was missed"
    order = [(r["timestamp"], r["id"]) for page in pages for r in page]
    assert order == sorted(order, reverse=True)
    # Filters hold across pages.
    other = _record(app, _stamp(5, 3), status=500)
    await store.write_logs([other])
    failed = [r for page in await _pages(store, LogQuery(app_id=app, status=500), 1) for r in page]
    assert [r["id"] for r in failed] == [other["id"]]


async def test_a_cursor_names_a_place_in_the_order_and_nothing_else():
    record = {"timestamp": "2026-11-24T10:00:00.000Z", "id": "0193abc"}
    assert read_log_cursor(log_cursor(record)) == ("2026-11-24T10:00:00.000Z", "0193abc")
    for bad in ("", "abc", "W10", "eyJhIjoxfQ", "%%%"):
        with pytest.raises(ValueError):
            read_log_cursor(bad)


async def test_the_export_reads_100000_records_in_bounded_memory(tmp_path):
    from shared.records.request_log import csv_lines
    from shared.store.sqlite import SqliteStore

    adapter = SqliteStore(str(tmp_path / "big.db"))
    await adapter.open()
    try:
        filler = "x" * 700  # ~1 KB a record: the range is ~100 MB as records
        for start in range(0, 100_000, 5_000):
            await adapter.write_logs([
                {"id": f"{start + i:08d}", "app_id": "big", "user_id": "u", "timestamp": _stamp((start + i) // 1000 % 3600, (start + i) % 1000),
                 "status": 200, "ttl": 86400, "prompt": {"messages": [{"role": "user", "content": filler}]}, "cost": {"amount": 0.001}}
                for i in range(5_000)])
        tracemalloc.start()
        count, size = 0, 0
        async for line in csv_lines(adapter.iter_logs(LogQuery(app_id="big"))):
            count += 1
            size += len(line)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    finally:
        await adapter.close()
    assert count == 100_001  # the header and every record
    assert peak < 20 * 2**20, f"peak {peak / 2**20:.1f} MiB"


async def test_paging_and_export_through_the_admin_api(logged_gateway, admin_token, issuer):
    from .servers import put_app

    url = logged_gateway.host.url
    app_id = await put_app(url, admin_token, {"trust_user_header": True})
    headers = {"Authorization": f"Bearer {issuer.mint(app_id)}", "x-sekisho-user": "pager"}
    ids = []
    async with aiohttp.ClientSession() as session:
        for i in range(7):
            async with session.post(url + CHAT, headers=headers, json={"messages": [{"role": "user", "content": f"q{i}"}], "max_tokens": 5}) as response:
                assert response.status == 200
                ids.append(response.headers["x-sekisho-request-id"])
    for request_id in ids:
        await logged_gateway.log(request_id)
    admin = {"Authorization": f"Bearer {admin_token}"}
    async with aiohttp.ClientSession(headers=admin) as session:
        seen, cursor, pages = [], None, 0
        while True:
            query = f"app_id={app_id}&limit=3" + (f"&cursor={cursor}" if cursor else "")
            async with session.get(f"{url}{ADMIN}/logs?{query}") as response:
                assert response.status == 200
                body = await response.json()
            pages += 1
            seen += [r["id"] for r in body["data"]]
            assert body["has_more"] == (body["next_cursor"] is not None)
            if not body["has_more"]:
                break
            cursor = body["next_cursor"]
        assert pages == 3 and seen == list(reversed(ids))  # newest first, each once
        async with session.get(f"{url}{ADMIN}/exports/logs?app_id={app_id}") as response:
            assert response.status == 200 and response.headers["content-type"].startswith("application/x-ndjson")
            lines = (await response.text()).splitlines()
        assert [json.loads(line)["id"] for line in lines] == list(reversed(ids))
        async with session.get(f"{url}{ADMIN}/exports/logs?app_id={app_id}&format=csv&user_id=pager") as response:
            assert response.status == 200 and "attachment" in response.headers["content-disposition"]
            rows = list(csv.DictReader(io.StringIO(await response.text())))
        assert [r["id"] for r in rows] == list(reversed(ids)) and all(r["user_id"] == "pager" for r in rows)
        assert float(rows[0]["cost"]) > 0 and rows[0]["total_tokens"]
        for query in ("cursor=not-ours", "limit=0", "limit=1001", "since=yesterday", "until=2026-13-01", "status=2000"):
            async with session.get(f"{url}{ADMIN}/logs?{query}") as response:
                assert response.status == 400, query
                assert (await response.json())["error"]["code"]
        async with session.get(f"{url}{ADMIN}/exports/logs?format=xml") as response:
            assert response.status == 400


def test_the_cli_pages_and_exports(gateway, data_dir, sqlite_path, tmp_path, issuer, admin_token):
    import asyncio

    from .servers import put_app
    from .test_cli import cli

    app_id = asyncio.run(put_app(gateway.url, admin_token))

    async def send() -> list[str]:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {issuer.mint(app_id)}"}) as session:
            got = []
            for i in range(3):
                async with session.post(gateway.url + CHAT, json={"messages": [{"role": "user", "content": f"c{i}"}]}) as response:
                    got.append(response.headers["x-sekisho-request-id"])
            return got

    ids = asyncio.run(send())
    for _ in range(100):
        listed = cli(data_dir, sqlite_path, "logs", "list", "--app-id", app_id, "--limit", "2")
        if len(json.loads(listed.stdout or "[]")) == 2 and "--cursor" in listed.stderr:
            break
        time.sleep(0.05)
    first = [r["id"] for r in json.loads(listed.stdout)]
    cursor = listed.stderr.split("--cursor ")[1].split()[0]
    rest = [r["id"] for r in json.loads(cli(data_dir, sqlite_path, "logs", "list", "--app-id", app_id, "--limit", "2", "--cursor", cursor).stdout)]
    assert first + rest == list(reversed(ids))
    out = tmp_path / "logs.jsonl"
    exported = cli(data_dir, sqlite_path, "logs", "export", "--app-id", app_id, "-o", str(out))
    assert exported.returncode == 0 and "3 record(s) written" in exported.stderr
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == list(reversed(ids))
