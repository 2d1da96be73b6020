"""Usage roll-ups: per app, user, deployment, model, operation and day, maintained when log records are written.

Admin views and reports read these instead of scanning the request log: a month of a busy
gateway is millions of records, and Cosmos DB has no cheap cross-partition GROUP BY. The log
writer adds each written batch's sums (`rollup_deltas`) in one store call; the same function over
all records recounts them (the tests compare the two). Days follow SEKISHO_QUOTA_TIMEZONE, like
the daily quota windows, so "today" means the same thing everywhere in the gateway.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any, Iterable
from urllib.parse import quote
from zoneinfo import ZoneInfo

from .telemetry import is_final

# Summed counters of a roll-up document (money in nano-units, as in pricing, to stay exact).
ROLLUP_COUNTERS: tuple[str, ...] = (
    "requests", "errors", "throttled", "blocked", "cache_hits", "prompt_tokens", "completion_tokens",
    "cached_tokens", "total_tokens", "cost_nanos", "saved_cost_nanos", "latency_ms_sum",
)
GROUPS = ("app", "user", "deployment", "model", "operation", "day", "cost_centre", "owner")
# Groups by a field of the app's policy: the rows get it first (records/focus.with_chargeback).
CHARGEBACK_GROUPS = ("cost_centre", "owner")
_GROUP_FIELDS = {"app": ("app_id",), "user": ("app_id", "user_id"), "deployment": ("deployment",), "model": ("model",),
                 "operation": ("operation",), "day": ("day",), "cost_centre": ("cost_centre",), "owner": ("owner",)}


def group_label(row: dict, by: str) -> str:
    """A grouped row's name on a chart axis: the group's most specific field (a user, not its app)."""
    return str(row.get(_GROUP_FIELDS[by][-1]))


REPORT_COLUMNS = ("requests", "errors", "throttled", "blocked", "cache_hits", "prompt_tokens", "completion_tokens",
                  "cached_tokens", "total_tokens", "cost", "saved_cost", "avg_latency_ms")


@dataclass
class RollupDelta:
    app_id: str
    day: str  # YYYY-MM-DD in the quota time zone
    user_id: str
    deployment: str
    model: str
    operation: str
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return rollup_id(self.day, self.user_id, self.deployment, self.model, self.operation)


def rollup_id(day: str, user_id: str, deployment: str, model: str, operation: str) -> str:
    # One document per (day, user, deployment, model, operation) inside the app's partition. The
    # parts are percent-encoded: they stay apart ("|"), and Cosmos ids may not hold / \ ? #.
    # (Documents written before the operation was a part have four parts; they group as "-".)
    return "|".join((day, *(quote(part, safe="@._-:") for part in (user_id, deployment, model, operation))))


def _nanos(amount: Any) -> int:
    return round(float(amount or 0) * 1e9)


def record_counts(record: dict[str, Any]) -> dict[str, int]:
    usage = record.get("usage") or {}
    status = record.get("status") or 0
    cache = record.get("cache") or {}
    return {
        "requests": 1,
        "errors": 1 if status >= 400 else 0,
        "throttled": 1 if status == 429 else 0,
        "blocked": 1 if any(d.get("action") == "block" for d in record.get("guard") or ()) else 0,
        "cache_hits": 1 if cache.get("status") == "HIT" else 0,
        "prompt_tokens": int(usage.get("prompt_tokens") or 0),
        "completion_tokens": int(usage.get("completion_tokens") or 0),
        "cached_tokens": int(usage.get("cached_tokens") or 0),
        "total_tokens": int(usage.get("total_tokens") or 0),
        "cost_nanos": _nanos((record.get("cost") or {}).get("amount")),
        "saved_cost_nanos": _nanos(cache.get("saved_cost")),
        "latency_ms_sum": round(record.get("latency_ms") or 0),
    }


def record_day(record: dict[str, Any], zone: ZoneInfo) -> str:
    return _day_of_minute(record["timestamp"][:16], zone)  # "YYYY-MM-DDTHH:MM": the day cannot change within it


@lru_cache(maxsize=4096)
def _day_of_minute(minute: str, zone: ZoneInfo) -> str:
    stamp = datetime.fromisoformat(minute + ":00+00:00")
    return stamp.astimezone(zone).strftime("%Y-%m-%d")


# What one record adds: (app, day, user, deployment, model, operation) and counts in ROLLUP_COUNTERS order.
Contribution = tuple[tuple[str, str, str, str, str, str], tuple[int, ...]]


def contribution(record: dict[str, Any], zone: ZoneInfo) -> Contribution | None:
    """What `record` adds to the roll-ups; None for records they leave out (refused before a
    model route was known, model lists, submitted jobs — their final record counts)."""
    if not is_final(record) or record.get("operation") in (None, "models.list"):
        return None
    app_id = str(record.get("app_id") or "anonymous")
    # str(): the model of a refused request may come from a body field of any type.
    key = (app_id, record_day(record, zone), str(record.get("user_id") or app_id), str(record.get("deployment") or "-"),
           str(record.get("model") or record.get("deployment") or "-"), str(record.get("operation")))
    counts = record_counts(record)
    return key, tuple(counts[name] for name in ROLLUP_COUNTERS)


def sum_contributions(contributions: Iterable[Contribution | None]) -> list[RollupDelta]:
    found: dict[tuple[str, str, str, str, str, str], list[int]] = {}
    for item in contributions:
        if item is None:
            continue
        key, counts = item
        total = found.get(key)
        if total is None:
            found[key] = list(counts)
        else:
            for index, value in enumerate(counts):
                total[index] += value
    return [RollupDelta(*key, counts=dict(zip(ROLLUP_COUNTERS, totals))) for key, totals in found.items()]


def rollup_deltas(records: Iterable[dict[str, Any]], zone: ZoneInfo) -> list[RollupDelta]:
    """The sums that `records` add to the roll-ups, one delta per document."""
    return sum_contributions(contribution(record, zone) for record in records)


def group(rows: Iterable[dict[str, Any]], by: str) -> list[dict[str, Any]]:
    """Sum roll-up documents by app, user, deployment, model, operation or day; biggest cost first (days: in order)."""
    names = _GROUP_FIELDS[by]
    totals: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        key = tuple(row.get(n) or "-" for n in names)
        total = totals.setdefault(key, {**dict(zip(names, key)), **{c: 0 for c in ROLLUP_COUNTERS}})
        for counter in ROLLUP_COUNTERS:
            total[counter] += int(row.get(counter) or 0)
    result = list(totals.values())
    for row in result:
        row["cost"] = row["cost_nanos"] / 1e9
        row["saved_cost"] = row["saved_cost_nanos"] / 1e9
        row["avg_latency_ms"] = round(row["latency_ms_sum"] / row["requests"], 1) if row["requests"] else None
    if by == "day":
        return sorted(result, key=lambda r: r["day"])
    return sorted(result, key=lambda r: (-r["cost_nanos"], -r["requests"], tuple(str(r[n]) for n in names)))


def to_csv(rows: list[dict[str, Any]], by: str) -> str:
    """Chargeback export: one line per group, money in the gateway's currency."""
    import csv
    import io

    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    columns = (*_GROUP_FIELDS[by], *REPORT_COLUMNS)
    writer.writerow(columns)
    for row in rows:
        writer.writerow([f"{row[c]:.9f}".rstrip("0").rstrip(".") if c in ("cost", "saved_cost") else csv_cell(row[c]) for c in columns])
    return out.getvalue()


def csv_cell(value: Any) -> Any:
    """Ids and names come from callers and admins (x-sekisho-user, policies): one that starts like
    a formula stays text in Excel. Exported figures are never negative, so no number is touched."""
    if value is None:
        return ""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value
