"""Storage: one interface (`Store`), two adapters (SQLite embedded, Cosmos DB production)."""
from .base import CONTAINERS, LogQuery, Store, StoreError, StoreUnavailable
from .factory import open_store

__all__ = ["CONTAINERS", "LogQuery", "Store", "StoreError", "StoreUnavailable", "open_store"]
