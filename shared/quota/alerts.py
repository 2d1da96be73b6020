"""Budget alerts: the owner hears of a budget before it refuses requests.

Thresholds (per cent of a limit; by default 50, 80 and 100) apply to the two budgets that refuse
for the rest of a long window: `tokens_per_day` and `spend_per_month`, of the app as a whole and
of each of its users (`app_limits`, `user_limits`). A threshold is crossed when the counter the
limit itself reads — usage settled so far plus requests still in flight — reaches that share of
the limit, measured as each request settles; 100 % is also crossed when the budget refuses a
request (it cannot pass its limit, so a refusal is the moment it bites).

Exactly one alert per threshold, subject and window, however many requests cross it at once and
on however many instances: the alert is a document whose id names the threshold, the subject and
the window, created create-only in the store (`Store.claim_alert`); the one caller that creates it
sends it. Each instance remembers the alerts it has seen, so a crossed threshold costs the request
path nothing after the first sighting.

Where an alert goes:
- Application Insights, as a `sekisho.budget_alert` event (`ALERT_EVENT_FIELDS`); the Bicep's alert
  rule turns each into a notification of the action group (email, and a Teams or other webhook);
- optionally, a webhook of the gateway's own (SEKISHO_ALERT_WEBHOOK_URL): a JSON POST signed with
  HMAC-SHA256 (SEKISHO_ALERT_WEBHOOK_SECRET) over "<timestamp>.<body>", in the header
  `x-sekisho-signature: t=<unix seconds>,v1=<hex>`, retried with exponential back-off; an alert
  that was never accepted is kept in the store as a dead letter (`delivery.status`), for admins
  to see and act on (`GET /sekisho/admin/alerts?status=dead_letter`).
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Annotated, Any, Awaitable, Callable

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..store import Store, StoreError

logger = logging.getLogger("sekisho.alerts")

ALERTED_METRICS = ("tokens_per_day", "spend_per_month")
DEFAULT_THRESHOLDS: tuple[int, ...] = (50, 80, 100)
SIGNATURE_HEADER = "x-sekisho-signature"
ALERT_ID_HEADER = "x-sekisho-alert-id"
ALERT_DELIVERY_STATES = ("pending", "delivered", "dead_letter", "off")  # off: no webhook configured
KEPT_AFTER_WINDOW_SECONDS = 90 * 86400  # the record of an alert outlives its window, for audit
_REMEMBERED = 50_000  # alerts an instance remembers having seen (bounded: subjects are many)


class BudgetAlertSettings(BaseModel):
    """A policy layer's budget alerts (inherited like every other setting)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool | None = Field(default=None, description="Alert at the thresholds (default on, for every budget that is set).")
    thresholds_percent: list[Annotated[int, Field(ge=1, le=100)]] | None = Field(
        default=None, min_length=1, max_length=10,
        description="Shares of tokens_per_day and spend_per_month, in per cent (1-100), that raise an alert once per window. Default [50, 80, 100].")

    @field_validator("thresholds_percent")
    @classmethod
    def _thresholds(cls, value: list[int] | None) -> list[int] | None:
        if value is None:
            return value
        if any(not 1 <= t <= 100 for t in value):
            raise ValueError("thresholds are per cent of the limit, 1 to 100")
        return sorted(set(value))


def thresholds_of(merged: dict[str, Any] | None) -> tuple[int, ...]:
    """The effective thresholds of a merged policy's `budget_alerts`; () when alerts are off."""
    merged = merged or {}
    if merged.get("enabled") is False:
        return ()
    return tuple(merged.get("thresholds_percent") or DEFAULT_THRESHOLDS)


def crossed(used: int, limit: int, thresholds: tuple[int, ...], refused: bool) -> list[int]:
    """The thresholds at or under `used` of `limit`; 100 as well when the budget refused."""
    return [t for t in thresholds if used * 100 >= t * limit or (refused and t == 100)]


@dataclass(frozen=True)
class Position:
    """Where one budget counter stands, as one request saw it."""

    app_id: str
    user_id: str | None  # None: the app as a whole
    subject: str
    metric: str  # tokens_per_day or spend_per_month
    counter: str  # the counter's name, with its window: spend:2026-11
    used: int  # tokens, or nano-units of the currency
    limit: int
    ttl: int  # the counter's lifetime (its window, and an hour)
    refused: bool = False


def alert_id(position: Position, threshold: int) -> str:
    return f"{position.counter}:{threshold}:{position.subject}"


