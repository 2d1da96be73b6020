"""FinOps: owners and cost centres on apps, reports grouped by them, and the FOCUS 1.2 cost export
(admin API and CLI) reconciling exactly with the request log; on both stores."""
from __future__ import annotations

import asyncio
import csv
import io
import json
import uuid
from decimal import Decimal

import aiohttp
from openai import AsyncAzureOpenAI

from shared.records.focus import COLUMNS, MANDATORY

from .servers import put_app

ADMIN = "/sekisho/admin"
# FOCUS 1.2: mandatory columns that allow no nulls.
NOT_NULL = set(MANDATORY) - {"BillingAccountName", "ChargeClass", "ChargeDescription", "PricingQuantity", "PricingUnit"}


async def _get(session, url: str) -> tuple[int, str]:
    async with session.get(url) as answer:
        return answer.status, await answer.text()


async def _spend(gw, issuer, app_id: str, count: int) -> None:
    client = AsyncAzureOpenAI(azure_endpoint=gw.url, azure_ad_token=issuer.mint(app_id), api_version="2024-10-21", max_retries=0)
    for number in range(count):
        await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": f"question {number}"}])
    await client.embeddings.create(model="text-embedding-3-small", input="embed me")


async def _logged_cost(session, gw, app_id: str, expected: int) -> Decimal:
    for _ in range(100):
        status, body = await _get(session, f"{gw.url}{ADMIN}/logs?app_id={app_id}&limit=1000")
        records = json.loads(body)["data"]
        if len(records) >= expected:
            return sum((Decimal(str((r.get("cost") or {}).get("amount") or 0)) for r in records), Decimal(0))
        await asyncio.sleep(0.1)
    raise AssertionError(f"{app_id}: fewer than {expected} records")


async def test_focus_export_has_the_columns_and_reconciles_with_the_log(logged_gateway, admin_token, issuer):
    tag = uuid.uuid4().hex[:8]
    finance = await put_app(logged_gateway.url, admin_token, {"allowed_deployments": ["*"], "cost_centre": f"CC-FIN-{tag}",
                                                             "owner": "Hanako Sato", "contact": "finance-ai@example.com"}, name="Finance bot")
    support = await put_app(logged_gateway.url, admin_token, {"allowed_deployments": ["*"], "cost_centre": f"CC-SUP-{tag}", "owner": "Taro"},
                            name="Support bot")
    await _spend(logged_gateway, issuer, finance, 3)
    await _spend(logged_gateway, issuer, support, 2)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin_token}"}) as session:
        logged = {app: await _logged_cost(session, logged_gateway, app, n + 1) for app, n in ((finance, 3), (support, 2))}
        for _ in range(100):  # roll-ups follow the log writer's batches
            rows = []
            for app in (finance, support):
                status, text = await _get(session, f"{logged_gateway.url}{ADMIN}/reports/focus?app_id={app}")
                assert status == 200, text
                rows += list(csv.DictReader(io.StringIO(text)))
            if sum(int(r["x_Requests"]) for r in rows) == 7:
                break
            await asyncio.sleep(0.1)
        header = text.splitlines()[0].split(",")
    assert header == list(COLUMNS) and set(MANDATORY) <= set(header)
    for row in rows:
        assert all(row[column] for column in NOT_NULL), row
        assert row["ChargeCategory"] == "Usage" and row["ChargeClass"] == "" and row["ServiceCategory"] == "AI and Machine Learning"
        assert row["ChargePeriodStart"].endswith("T00:00:00Z") or row["ChargePeriodStart"].endswith(":00:00Z")
        assert row["BilledCost"] == row["EffectiveCost"] == row["ListCost"] == row["ContractedCost"]
        assert Decimal(row["PricingQuantity"]) * 1_000_000 == Decimal(row["ConsumedQuantity"])
    # One row per app, deployment, model and day.
    keys = [(r["SubAccountId"], r["ResourceName"], r["SkuId"], r["ChargePeriodStart"]) for r in rows]
    assert len(keys) == len(set(keys)) and {r["ResourceName"] for r in rows} == {"gpt-4o-mini", "text-embedding-3-small"}
    # The cost reconciles with the request log exactly (the nano-unit; so to the cent).
    for app in (finance, support):
        exported = sum((Decimal(r["BilledCost"]) for r in rows if r["SubAccountId"] == app), Decimal(0))
        assert exported == logged[app] > 0
    tags = json.loads(next(r for r in rows if r["SubAccountId"] == finance)["Tags"])
    assert tags["cost_centre"] == f"CC-FIN-{tag}" and tags["owner"] == "Hanako Sato" and tags["contact"] == "finance-ai@example.com"
    assert next(r for r in rows if r["SubAccountId"] == finance)["SubAccountName"] == "Finance bot"


