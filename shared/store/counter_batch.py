"""Counter deltas added up in memory and written together: quota settlements and cache
statistics change the same few counters over and over, so one store call every few tens of
milliseconds replaces one per request. A delta that waits here is at most `interval` late."""
from __future__ import annotations

import asyncio
import logging

from . import CounterCharge, Store

logger = logging.getLogger("sekisho.counters")


class CounterBatcher:
    def __init__(self, store: Store, interval: float = 0.05, what: str = "counter") -> None:
        self._store = store
        self._interval = interval
        self._what = what
        self._pending: dict[tuple[str, str], list[int]] = {}  # (subject, counter) → [amount, ttl]
        self._task: asyncio.Task | None = None
        self.failures = 0

    def add(self, charges: list[CounterCharge]) -> None:
        for charge in charges:
            entry = self._pending.setdefault((charge.subject, charge.counter), [0, charge.ttl])
            entry[0] += charge.amount
            entry[1] = max(entry[1], charge.ttl)
        if self._pending and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._flush_soon())

    async def _flush_soon(self) -> None:
        try:
            await asyncio.sleep(self._interval)
            await self.flush()
        finally:
            self._task = None  # only now: drain() waits for a flush in flight
            if self._pending:  # added while this flush was writing
                self._task = asyncio.get_running_loop().create_task(self._flush_soon())

    async def flush(self) -> None:
        pending, self._pending = self._pending, {}
        charges = [CounterCharge(subject, counter, amount, None, ttl) for (subject, counter), (amount, ttl) in pending.items() if amount]
        if not charges:
            return
        try:
            await self._store.adjust(charges)
        except Exception:
            self.failures += 1
            logger.exception("%s update failed; %s counters keep their previous value", self._what, len(charges))

    async def drain(self) -> None:
        """Write what is pending now (shutdown, tests)."""
        while self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)  # it flushes within one interval
        await self.flush()