def alert_document(position: Position, threshold: int, currency: str, webhook: bool) -> dict[str, Any]:
    now = time.time()
    spend = position.metric == "spend_per_month"
    window = position.counter.split(":", 1)[1]
    return {
        "id": alert_id(position, threshold), "app_id": position.app_id, "user_id": position.user_id, "subject": position.subject,
        "scope": "app" if position.user_id is None else "user", "metric": position.metric, "window": window,
        "threshold_percent": threshold,
        "used": position.used / 1e9 if spend else position.used, "limit": position.limit / 1e9 if spend else position.limit,
        "unit": currency if spend else "tokens",
        "position_percent": round(100 * position.used / position.limit, 2) if position.limit else 100.0,
        "reason": "refused" if position.refused and position.used * 100 < threshold * position.limit else "reached",
        "crossed_at": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "sort_key": f"{int(now * 1000):015d}:{alert_id(position, threshold)}",
        "ttl": position.ttl + KEPT_AFTER_WINDOW_SECONDS,
        "delivery": {"status": "pending" if webhook else "off", "attempts": 0},
    }


def signature(secret: bytes, timestamp: int, body: bytes) -> str:
    """The webhook signature header's value: t=<timestamp>,v1=<HMAC-SHA256 of "<timestamp>.<body>">.
    Signing the timestamp with the body lets a receiver refuse old replays."""
    digest = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify(secret: bytes, header: str, body: bytes, tolerance_seconds: int = 300, now: float | None = None) -> bool:
    """What a receiver does with the header (also the reference for docs and tests)."""
    try:
        parts = dict(part.split("=", 1) for part in header.split(","))
        timestamp = int(parts["t"])
    except (ValueError, KeyError):
        return False
    if abs((now if now is not None else time.time()) - timestamp) > tolerance_seconds:
        return False
    return hmac.compare_digest(signature(secret, timestamp, body), f"t={timestamp},v1={parts.get('v1', '')}")


async def listed(store: Store, app_id: str | None, status: str | None, limit: int) -> list[dict[str, Any]]:
    """Alerts newest first, of one app and one delivery state when given (the admin API and CLI)."""
    found = await store.list_alerts(app_id, 1000 if status else limit)
    if status is not None:
        found = [a for a in found if (a.get("delivery") or {}).get("status") == status]
    return [{k: v for k, v in a.items() if k not in ("sort_key", "ttl")} for a in found[:limit]]


