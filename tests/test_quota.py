"""Quotas and budgets through the gateway, on both stores."""
from __future__ import annotations

import asyncio
import time
import uuid
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import aiohttp
import openai
import pytest
from openai import AsyncAzureOpenAI

from shared.quota.enforce import Windows
from shared.quota.pricing import BUILTIN_PRICES, cost_nanos, match_price

from .servers import post_all

ADMIN = "/sekisho/admin"
CHAT = "/openai/deployments/{deployment}/chat/completions?api-version=2024-10-21"


async def _request(method: str, url: str, token: str, json=None, headers=None):
    async with aiohttp.ClientSession() as session:
        async with session.request(method, url, json=json, headers={"Authorization": f"Bearer {token}", **(headers or {})}) as response:
            body = await response.json(content_type=None) if response.status != 204 else None
            return response.status, response.headers, body


async def _register(gw, admin_token, settings: dict) -> str:
    app_id = str(uuid.uuid4())
    status, _, _ = await _request("PUT", f"{gw.url}{ADMIN}/policies/apps/{app_id}", admin_token, {"name": "quota test", "settings": settings})
    assert status == 201
    return app_id


async def _chat(gw, token, deployment="gpt-4o-mini", body=None, headers=None):
    body = body or {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
    return await _request("POST", gw.url + CHAT.format(deployment=deployment), token, body, headers)


async def _usage(gw, admin_token, app_id, user=None):
    path = f"{ADMIN}/usage/apps/{app_id}" + (f"/users/{user}" if user else "")
    status, _, body = await _request("GET", gw.url + path, admin_token)
    assert status == 200, body
    return body["metrics"]


async def _settled(gw, admin_token, app_id, metric, expected, user=None):
    """Settlement runs off the hot path: poll until it lands."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        value = (await _usage(gw, admin_token, app_id, user))[metric]["used"]
        if value == pytest.approx(expected):
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"{metric} is {value}, expected {expected}")


def _away_from_minute_boundary():
    second = datetime.now(ZoneInfo("UTC")).second
    if second > 52:
        time.sleep(61 - second)


@pytest.mark.parametrize("attempt", [1, 2])
async def test_race_admits_exactly_the_limit(logged_gateway, admin_token, issuer, attempt):
    app_id = await _register(logged_gateway, admin_token, {"app_limits": {"requests_per_minute": 50}})
    token = issuer.mint(app_id)
    _away_from_minute_boundary()
    # 200 client threads, each with its own connection, released together.
    results = await asyncio.to_thread(post_all, logged_gateway.url + CHAT.format(deployment="gpt-4o-mini"), token,
                                      {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}, 200)
    statuses = [status for status, _, _ in results]
    assert statuses.count(200) == 50 and statuses.count(429) == 150
    refusal = next(body for status, _, body in results if status == 429)
    assert refusal["error"]["code"] == "rate_limit_exceeded"
    assert (await _usage(logged_gateway, admin_token, app_id))["requests_per_minute"]["used"] == 50


async def test_headers_on_success_and_refusal(logged_gateway, admin_token, issuer):
    app_id = await _register(logged_gateway, admin_token, {"app_limits": {"requests_per_minute": 2, "tokens_per_day": 100000}})
    token = issuer.mint(app_id)
    _away_from_minute_boundary()
    status, headers, body = await _chat(logged_gateway, token)
    assert status == 200
    assert headers["x-ratelimit-remaining-requests"] == "1"
    estimate = int(headers["x-ratelimit-remaining-tokens"])
    assert 100000 - estimate > 20  # prompt estimate + max_tokens 20 reserved
    assert float(headers["x-sekisho-cost"]) > 0
    await _chat(logged_gateway, token)
    status, headers, body = await _chat(logged_gateway, token)
    assert status == 429 and body["error"]["code"] == "rate_limit_exceeded"
    retry_after = int(headers["Retry-After"])
    assert 1 <= retry_after <= 60
    assert headers["retry-after-ms"] == str(retry_after * 1000)
    assert headers["x-ratelimit-remaining-requests"] == "0"
    record = await logged_gateway.log(headers["x-sekisho-request-id"])
    assert record["status"] == 429 and record["quota_refused"]["metric"] == "requests_per_minute"


async def test_streams_settle_with_real_usage(logged_gateway, admin_token, issuer):
    app_id = await _register(logged_gateway, admin_token, {"app_limits": {"tokens_per_day": 1_000_000}, "default_completion_tokens": 500})
    client = AsyncAzureOpenAI(azure_endpoint=logged_gateway.url, azure_ad_token=issuer.mint(app_id), api_version="2024-10-21", max_retries=0)
    stream = await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "stream"}], stream=True)
    async for _ in stream:
        pass
    whole = await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "stream"}])
    # Reserved 500 + prompt for each; settled to the usage the upstream reported (the same twice).
    await _settled(logged_gateway, admin_token, app_id, "tokens_per_day", 2 * whole.usage.total_tokens)


async def test_failed_upstream_call_releases_its_tokens(logged_gateway, admin_token, issuer):
    app_id = await _register(logged_gateway, admin_token, {"app_limits": {"tokens_per_day": 10_000, "requests_per_minute": 100}, "retry": {"max_attempts": 1}})
    token = issuer.mint(app_id)
    status, headers, _ = await _chat(logged_gateway, token, body={"messages": [{"role": "user", "content": "x"}], "x_sim": {"fail": 500}})
    assert status == 502
    await _settled(logged_gateway, admin_token, app_id, "tokens_per_day", 0)
    record = await logged_gateway.log(headers["x-sekisho-request-id"])
    assert record["cost"]["amount"] == 0
    # a broken stream is charged for what was relayed, not released
    body = {"messages": [{"role": "user", "content": "x"}], "stream": True, "x_sim": {"reply": "a b c d", "break_after_chunks": 4}}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
        async with session.post(logged_gateway.url + CHAT.format(deployment="gpt-4o-mini"), json=body) as response:
            await response.read()
    # Both requests count; the instance's unspent quota lease is handed back once it idles.
    await _settled(logged_gateway, admin_token, app_id, "requests_per_minute", 2)


async def test_budget_in_currency_across_models(logged_gateway, admin_token, issuer):
    app_id = await _register(logged_gateway, admin_token, {"app_limits": {"spend_per_month": 1.0}})
    client = AsyncAzureOpenAI(azure_endpoint=logged_gateway.url, azure_ad_token=issuer.mint(app_id), api_version="2024-10-21", max_retries=0)
    expected = 0
    for deployment in ("gpt-4o-mini", "gpt-4o", "text-embedding-3-small"):
        if deployment.startswith("text-"):
            raw = await client.embeddings.with_raw_response.create(model=deployment, input="budget")
        else:
            raw = await client.chat.completions.with_raw_response.create(model=deployment, messages=[{"role": "user", "content": "budget"}], max_tokens=30)
        result = raw.parse()
        _, price = match_price(BUILTIN_PRICES, result.model)
        completion = getattr(result.usage, "completion_tokens", 0) or 0
        cost = cost_nanos(price, result.usage.prompt_tokens, completion)
        assert float(raw.headers["x-sekisho-cost"]) == pytest.approx(cost / 1e9, abs=1e-9)
        record = await logged_gateway.log(raw.headers["x-sekisho-request-id"])
        assert record["cost"]["currency"] == "USD" and record["cost"]["amount"] == pytest.approx(cost / 1e9)
        expected += cost
    assert BUILTIN_PRICES["gpt-4o"].output_per_1m > BUILTIN_PRICES["gpt-4o-mini"].output_per_1m
    await _settled(logged_gateway, admin_token, app_id, "spend_per_month", expected / 1e9)
    # Lower the budget below what was spent: the next request is refused, effective at once.
    status, _, _ = await _request("PUT", f"{logged_gateway.url}{ADMIN}/policies/apps/{app_id}", admin_token,
                                  {"name": "quota test", "settings": {"app_limits": {"spend_per_month": expected / 1e9}}})
    assert status == 200
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "more"}])
    assert caught.value.code == "insufficient_quota"
    assert "monthly budget" in caught.value.message
    windows = Windows("UTC")
    assert abs(int(caught.value.response.headers["retry-after"]) - windows.seconds_left("month", windows.now())) <= 2


async def test_user_limits_default_from_the_app_and_can_be_raised(logged_gateway, admin_token, issuer):
    app_id = await _register(logged_gateway, admin_token, {"trust_user_header": True, "user_limits": {"requests_per_minute": 1}})
    token = issuer.mint(app_id)
    _away_from_minute_boundary()
    assert (await _chat(logged_gateway, token, headers={"x-sekisho-user": "ann"}))[0] == 200
    status, _, body = await _chat(logged_gateway, token, headers={"x-sekisho-user": "ann"})
    assert status == 429 and "user's limit" in body["error"]["message"]
    assert (await _chat(logged_gateway, token, headers={"x-sekisho-user": "ben"}))[0] == 200  # each user has their own
    # the admin raises ann's limit: effective at once
    status, _, _ = await _request("PUT", f"{logged_gateway.url}{ADMIN}/policies/apps/{app_id}/users/ann", admin_token,
                                  {"settings": {"user_limits": {"requests_per_minute": 5}}})
    assert status == 201
    assert (await _chat(logged_gateway, token, headers={"x-sekisho-user": "ann"}))[0] == 200
    metrics = await _usage(logged_gateway, admin_token, app_id, "ann")
    assert metrics["requests_per_minute"] == {**metrics["requests_per_minute"], "used": 2, "limit": 5, "remaining": 3}


async def test_admin_reset(logged_gateway, admin_token, issuer):
    app_id = await _register(logged_gateway, admin_token, {"app_limits": {"requests_per_minute": 1}})
    token = issuer.mint(app_id)
    _away_from_minute_boundary()
    assert (await _chat(logged_gateway, token))[0] == 200
    assert (await _chat(logged_gateway, token))[0] == 429
    status, _, body = await _request("POST", f"{logged_gateway.url}{ADMIN}/usage/apps/{app_id}/reset", admin_token, {"metrics": ["requests_per_minute"]})
    assert status == 200 and body["reset"] == ["requests_per_minute"]
    assert (await _chat(logged_gateway, token))[0] == 200
    status, _, body = await _request("POST", f"{logged_gateway.url}{ADMIN}/usage/apps/{app_id}/reset", admin_token, {"metrics": ["nope"]})
    assert status == 400


async def test_admin_pricing(logged_gateway, admin_token):
    base = f"{logged_gateway.url}{ADMIN}/pricing"
    status, _, body = await _request("PUT", f"{base}/my-finetune", admin_token, {"input_per_1m": 3, "output_per_1m": 12})
    assert status == 200
    status, _, listing = await _request("GET", base, admin_token)
    entry = next(p for p in listing["data"] if p["model"] == "my-finetune")
    assert entry["source"] == "store" and entry["output_per_1m"] == 12
    assert next(p for p in listing["data"] if p["model"] == "gpt-4o")["source"] == "builtin"
    status, _, body = await _request("PUT", f"{base}/bad", admin_token, {"input_per_1m": -1})
    assert status == 400 and "input_per_1m" in body["error"]["message"]
    assert (await _request("DELETE", f"{base}/my-finetune", admin_token))[0] == 204


def test_windows_are_calendar_aligned_in_the_zone():
    tokyo = Windows("Asia/Tokyo")
    at = datetime(2026, 11, 30, 23, 59, 30, tzinfo=ZoneInfo("Asia/Tokyo"))
    assert tokyo.key("minute", at) == "2026-11-30T23:59"
    assert tokyo.key("day", at) == "2026-11-30" and tokyo.key("month", at) == "2026-11"
    assert tokyo.seconds_left("minute", at) == 30
    assert tokyo.seconds_left("day", at) == 30 and tokyo.seconds_left("month", at) == 30
    # a 23-hour day: DST starts in New York on 2026-03-08
    ny = Windows("America/New_York")
    start = datetime(2026, 3, 8, 0, 0, 0, tzinfo=ZoneInfo("America/New_York"))
    assert ny.seconds_left("day", start) == 23 * 3600


@pytest.mark.parametrize("zone, start", [
    ("America/New_York", datetime(2026, 11, 1, 0, 58, tzinfo=timezone.utc)),  # around the DST fold (01:00-02:00 twice)
    ("Asia/Kathmandu", datetime(2026, 11, 30, 18, 13, tzinfo=timezone.utc)),  # +05:45: the local day ends at 18:15 UTC
    ("UTC", datetime(2026, 12, 31, 23, 58, tzinfo=timezone.utc)),  # the end of a month and a year
])
def test_the_windows_kept_per_minute_are_those_of_the_instant(zone, start):
    """Windows.around keeps the windows of a local minute: every instant, second by second for four
    hours, gets the key and end that the instant's own local time gives."""
    windows = Windows(zone)
    for second in range(0, 4 * 3600, 7):
        now = start.timestamp() + second + 0.5
        at = datetime.fromtimestamp(now, ZoneInfo(zone))
        expected = {window: (windows.key(window, at), windows.end(window, at).timestamp()) for window in ("minute", "day", "month")}
        assert windows.around(now) == expected, at


class _DownStore:
    """A store whose counters are unreachable."""

    async def reserve(self, charges):
        from shared.store import StoreUnavailable

        raise StoreUnavailable("simulated outage")

    async def adjust(self, charges):
        raise AssertionError("a degraded reservation settles in memory, not in the store")

    async def list_prices(self):
        return []


def _context(policy_settings: dict):
    from starlette.requests import Request

    from shared.context import RequestContext
    from shared.policy.policies import PolicyDocument, PolicySettings, builtin_defaults, effective_policy
    from shared.routes import ROUTES_BY_FUNCTION

    app = PolicyDocument(id="app", app_id="a1", kind="app", settings=PolicySettings.model_validate(policy_settings))
    policy = effective_policy("a1", builtin_defaults("full", 30), None, app, None)
    request = Request({"type": "http", "method": "POST", "path": "/", "headers": [], "query_string": b""})
    ctx = RequestContext(request_id="r", http=request, route=ROUTES_BY_FUNCTION["azure_chat_completions"])
    ctx.policy, ctx.app_id, ctx.user_id, ctx.deployment = policy, "a1", "a1", "gpt-4o-mini"
    ctx.body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 10}
    return ctx


