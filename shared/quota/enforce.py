"""Quotas and budgets: reserve before the upstream call, settle with the real usage after.

For each request, the charges are: per subject (the app; and its user — the end user it names,
or, when it names none, the app itself as its own user, so that `user_limits` always apply), for
every limit the policy sets — requests per minute (1), tokens per minute and per day (the
estimate: the prompt, from every field the model reads, plus the answer's budget: max_tokens or
the policy default, times `n`/`best_of`), spend per month (the estimated cost,
in nano-units of SEKISHO_CURRENCY). All are reserved atomically in the store (`Store.reserve`);
a request that would cross any limit is refused with 429 before it costs anything. When the
exchange is over, the token and spend charges are settled to the real usage (upstream's usage,
the stream's usage chunk) or released if the call failed; the request charge stays.

Windows are calendar-aligned in SEKISHO_QUOTA_TIMEZONE: a minute, a day, a month.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from .. import sse
from ..context import RequestContext
from ..errors import GatewayError
from ..operations import QUOTA, completion_budget
from ..pipeline import Stage
from ..store import CounterCharge, ReserveOutcome, Store, StoreUnavailable
from ..store.counter_batch import CounterBatcher
from ..token_estimate import count_tokens
from ..usage import Usage, usage_of
from . import tokenizer
from .alerts import ALERTED_METRICS, BudgetAlerts, Position, crossed
from .leases import LeaseBook
from .pricing import PricingTable, batch_cost, cost_nanos, nanos_to_amount, units_cost, usage_cost

logger = logging.getLogger("sekisho.quota")


@dataclass(frozen=True)
class Metric:
    name: str  # the Limits field
    key: str  # counter name prefix
    window: str  # minute, day, month
    kind: str  # requests, tokens, spend
    code: str  # the 429 code


METRICS = (
    Metric("requests_per_minute", "rpm", "minute", "requests", "rate_limit_exceeded"),
    Metric("tokens_per_minute", "tpm", "minute", "tokens", "rate_limit_exceeded"),
    Metric("tokens_per_day", "tpd", "day", "tokens", "insufficient_quota"),
    Metric("spend_per_month", "spend", "month", "spend", "insufficient_quota"),
)
METRICS_BY_NAME = {m.name: m for m in METRICS}


class Windows:
    """Calendar windows in one time zone: their keys, ends, and counter lifetimes."""

    def __init__(self, timezone: str) -> None:
        self.zone = ZoneInfo(timezone)
        self._keys: dict[tuple[str, tuple], tuple[str, float]] = {}  # per minute: formatting costs more than a lookup
        self._minute: tuple[float, float, dict[str, tuple[str, float]]] = (0.0, 0.0, {})  # see around()

    def now(self) -> datetime:
        return datetime.now(self.zone)

    def around(self, now: float) -> dict[str, tuple[str, float]]:
        """Every window holding the instant `now` (epoch seconds): window → (key, end timestamp).
        Worked out once per local minute (every request with limits asks): the cached minute is
        told by its own start and end timestamps, so any zone offset and a DST fold are exact."""
        minute = self._minute
        if not minute[0] <= now < minute[1]:
            at = datetime.fromtimestamp(now, self.zone)
            start = at.replace(second=0, microsecond=0).timestamp()
            minute = self._minute = (start, start + 60, {window: self.current(window, at) for window in ("minute", "day", "month")})
        return minute[2]

    def key(self, window: str, at: datetime) -> str:
        return self.current(window, at)[0]

    def current(self, window: str, at: datetime) -> tuple[str, float]:
        """(key, end timestamp) of the window holding `at`, remembered for the current minute."""
        minute = (at.year, at.month, at.day, at.hour, at.minute, at.fold)
        known = self._keys.get((window, minute))
        if known is None:
            if len(self._keys) > 64:
                self._keys.clear()
            known = self._keys[(window, minute)] = (
                at.strftime({"minute": "%Y-%m-%dT%H:%M", "day": "%Y-%m-%d", "month": "%Y-%m"}[window]),
                self.end(window, at).timestamp(),
            )
        return known

    def end(self, window: str, at: datetime) -> datetime:
        if window == "minute":
            start = at.replace(second=0, microsecond=0)
            return start + timedelta(minutes=1)
        if window == "day":
            # Aware arithmetic in Python is wall-clock: this is the next local midnight, DST or not.
            return at.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)
        first = at.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        return (first + timedelta(days=32)).replace(day=1)

    def seconds_left(self, window: str, at: datetime) -> int:
        return Windows.seconds_until(self.current(window, at)[1], at.timestamp())

    def ttl(self, window: str, at: datetime) -> int:
        return Windows.ttl_until(self.current(window, at)[1], at.timestamp())

    @staticmethod
    def seconds_until(end: float, now: float) -> int:
        # Through timestamps: subtracting two times of one zone ignores a DST change between them.
        return max(1, math.ceil(end - now))

    @staticmethod
    def ttl_until(end: float, now: float) -> int:
        """A counter's lifetime: until its window ends, and an hour more for admins."""
        return Windows.seconds_until(end, now) + 3600


