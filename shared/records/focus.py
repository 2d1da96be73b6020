"""Cost exports in the FinOps FOCUS format (version 1.2), and chargeback by owner and cost centre.

One row per app, deployment, model and day (a day of SEKISHO_QUOTA_TIMEZONE, given in UTC as
FOCUS asks), from the usage roll-ups, which the request log's records add up to exactly (the
tests recount them): the export's costs sum to the log's to the nano-unit. Every column FOCUS 1.2
makes mandatory is there, with the conditional ones that apply to token-priced usage
(ConsumedQuantity and ConsumedUnit, the deployment as the resource, the app as the sub account,
tags), and the gateway's own figures as `x_` columns, as the specification allows.

- The cost columns (BilledCost, EffectiveCost, ListCost, ContractedCost) are the gateway's
  priced cost: what the pricing table says the tokens cost (batch discounts applied). Azure
  bills the Azure OpenAI resource itself; this export is the internal allocation of that bill.
- PricingQuantity is in millions of tokens (PricingUnit "1M Tokens"), ConsumedQuantity in tokens.
  Audio minutes and images are priced in the cost but counted here by their tokens only.
- Tags carry the app's cost centre, owner and contact (policy fields), and the model.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, Iterable
from zoneinfo import ZoneInfo

from .rollups import csv_cell

FOCUS_VERSION = "1.2"
# The columns FOCUS 1.2 makes mandatory (Feature level: Mandatory), in the specification's order.
MANDATORY = (
    "BilledCost", "BillingAccountId", "BillingAccountName", "BillingCurrency", "BillingPeriodEnd", "BillingPeriodStart",
    "ChargeCategory", "ChargeClass", "ChargeDescription", "ChargePeriodEnd", "ChargePeriodStart", "ContractedCost",
    "EffectiveCost", "InvoiceIssuerName", "ListCost", "PricingQuantity", "PricingUnit", "ProviderName", "PublisherName",
    "ServiceCategory", "ServiceName",
)
# Conditional and recommended columns that apply to this usage.
APPLICABLE = (
    "ChargeFrequency", "ConsumedQuantity", "ConsumedUnit", "ResourceId", "ResourceName", "ResourceType", "ServiceSubcategory",
    "SkuId", "SubAccountId", "SubAccountName", "SubAccountType", "Tags",
)
CUSTOM = ("x_Requests", "x_PromptTokens", "x_CompletionTokens", "x_CachedTokens", "x_Errors", "x_CacheHits", "x_CostCentre")
COLUMNS = MANDATORY + APPLICABLE + CUSTOM
_OPENAI_MODELS = ("gpt", "o1", "o3", "o4", "text-embedding", "dall-e", "whisper", "tts", "davinci", "babbage", "codex")


@dataclass(frozen=True)
class AppChargeback:
    """Who an app's cost goes to (policy fields `owner`, `contact`, `cost_centre`)."""

    app_id: str
    name: str | None = None
    owner: str | None = None
    contact: str | None = None
    cost_centre: str | None = None


async def chargeback_of(resolver, app_ids: Iterable[str]) -> dict[str, AppChargeback]:
    """Each app's chargeback fields, from its effective policy (defaults inherited)."""
    found = {}
    for app_id in sorted(set(app_ids)):
        try:
            policy = await resolver.resolve(app_id, None)
        except Exception:  # an app that is gone or refused: its usage still goes out, unallocated
            found[app_id] = AppChargeback(app_id)
            continue
        found[app_id] = AppChargeback(app_id, policy.app_name, policy.owner, policy.contact, policy.cost_centre)
    return found


def with_chargeback(rows: Iterable[dict[str, Any]], apps: dict[str, AppChargeback]) -> list[dict[str, Any]]:
    """Roll-up rows with their app's owner and cost centre, for grouping by them."""
    out = []
    for row in rows:
        app = apps.get(row.get("app_id") or "") or AppChargeback(row.get("app_id") or "-")
        out.append({**row, "owner": app.owner or "-", "cost_centre": app.cost_centre or "-"})
    return out


