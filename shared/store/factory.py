"""Pick and open the store adapter named by the settings."""
from __future__ import annotations

from ..settings import Settings
from .base import Store


async def open_store(settings: Settings) -> Store:
    if settings.store == "cosmos":
        from .cosmos import CosmosStore

        store: Store = CosmosStore(
            endpoint=settings.cosmos_endpoint,
            key=settings.cosmos_key or None,
            database=settings.cosmos_database,
            verify_tls=settings.cosmos_verify_tls,
        )
    else:
        from .sqlite import SqliteStore

        store = SqliteStore(settings.sqlite_path)
    await store.open()
    return store
