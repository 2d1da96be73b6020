"""Storage: one interface (`Store`), two adapters (SQLite embedded, Cosmos DB production)."""
from .base import (
    CONTAINERS, AlreadyExists, CounterCharge, EncodedLog, LogQuery, PreconditionFailed, ReserveOutcome, Store, StoreError, StoreUnavailable,
)
from .factory import open_store

__all__ = ["CONTAINERS", "AlreadyExists", "CounterCharge", "EncodedLog", "LogQuery", "PreconditionFailed", "ReserveOutcome", "Store", "StoreError", "StoreUnavailable", "open_store"]