async def test_reports_group_by_cost_centre_and_owner(logged_gateway, admin_token, issuer):
    tag = uuid.uuid4().hex[:8]
    first = await put_app(logged_gateway.url, admin_token, {"allowed_deployments": ["*"], "cost_centre": f"CC-{tag}", "owner": f"o-{tag}"})
    second = await put_app(logged_gateway.url, admin_token, {"allowed_deployments": ["*"], "cost_centre": f"CC-{tag}", "owner": f"p-{tag}"})
    await _spend(logged_gateway, issuer, first, 1)
    await _spend(logged_gateway, issuer, second, 1)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin_token}"}) as session:
        for _ in range(100):
            status, body = await _get(session, f"{logged_gateway.url}{ADMIN}/reports/usage?by=cost_centre")
            centre = next((r for r in json.loads(body)["data"] if r["cost_centre"] == f"CC-{tag}"), None)
            if centre and centre["requests"] == 4:
                break
            await asyncio.sleep(0.1)
        assert centre["requests"] == 4 and centre["cost"] > 0  # both apps under one cost centre
        status, body = await _get(session, f"{logged_gateway.url}{ADMIN}/reports/usage?by=owner")
        owners = {r["owner"]: r for r in json.loads(body)["data"]}
        assert owners[f"o-{tag}"]["requests"] == 2 and owners[f"p-{tag}"]["requests"] == 2
        status, body = await _get(session, f"{logged_gateway.url}{ADMIN}/reports/usage?by=cost_centre&format=csv")
        assert status == 200 and body.splitlines()[0].startswith("cost_centre,requests")


async def test_a_cost_centre_is_validated(logged_gateway, admin_token):
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin_token}"}) as session:
        async with session.put(f"{logged_gateway.url}{ADMIN}/policies/apps/{uuid.uuid4()}",
                               json={"settings": {"cost_centre": "=HYPERLINK(\"x\")"}}) as answer:
            assert answer.status == 400 and "cost_centre" in (await answer.json())["error"]["message"]


async def test_the_cli_writes_the_same_focus_export(gateway, sqlite_path, data_dir, admin_token, issuer):
    from .test_cli import cli

    app_id = await put_app(gateway.url, admin_token, {"allowed_deployments": ["*"], "cost_centre": "CC-CLI"})
    await _spend(gateway, issuer, app_id, 2)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin_token}"}) as session:
        for _ in range(100):
            status, api = await _get(session, f"{gateway.url}{ADMIN}/reports/focus?app_id={app_id}")
            if sum(int(r["x_Requests"]) for r in csv.DictReader(io.StringIO(api))) == 3:
                break
            await asyncio.sleep(0.1)
    done = cli(data_dir, sqlite_path, "report", "--focus", "-", "--app-id", app_id)
    assert done.returncode == 0, done.stderr

    def rows(text):  # the CLI here runs without the gateway's tenant setting: its BillingAccountId says just "sekisho"
        return [{k: v for k, v in row.items() if k != "BillingAccountId"} for row in csv.DictReader(io.StringIO(text))]

    assert rows(done.stdout) == rows(api) and len(rows(api)) == 2