def _utc(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _money(nanos: int) -> str:
    return format(Decimal(nanos) / Decimal(10**9), "f")


def focus_rows(rollup_rows: Iterable[dict[str, Any]], apps: dict[str, AppChargeback], *, zone: str, currency: str,
               billing_account_id: str, billing_account_name: str = "Sekisho AI gateway") -> list[dict[str, Any]]:
    """FOCUS rows: the roll-ups summed per app, deployment, model and day."""
    totals: dict[tuple[str, str, str, str], dict[str, int]] = {}
    for row in rollup_rows:
        key = (row.get("app_id") or "-", row.get("deployment") or "-", row.get("model") or "-", row["day"])
        total = totals.setdefault(key, dict.fromkeys(("requests", "errors", "cache_hits", "prompt_tokens", "completion_tokens",
                                                       "cached_tokens", "total_tokens", "cost_nanos"), 0))
        for name in total:
            total[name] += int(row.get(name) or 0)
    tz = ZoneInfo(zone)
    rows = []
    for (app_id, deployment, model, day), total in sorted(totals.items(), key=lambda item: (item[0][3], item[0][0], item[0][1], item[0][2])):
        start = datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=tz)
        month = start.replace(day=1)
        next_month = (month + timedelta(days=32)).replace(day=1)
        app = apps.get(app_id) or AppChargeback(app_id)
        cost = _money(total["cost_nanos"])
        tags = {k: v for k, v in (("cost_centre", app.cost_centre), ("owner", app.owner), ("contact", app.contact),
                                  ("model", model), ("gateway", "sekisho")) if v}
        rows.append({
            "BilledCost": cost, "BillingAccountId": billing_account_id, "BillingAccountName": billing_account_name,
            "BillingCurrency": currency, "BillingPeriodEnd": _utc(next_month), "BillingPeriodStart": _utc(month),
            "ChargeCategory": "Usage", "ChargeClass": "",
            "ChargeDescription": f"{model} through deployment {deployment} for {app.name or app_id}: "
                                 f"{total['requests']} requests, {total['total_tokens']} tokens",
            "ChargePeriodEnd": _utc(start + timedelta(days=1)), "ChargePeriodStart": _utc(start),
            "ContractedCost": cost, "EffectiveCost": cost, "InvoiceIssuerName": "Microsoft", "ListCost": cost,
            "PricingQuantity": format(Decimal(total["total_tokens"]) / Decimal(10**6), "f"), "PricingUnit": "1M Tokens",
            "ProviderName": "Microsoft",
            "PublisherName": "OpenAI" if model.lower().startswith(_OPENAI_MODELS) else "Microsoft",
            "ServiceCategory": "AI and Machine Learning", "ServiceName": "Azure OpenAI",
            "ChargeFrequency": "Usage-Based", "ConsumedQuantity": str(total["total_tokens"]), "ConsumedUnit": "Tokens",
            "ResourceId": f"deployments/{deployment}", "ResourceName": deployment, "ResourceType": "Azure OpenAI Deployment",
            "ServiceSubcategory": "Generative AI", "SkuId": model,
            "SubAccountId": app_id, "SubAccountName": app.name or app_id, "SubAccountType": "Application",
            "Tags": json.dumps(tags, ensure_ascii=False, sort_keys=True),
            "x_Requests": total["requests"], "x_PromptTokens": total["prompt_tokens"], "x_CompletionTokens": total["completion_tokens"],
            "x_CachedTokens": total["cached_tokens"], "x_Errors": total["errors"], "x_CacheHits": total["cache_hits"],
            "x_CostCentre": app.cost_centre or "",
        })
    return rows


def to_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: csv_cell(v) for k, v in row.items()})
    return out.getvalue()
