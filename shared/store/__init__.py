"""Storage: one interface (`Store`), two adapters (SQLite embedded, Cosmos DB production)."""
from .base import CONTAINERS, AlreadyExists, LogQuery, PreconditionFailed, Store, StoreError, StoreUnavailable
from .factory import open_store

__all__ = ["CONTAINERS", "AlreadyExists", "LogQuery", "PreconditionFailed", "Store", "StoreError", "StoreUnavailable", "open_store"]
