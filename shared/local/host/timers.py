"""Timer-triggered functions, run by the local host as the Functions host runs them.

Each function with a `timerTrigger` binding in the worker's function metadata (its NCRONTAB
schedule: six fields, seconds first, in UTC) is invoked through the worker at every time the
schedule names, with the timer's binding data as the host sends it (JSON: `Schedule`,
`ScheduleStatus`, `IsPastDue`); one run at a time per function (the host's singleton lock does
that in Azure).
`run_now` is what the host's admin API does for `POST /admin/functions/{name}` (Azure: with the
master key; locally: from loopback only), so that tests and operators need not wait. With
several local workers each runs the timers; what they run must be safe to run twice (the
reconciling timer is: a settlement closes its record conditionally first).
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Awaitable, Callable

from .language_worker import FunctionEntry

logger = logging.getLogger("sekisho.localhost.timers")

_FIELDS = (("second", 0, 59), ("minute", 0, 59), ("hour", 0, 23), ("day", 1, 31), ("month", 1, 12), ("weekday", 0, 6))


def parse_schedule(expression: str) -> list[frozenset[int]]:
    """An NCRONTAB expression (`sec min hour day month weekday`): `*`, numbers, ranges `a-b`,
    steps `*/n` and `a-b/n`, lists `a,b`. Weekday 0 is Sunday."""
    parts = expression.split()
    if len(parts) != 6:
        raise ValueError(f"a timer schedule has six fields (seconds first), not {len(parts)}: {expression!r}")
    allowed = []
    for text, (name, low, high) in zip(parts, _FIELDS):
        values: set[int] = set()
        for item in text.split(","):
            base, _, step_text = item.partition("/")
            step = int(step_text) if step_text else 1
            if base == "*":
                first, last = low, high
            elif "-" in base:
                first, last = (int(v) for v in base.split("-", 1))
            else:
                first = last = int(base)
                if step_text:
                    last = high
            if not (low <= first <= last <= high) or step < 1:
                raise ValueError(f"the {name} field of {expression!r} is out of range")
            values.update(range(first, last + 1, step))
        allowed.append(frozenset(values))
    return allowed


def next_time(schedule: list[frozenset[int]], after: datetime) -> datetime:
    """The first time after `after` (UTC, whole seconds) that the schedule names."""
    seconds, minutes, hours, days, months, weekdays = schedule
    moment = after.replace(microsecond=0) + timedelta(seconds=1)
    for _ in range(366 * 24 * 60):  # minute by minute for at most a year
        if (moment.month in months and moment.day in days and (moment.weekday() + 1) % 7 in weekdays
                and moment.hour in hours and moment.minute in minutes):
            later = [s for s in sorted(seconds) if s >= moment.second]
            if later:
                return moment.replace(second=later[0])
        moment = moment.replace(second=0) + timedelta(minutes=1)
    raise ValueError("the schedule names no time within a year")


@dataclass
class TimerFunction:
    name: str
    argument: str
    schedule: list[frozenset[int]]
    run_on_startup: bool
    entry: FunctionEntry
    last: datetime | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class LocalTimers:
    """`invoke(entry, inputs)`: how a function is run (the worker's `invoke`)."""

    def __init__(self, entries: list[FunctionEntry], invoke: Callable[..., Awaitable[Any]]) -> None:
        self.functions: dict[str, TimerFunction] = {}
        self._invoke = invoke
        for entry in entries:
            trigger = entry.trigger
            if trigger.get("type") == "timerTrigger":
                self.functions[entry.name] = TimerFunction(entry.name, trigger["name"], parse_schedule(trigger["schedule"]),
                                                           bool(trigger.get("runOnStartup", False)), entry)
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._loop(timer), name=f"timer-{timer.name}") for timer in self.functions.values()]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def run_now(self, name: str) -> bool:
        """Run a timer function once, now (the admin API's manual run); False if there is none."""
        timer = self.functions.get(name)
        if timer is None:
            return False
        await self._run(timer, past_due=False)
        return True

    async def _loop(self, timer: TimerFunction) -> None:
        if timer.run_on_startup:
            await self._run(timer, past_due=False)
        while True:
            now = datetime.now(timezone.utc)
            due = next_time(timer.schedule, now)
            await asyncio.sleep((due - now).total_seconds())
            await self._run(timer, past_due=(datetime.now(timezone.utc) - due).total_seconds() > 5)

    async def _run(self, timer: TimerFunction, past_due: bool) -> None:
        async with timer.lock:
            now = datetime.now(timezone.utc)
            binding = {
                "Schedule": {"AdjustForDST": True},
                "ScheduleStatus": {"Last": (timer.last or now).isoformat(), "Next": next_time(timer.schedule, now).isoformat(),
                                   "LastUpdated": now.isoformat()},
                "IsPastDue": past_due,
            }
            timer.last = now
            try:
                await self._invoke(timer.entry, {timer.argument: binding})
            except Exception:
                logger.exception("timer function %s failed", timer.name)
