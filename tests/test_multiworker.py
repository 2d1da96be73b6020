"""Several local worker processes on one SQLite store: quotas and the cache stay correct across
processes (as they must across Function App instances)."""
from __future__ import annotations

import asyncio
import uuid

import aiohttp
import pytest

from shared.store import LogQuery
from shared.store.sqlite import SqliteStore

from .conftest import _gateway_env
from .servers import post_all, start_local_host, stop
from .test_quota import _away_from_minute_boundary

ADMIN = "/sekisho/admin"
CHAT = "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"


@pytest.fixture(scope="module")
def two_workers(simulator, tmp_path_factory, data_dir):
    path = str(tmp_path_factory.mktemp("workers") / "shared.db")
    host = start_local_host(_gateway_env(simulator, SEKISHO_SQLITE_PATH=path), data_dir, workers=2)
    yield host
    stop(host.process)


async def _register(host, admin_token, settings) -> str:
    app_id = str(uuid.uuid4())
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin_token}"}) as session:
        async with session.put(f"{host.url}{ADMIN}/policies/apps/{app_id}", json={"name": "workers", "settings": settings}) as response:
            assert response.status == 201
    return app_id


async def test_quota_race_across_processes_admits_exactly_the_limit(two_workers, admin_token, issuer):
    app_id = await _register(two_workers, admin_token, {"app_limits": {"requests_per_minute": 50}})
    _away_from_minute_boundary()
    results = await asyncio.to_thread(post_all, two_workers.url + CHAT, issuer.mint(app_id),
                                      {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}, 200)
    statuses = [status for status, _, _ in results]
    assert statuses.count(200) == 50 and statuses.count(429) == 150
    # Both processes took part: the log names the instance (host:pid) that served each request.
    store = SqliteStore(two_workers.env["SEKISHO_SQLITE_PATH"])
    await store.open()
    try:
        for _ in range(50):
            records = await store.query_logs(LogQuery(app_id=app_id, limit=1000))
            if len(records) == 200:
                break
            await asyncio.sleep(0.1)
    finally:
        await store.close()
    assert len({r["instance"] for r in records}) == 2


async def test_quota_leases_across_processes_never_admit_more_than_the_limit(two_workers, admin_token, issuer):
    """rpm 200: each process leases 10 units at a time while the counter is below 100."""
    from .test_quota import _settled

    app_id = await _register(two_workers, admin_token, {"app_limits": {"requests_per_minute": 200}})
    token = issuer.mint(app_id)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    _away_from_minute_boundary()
    warm = await asyncio.to_thread(lambda: [post_all(two_workers.url + CHAT, token, body, 2) for _ in range(30)])
    assert all(status == 200 for results in warm for status, _, _ in results)
    results = await asyncio.to_thread(post_all, two_workers.url + CHAT, token, body, 300)
    admitted = 60 + [status for status, _, _ in results].count(200)
    assert 200 - 2 * 10 <= admitted <= 200  # never over; short by at most the two processes' leases
    await _settled(two_workers, admin_token, app_id, "requests_per_minute", admitted)  # unspent shares handed back


async def test_cache_is_shared_across_processes(two_workers, admin_token, issuer):
    app_id = await _register(two_workers, admin_token, {"cache": {"enabled": True}})
    token = issuer.mint(app_id)
    body = {"messages": [{"role": "user", "content": "cached across workers"}], "temperature": 0}
    first = await asyncio.to_thread(post_all, two_workers.url + CHAT, token, body, 1)
    assert first[0][1]["x-sekisho-cache"] == "MISS"
    await asyncio.sleep(0.5)  # the entry is written off the answer's path
    results = await asyncio.to_thread(post_all, two_workers.url + CHAT, token, body, 20)
    assert {headers["x-sekisho-cache"] for _, headers, _ in results} == {"HIT"}
    assert {answer["id"] for _, _, answer in results} == {first[0][2]["id"]}