async def test_store_failure_fail_closed_is_503():
    from shared.errors import GatewayError
    from shared.quota.enforce import EnforceQuota
    from shared.quota.pricing import PricingTable

    stage = EnforceQuota(_DownStore(), PricingTable(_DownStore(), 60), Windows("UTC"), "USD")
    with pytest.raises(GatewayError) as caught:
        await stage.before(_context({"app_limits": {"requests_per_minute": 5}}))
    assert caught.value.status == 503 and caught.value.code == "quota_unavailable"


async def test_store_failure_fail_open_counts_in_memory():
    from shared.errors import GatewayError
    from shared.quota.enforce import EnforceQuota
    from shared.quota.pricing import PricingTable

    stage = EnforceQuota(_DownStore(), PricingTable(_DownStore(), 60), Windows("UTC"), "USD")
    settings = {"app_limits": {"requests_per_minute": 2}, "quota_on_store_failure": "open"}
    for _ in range(2):
        ctx = _context(settings)
        await stage.before(ctx)
        assert ctx.accounting.degraded is True
    with pytest.raises(GatewayError) as caught:  # the in-memory limiter still limits
        await stage.before(_context(settings))
    assert caught.value.status == 429


def test_the_estimate_counts_whole_numbers_written_with_a_decimal_point():
    """n: 3.0 is three answers (JSON Schema calls it an integer, and the gateway accepts it): were it
    read as "not a number", the estimate would reserve one answer's tokens for three."""
    from shared.operations import BY_NAME, completion_budget

    chat, completions = BY_NAME["chat.completions"], BY_NAME["completions"]
    assert completion_budget(chat, {"n": 3.0, "max_tokens": 10.0}, 100) == completion_budget(chat, {"n": 3, "max_tokens": 10}, 100) == 30
    assert completion_budget(chat, {"n": 3.0}, 100) == 300  # the policy's default per answer
    assert completion_budget(completions, {"n": 1, "best_of": 4.0, "max_tokens": 5}, 100) == 20
    assert completion_budget(chat, {"n": 2.5, "max_tokens": True}, 100) == 100  # not whole numbers: refused earlier, never multiplied