class AlertWebhook:
    """POSTs alerts, signed, retrying with exponential back-off until accepted (2xx)."""

    def __init__(self, url: str, secret: str, attempts: int = 8, first_delay: float = 2.0, max_delay: float = 300.0, timeout: float = 10.0) -> None:
        self.url = url
        self._secret = secret.encode()
        self.attempts = attempts
        self.first_delay = first_delay
        self.max_delay = max_delay
        self.timeout = timeout
        self._session = None

    async def deliver(self, doc: dict[str, Any], attempts: int | None = None) -> dict[str, Any]:
        """Send until accepted or out of attempts; returns the delivery state for the document."""
        import aiohttp
        from tenacity import AsyncRetrying, RetryError, stop_after_attempt, wait_exponential

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout), cookie_jar=aiohttp.DummyCookieJar())
        payload = {k: v for k, v in doc.items() if k not in ("sort_key", "ttl", "delivery", "etag")}
        body = orjson.dumps({"type": "sekisho.budget_alert", "alert": payload})
        state = {"attempts": 0, "last_error": None}

        async def attempt() -> None:
            state["attempts"] += 1
            headers = {"content-type": "application/json", ALERT_ID_HEADER: doc["id"],
                       SIGNATURE_HEADER: signature(self._secret, int(time.time()), body)}  # signed per attempt: a fresh timestamp
            try:
                async with self._session.post(self.url, data=body, headers=headers, allow_redirects=False) as response:
                    if not 200 <= response.status < 300:
                        raise RuntimeError(f"the receiver answered {response.status}")
            except (aiohttp.ClientError, asyncio.TimeoutError, RuntimeError) as exc:
                state["last_error"] = str(exc) or type(exc).__name__
                raise

        try:
            async for trying in AsyncRetrying(stop=stop_after_attempt(attempts or self.attempts), reraise=False,
                                              wait=wait_exponential(multiplier=self.first_delay, max=self.max_delay)):
                with trying:
                    await attempt()
        except RetryError:
            return {"status": "dead_letter", "attempts": state["attempts"], "last_error": state["last_error"]}
        return {"status": "delivered", "attempts": state["attempts"], "delivered_at": _now_iso()}

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class BudgetAlerts:
    """Sees budget positions, claims each crossed threshold once, and sends what it claimed.

    `observe` runs on the request path and does no I/O: it looks a crossing up in memory and, for
    one it has not seen, starts a claim in the background."""

    def __init__(self, store: Store, currency: str, webhook: AlertWebhook | None = None,
                 emit: Callable[[dict[str, Any]], None] | None = None) -> None:
        self._store = store
        self._currency = currency
        self.webhook = webhook
        self._emit = emit
        self._seen: OrderedDict[str, None] = OrderedDict()  # alert ids claimed here or found claimed
        self._claiming: set[str] = set()
        self._tasks: set[asyncio.Task] = set()
        self.on_claimed: Callable[[dict[str, Any]], Awaitable[None] | None] | None = None  # tests

    def observe(self, position: Position, thresholds: tuple[int, ...]) -> None:
        if not thresholds or position.limit is None:
            return
        fresh = [t for t in crossed(position.used, position.limit, thresholds, position.refused)
                 if (key := alert_id(position, t)) not in self._seen and key not in self._claiming]
        if not fresh:
            return
        self._claiming.update(alert_id(position, t) for t in fresh)
        task = asyncio.get_running_loop().create_task(self._claim(position, fresh))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _claim(self, position: Position, thresholds: list[int]) -> None:
        for threshold in thresholds:
            key = alert_id(position, threshold)
            doc = alert_document(position, threshold, self._currency, self.webhook is not None)
            try:
                won = await self._store.claim_alert(doc)
            except Exception as exc:  # the store failed: the next request that sees the crossing tries again
                logger.warning("budget alert %s not claimed (store): %r", key, exc, exc_info=not isinstance(exc, StoreError))
                self._claiming.discard(key)
                continue
            self._remember(key)
            self._claiming.discard(key)
            if won:
                await self._send(doc)

    def _remember(self, key: str) -> None:
        self._seen[key] = None
        if len(self._seen) > _REMEMBERED:
            self._seen.popitem(last=False)

    async def _send(self, doc: dict[str, Any]) -> None:
        logger.warning("budget alert: %s of %s reached %s%% of %s (%s)", doc["subject"], doc["metric"], doc["threshold_percent"], doc["limit"], doc["window"])
        if self._emit is not None:
            self._emit(doc)
        if self.on_claimed is not None:
            result = self.on_claimed(doc)
            if asyncio.iscoroutine(result):
                await result
        if self.webhook is None:
            return
        try:
            doc["delivery"] = await self.webhook.deliver(doc)
        except asyncio.CancelledError:  # shutdown in the middle of the back-off: recorded, then gone
            doc["delivery"] = {"status": "dead_letter", "attempts": None, "last_error": "the instance stopped before the receiver accepted it"}
            await asyncio.shield(self._record(doc))
            raise
        await self._record(doc)

    async def _record(self, doc: dict[str, Any]) -> None:
        if doc["delivery"]["status"] == "dead_letter":
            logger.error("budget alert %s was not accepted by the webhook (%s attempts): %s",
                         doc["id"], doc["delivery"]["attempts"], doc["delivery"].get("last_error"))
        try:
            await self._store.update_alert(doc)
        except StoreError as exc:
            logger.error("budget alert %s: delivery state not recorded: %s", doc["id"], exc)

    async def redeliver_abandoned(self, older_than_seconds: float = 900, now: float | None = None) -> int:
        """Alerts still `pending` long after their back-off would have ended belong to an instance
        that stopped without recording anything (killed, not shut down): one more attempt each, from
        the reconciling timer, then delivered or a dead letter. Returns how many were tried."""
        if self.webhook is None:
            return 0
        cutoff = datetime.fromtimestamp((now if now is not None else time.time()) - older_than_seconds, timezone.utc)
        tried = 0
        for doc in await self._store.list_alerts(None, 1000):
            delivery = doc.get("delivery") or {}
            crossed = datetime.fromisoformat(str(doc.get("crossed_at", "")).replace("Z", "+00:00")) if doc.get("crossed_at") else None
            if delivery.get("status") != "pending" or crossed is None or crossed > cutoff:
                continue
            outcome = await self.webhook.deliver(doc, attempts=1)
            doc["delivery"] = {**outcome, "redelivered": True, "attempts": (delivery.get("attempts") or 0) + outcome["attempts"]}
            await self._record(doc)
            tried += 1
        return tried

    async def drain(self) -> None:
        """Wait for claims and deliveries under way (shutdown, tests)."""
        while self._tasks:
            tasks = list(self._tasks)
            await asyncio.gather(*tasks, return_exceptions=True)
            self._tasks.difference_update(tasks)

    async def close(self, grace_seconds: float = 5.0) -> None:
        """Let claims and deliveries finish for a moment; a delivery still backing off after that
        is cancelled and recorded as a dead letter (the instance is going away)."""
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=grace_seconds)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self.webhook is not None:
            await self.webhook.close()
