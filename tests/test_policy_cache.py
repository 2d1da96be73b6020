"""The in-memory policy cache never keeps a version that an admin replaced while it was read."""
from __future__ import annotations

import asyncio

from shared.policy.access import PolicyCache


class SlowStore:
    def __init__(self) -> None:
        self.version = 1
        self.reads = 0
        self.gate = asyncio.Event()

    async def get_policy(self, app_id, doc_id):
        self.reads += 1
        version = self.version
        await self.gate.wait()
        return {"id": doc_id, "app_id": app_id, "kind": "app", "name": f"v{version}", "settings": {}}


async def test_a_read_racing_an_invalidation_is_not_cached():
    store = SlowStore()
    cache = PolicyCache(store, ttl_seconds=60)
    reading = asyncio.create_task(cache.get("app", "app"))
    await asyncio.sleep(0)  # the read has started with version 1
    store.version = 2
    cache.invalidate("app")  # the admin wrote version 2 meanwhile
    store.gate.set()
    assert (await reading).name == "v1"  # that read answers what it saw...
    assert (await cache.get("app", "app")).name == "v2"  # ...but did not stay in the cache
    assert (await cache.get("app", "app")).name == "v2" and store.reads == 2  # and now v2 is cached