def subjects(app_id: str, user_id: str | None) -> list[tuple[str, str]]:
    """(which limits apply, subject): the app, and its user — the end user, or the app itself
    when it names none (an app-only caller must not escape its per-user limits by naming nobody)."""
    return [("app", f"app:{app_id}"), ("user", f"user:{app_id}:{user_id or app_id}")]


def limits_to_enforce(policy) -> tuple[tuple[str, Metric, int], ...]:
    """The policy's limits as (whose: app or user, metric, limit in counter units), in the order
    they are reserved; kept with the policy (EffectivePolicy.derived), not worked out per request."""
    plan = []
    for scope, limits in (("app", policy.app_limits), ("user", policy.user_limits)):
        for metric in METRICS:
            limit = getattr(limits, metric.name)
            if limit is not None:
                plan.append((scope, metric, round(limit * 1e9) if metric.kind == "spend" else int(limit)))
    return tuple(plan)


def quota_unavailable() -> GatewayError:
    return GatewayError(503, "quota_unavailable", "Quota counters are unavailable; try again shortly.", error_type="server_error")


@dataclass
class Reservation:
    """What a request holds against its limits until it is settled."""

    charges: list[CounterCharge]
    metrics: list[Metric]
    degraded: bool
    # For budget alerts: each counter's value after the reservation, whose app and user, and the
    # policy's thresholds (settlement tells where the budgets stand).
    used: list[int] = field(default_factory=list)
    app_id: str | None = None
    user_id: str | None = None
    alert_thresholds: tuple[int, ...] = ()

    def to_document(self) -> dict:
        """For an async job document: the job settles the reservation when it ends."""
        return {"charges": [c._asdict() for c in self.charges], "metrics": [m.name for m in self.metrics], "degraded": self.degraded,
                "used": self.used, "app_id": self.app_id, "user_id": self.user_id, "alert_thresholds": list(self.alert_thresholds)}

    @classmethod
    def from_document(cls, doc: dict) -> "Reservation":
        return cls([CounterCharge(**c) for c in doc["charges"]], [METRICS_BY_NAME[name] for name in doc["metrics"]], doc["degraded"],
                   list(doc.get("used") or []), doc.get("app_id"), doc.get("user_id"), tuple(doc.get("alert_thresholds") or ()))


@dataclass
class Accounting:
    """The quota stage's part of a request: what it estimated, refused and cost."""

    estimate: dict | None = None  # prompt_tokens and completion_tokens reserved
    degraded: bool = False  # counted in memory: the store was down (fail-open policy)
    refused: dict | None = None  # the limit that refused the request
    cost: dict | None = None  # amount, currency, price used

    def to_document(self) -> dict:
        return asdict(self)

    @classmethod
    def from_document(cls, doc: dict | None) -> "Accounting":
        return cls(**(doc or {}))

    def record(self) -> dict:
        fields = {"quota_estimate": self.estimate, "cost": self.cost}
        if self.degraded:
            fields["quota_degraded"] = True
        if self.refused:
            fields["quota_refused"] = self.refused
        return {name: value for name, value in fields.items() if value is not None}


class MemoryCounters:
    """Fail-open counters, per instance, while the store is down (policy quota_on_store_failure=open)."""

    def __init__(self) -> None:
        self._values: dict[tuple[str, str], int] = {}

    def reserve(self, charges: list[CounterCharge]):
        from ..store import ReserveOutcome

        current = [self._values.get((c.subject, c.counter), 0) for c in charges]
        for index, (charge, used) in enumerate(zip(charges, current)):
            if charge.limit is not None and used + charge.amount > charge.limit:
                return ReserveOutcome(False, current, index)
        for charge in charges:
            key = (charge.subject, charge.counter)
            self._values[key] = self._values.get(key, 0) + charge.amount
        if len(self._values) > 100_000:
            self._values.clear()
        return ReserveOutcome(True, [u + c.amount for u, c in zip(current, charges)])

    def adjust(self, charges: list[CounterCharge]) -> None:
        for charge in charges:
            key = (charge.subject, charge.counter)
            self._values[key] = self._values.get(key, 0) + charge.amount


class EnforceQuota(Stage):
    name = QUOTA

    def __init__(self, store: Store, pricing: PricingTable, windows: Windows, currency: str, lease_share: float = 0.0) -> None:
        self._store = store
        self._pricing = pricing
        self._windows = windows
        self._currency = currency
        self._memory = MemoryCounters()
        self._settlements = CounterBatcher(store, what="quota settlement")
        self.leases = LeaseBook(lease_share)
        self._sweeper: asyncio.TimerHandle | None = None
        self.alerts: BudgetAlerts | None = None  # set by the gateway

    async def before(self, ctx: RequestContext) -> None:
        policy = ctx.policy
        plan = policy.derived("quota_limits", limits_to_enforce)
        if not plan:
            return  # no limit applies: nothing to reserve (the cost is still computed at the end)
        cached = ctx.result is not None  # a cache hit: it counts as a request, costs no tokens
        operation = ctx.route.operation
        if operation.batch_lines:
            prompt, completion, cost = await self._batch_estimate(ctx.batch_input)
        else:
            _, price = await self._pricing.price_for(ctx.deployment)
            prompt = 0 if cached else operation.prompt_estimate(ctx.body, operation.reads)
            completion = 0 if cached else completion_budget(operation, ctx.body, policy.default_completion_tokens)
            cost = cost_nanos(price, prompt, completion)
            if operation.units is not None and not cached:
                # Priced by units where the answer will report no tokens: reserve whichever is more.
                cost = max(cost, units_cost(price, operation.units(ctx.body, None)))
        tokens = prompt + completion
        amounts = {"requests": 1, "tokens": tokens, "spend": cost}
        accounting = ctx.accounting = Accounting(estimate={"prompt_tokens": prompt, "completion_tokens": completion})
        subject_of = dict(subjects(ctx.app_id, ctx.user_id))  # which limits → whose counters
        now = time.time()
        windows = self._windows.around(now)  # window → (key, end)
        charges, metrics, ends = [], [], []
        for scope, metric, limit_units in plan:
            if cached and metric.kind != "requests":
                continue
            if operation.batch_lines and metric.name == "tokens_per_minute":
                # A batch runs within a day on Azure's batch capacity, not in this minute:
                # its tokens count against the day and its cost against the month.
                continue
            key, end = windows[metric.window]
            charges.append(CounterCharge(subject_of[scope], f"{metric.key}:{key}", amounts[metric.kind], limit_units, Windows.ttl_until(end, now)))
            metrics.append(metric)
            ends.append(end)
        if not charges:
            return
        degraded = False
        try:
            outcome = await self._reserve(charges, ends)
        except StoreUnavailable as exc:
            if policy.quota_on_store_failure == "closed":
                logger.error("quota store unavailable, refusing (fail-closed): %s", exc)
                raise quota_unavailable() from None
            logger.warning("quota store unavailable, counting in memory (fail-open): %s", exc)
            degraded = True
            outcome = self._memory.reserve(charges)
        accounting.degraded = degraded
        if not outcome.admitted:
            failed = outcome.failed
            if not degraded and metrics[failed].name in ALERTED_METRICS:  # the budget bites: its 100 % alert
                self._observe(ctx.app_id, ctx.user_id, charges[failed], metrics[failed], outcome.used[failed], policy.alert_thresholds, refused=True)
            self._refuse(ctx, charges[failed], metrics[failed], outcome.used[failed], Windows.seconds_until(ends[failed], now))
        ctx.quota = Reservation(charges, metrics, degraded, list(outcome.used), ctx.app_id, ctx.user_id, policy.alert_thresholds)
        self._remaining_headers(ctx, charges, metrics, outcome.used)

    async def _batch_estimate(self, summary: dict | None) -> tuple[int, int, int]:
        """What a batch's lines may cost at the batch price: their prompts and answer budgets,
        as counted when the input file was uploaded, per deployment."""
        prompt = completion = cost = 0
        for deployment, part in ((summary or {}).get("deployments") or {}).items():
            _, price = await self._pricing.price_for(deployment)
            prompt += part["prompt_tokens"]
            completion += part["completion_tokens"]
            cost += batch_cost(price, cost_nanos(price, part["prompt_tokens"], part["completion_tokens"]))
        return prompt, completion, cost

    async def _reserve(self, charges: list[CounterCharge], ends: list[float]) -> ReserveOutcome:
        """Reserve every charge: from this instance's leases where they cover it, in the store
        (atomically, topping leases up while the counter is far from its limit) for the rest."""
        leases, now = self.leases, time.time()
        covered = leases.take(charges, now)
        if all(covered):
            return ReserveOutcome(True, [leases.used(c) for c in charges])
        rest = [i for i, done in enumerate(covered) if not done]
        top_ups = top_ups_asked = [leases.top_up(charges[i]) for i in rest]
        try:
            outcome = await self._store.reserve([charges[i]._replace(amount=charges[i].amount + t) for i, t in zip(rest, top_ups)])
            if not outcome.admitted and any(top_ups):  # the counter moved on since we last saw it
                top_ups = [0] * len(rest)
                outcome = await self._store.reserve([charges[i] for i in rest])
        except BaseException:
            leases.give_back(charges, covered)
            raise
        finally:
            for i, leased in zip(rest, top_ups_asked):
                if leased:
                    leases.top_up_done(charges[i])
        if not outcome.admitted:
            leases.give_back(charges, covered)
            used = [0] * len(charges)
            for i, value in zip(rest, outcome.used):
                used[i] = value
                leases.learn(charges[i], value, ends[i], now)
            return ReserveOutcome(False, used, rest[outcome.failed])
        stale = []
        for i, value, leased in zip(rest, outcome.used, top_ups):
            if unspent := leases.record(charges[i], value, leased, ends[i], now):
                stale.append(charges[i]._replace(amount=-unspent, limit=None))
        if stale:
            self._settlements.add(stale)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(leases.idle_seconds, self._sweep)
        return ReserveOutcome(True, [leases.used(c) for c in charges])

    def _sweep(self) -> None:
        """Hand idle leases back to the store (batched with settlements) and forget old
        counters, every second while the book holds any."""
        self._sweeper = None
        returned = self.leases.sweep(time.time())
        if returned:
            self._settlements.add(returned)
        if self.leases:
            self._sweeper = asyncio.get_running_loop().call_later(self.leases.idle_seconds, self._sweep)

    def _refuse(self, ctx: RequestContext, charge: CounterCharge, metric: Metric, used: int, retry_after: int) -> None:
        who = "application" if charge.subject.startswith("app:") else "user"
        if metric.kind == "spend":
            detail = f"the {who}'s monthly budget of {nanos_to_amount(charge.limit):.2f} {self._currency} would be exceeded"
        elif metric.kind == "requests":
            detail = f"the {who}'s limit of {charge.limit} requests per minute is reached"
        else:
            per = "minute" if metric.window == "minute" else "day"
            detail = f"the {who}'s limit of {charge.limit} tokens per {per} would be exceeded ({used} used, this request needs up to {charge.amount})"
        ctx.accounting.refused = {"metric": metric.name, "subject": charge.subject}
        raise GatewayError(
            429, metric.code, f"Quota: {detail}. Retry after {retry_after} seconds.",
            error_type="rate_limit_error" if metric.code == "rate_limit_exceeded" else "insufficient_quota",
            headers={"Retry-After": str(retry_after), "retry-after-ms": str(retry_after * 1000),
                     "x-ratelimit-remaining-requests" if metric.kind == "requests" else "x-ratelimit-remaining-tokens": "0"},
        )

    def _remaining_headers(self, ctx, charges, metrics, used) -> None:
        remaining = {"requests": None, "tokens": None}
        for charge, metric, value in zip(charges, metrics, used):
            if metric.kind in remaining:
                left = max(0, charge.limit - value)
                current = remaining[metric.kind]
                remaining[metric.kind] = left if current is None else min(current, left)
        if remaining["requests"] is not None:
            ctx.response_headers["x-ratelimit-remaining-requests"] = str(remaining["requests"])
        if remaining["tokens"] is not None:
            ctx.response_headers["x-ratelimit-remaining-tokens"] = str(remaining["tokens"])

    def record(self, ctx: RequestContext) -> dict:
        return ctx.accounting.record() if ctx.accounting is not None else {}

    async def finish(self, ctx: RequestContext) -> None:
        """Usage and cost for the log and the header; settlement of the reservation, off the hot path."""
        if ctx.body is None:
            return
        if self._work_goes_on(ctx):
            # A batch or a background response: nothing is used yet. The reservation stays with
            # the object's record (ownership) and is settled when the work ends (jobs/deferred.py).
            ctx.accounting = ctx.accounting or Accounting()
            ctx.accounting.cost = {"amount": 0.0, "currency": self._currency, "price": None, "pending": True}
            return
        cost = await self.price(ctx)
        reservation: Reservation | None = getattr(ctx, "quota", None)
        if reservation is not None:
            self.settle(reservation, ctx.usage.total_tokens, cost)  # 0 tokens when nothing reached the model, or it refused: released

    @staticmethod
    def _work_goes_on(ctx: RequestContext) -> bool:
        if ctx.error is not None or ctx.result is None or ctx.result.status >= 400 or ctx.stream_summary is not None:
            return False
        return ctx.route.operation.still_running(ctx.result.json)

    async def price(self, ctx: RequestContext) -> int:
        """The request's usage (`ctx.usage`) and cost in nano-units (`ctx.accounting.cost`, the
        cost header); a batch line at the batch price."""
        usage = usage_of(ctx)
        accounting = ctx.accounting = ctx.accounting or Accounting()
        model = (ctx.stream_summary.model if ctx.stream_summary else None) or _response_model(ctx) or ctx.deployment
        if not usage.reported:
            # The upstream reported no usage (a stream cut short or on an old api-version, an
            # upstream that never sends it): counted with the model's tokenizer. The log, the
            # settlement and the cost header all use these figures, marked estimated.
            written = written_text(ctx)
            if written is not None:  # an answer came back (else a refusal or an error: released)
                usage = await asyncio.to_thread(counted_usage, ctx, written, model)  # the first count loads the BPE ranks
        ctx.usage = usage
        succeeded = ctx.status is not None and ctx.status < 400 and ctx.error is None
        # Priced by the deployment's model; a model name in the answer wins (a deployment may be renamed).
        price_name, price = await self._pricing.price_for(model)
        cost = usage_cost(price, usage) if usage.total_tokens or usage.units else 0
        if ctx.settles is not None and ctx.settles.get("kind") == "batch":
            cost = batch_cost(price, cost)
        accounting.cost = {"amount": nanos_to_amount(cost), "currency": self._currency, "price": price_name}
        if (succeeded or cost) and ctx.status != 202:  # 202: an async job, priced when it ends
            ctx.response_headers["x-sekisho-cost"] = f"{nanos_to_amount(cost):.9f}".rstrip("0").rstrip(".") or "0"
        return cost

    def settle(self, reservation: Reservation, tokens: int, cost: int) -> None:
        """Bring a reservation's token and spend charges to what was used (the request charge stays)."""
        deltas = []
        watch = self.alerts is not None and reservation.alert_thresholds and not reservation.degraded and reservation.app_id is not None
        for index, (charge, metric) in enumerate(zip(reservation.charges, reservation.metrics)):
            if metric.kind == "tokens":
                delta = tokens - charge.amount
            elif metric.kind == "spend":
                delta = cost - charge.amount
            else:
                continue
            if watch and metric.name in ALERTED_METRICS and index < len(reservation.used):
                self._observe(reservation.app_id, reservation.user_id, charge, metric, reservation.used[index] + delta, reservation.alert_thresholds)
            if delta:
                deltas.append(CounterCharge(charge.subject, charge.counter, delta, None, charge.ttl))
        if deltas:
            if reservation.degraded:
                self._memory.adjust(deltas)
            else:
                self._settlements.add(deltas)  # written with others within 50 ms

    def _observe(self, app_id: str, user_id: str | None, charge: CounterCharge, metric: Metric, used: int,
                 thresholds: tuple[int, ...], refused: bool = False) -> None:
        if self.alerts is None or not thresholds or not charge.limit and not refused:
            return
        reached = crossed(used, charge.limit, thresholds, refused) if charge.limit is not None else []
        if not reached:
            return  # the common case: under every threshold (alerts need a limit), so nothing to build
        app_scope = charge.subject.startswith("app:")
        self.alerts.observe(Position(app_id, None if app_scope else (user_id or app_id), charge.subject, metric.name, charge.counter,
                                     used, charge.limit, charge.ttl, refused), tuple(reached))

    async def drain(self) -> None:
        """Hand every lease back and write pending settlements (shutdown, tests)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        returned = self.leases.release_all(time.time())
        if returned:
            self._settlements.add(returned)
        await self._settlements.drain()


def written_text(ctx: RequestContext) -> str | None:
    """What the model wrote in an answer that reached the client: a stream that relayed something,
    or a whole answer. None when nothing of an answer came back."""
    summary = ctx.stream_summary
    if summary is not None:
        return sse.streamed_text(summary) if summary.chunks else None
    result = ctx.result
    answer = ctx.model_response if ctx.model_response is not None else (result.json if result is not None else None)
    if result is None or result.status != 200 or not isinstance(answer, dict):
        return None
    return "\n".join(ctx.route.operation.writes.texts(answer))


def counted_usage(ctx: RequestContext, written: str, model: str | None) -> Usage:
    """Prompt and answer tokens counted by the gateway, for an answer that carried no usage."""
    operation = ctx.route.operation
    read = "\n".join(operation.reads.texts(ctx.body or {}))
    try:
        if operation.message_framing:
            prompt = tokenizer.count_chat_prompt((ctx.body or {}).get("messages"), read, model)
        elif read:
            prompt = tokenizer.count(read, model)
        else:  # token-id inputs: their length is their count
            prompt = operation.prompt_estimate(ctx.body, operation.reads) if operation.prompt_estimate else 0
        completion = tokenizer.count(written, model)
    except Exception:  # the tokenizer could not load: the rough estimate, rather than nothing
        logger.exception("tokenizer unavailable; counting %s with the rough estimate", ctx.request_id)
        prompt = operation.prompt_estimate(ctx.body, operation.reads) if operation.prompt_estimate else 0
        completion = count_tokens(written)
    return Usage(prompt, completion, prompt + completion, 0, reported=False, estimated=True)


def _response_model(ctx: RequestContext) -> str | None:
    if ctx.result is not None and isinstance(ctx.result.json, dict):
        return ctx.result.json.get("model")
    return None
