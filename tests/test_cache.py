"""The response cache through the gateway, on both stores."""
from __future__ import annotations

import asyncio
import time
import uuid

import aiohttp
import openai
import pytest
from openai import AsyncAzureOpenAI

ADMIN = "/sekisho/admin"


async def _put_app(gw, admin_token, settings, name="Cached app") -> str:
    app_id = str(uuid.uuid4())
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin_token}"}) as session:
        async with session.put(f"{gw.url}{ADMIN}/policies/apps/{app_id}", json={"name": name, "settings": settings}) as response:
            assert response.status == 201, await response.text()
    return app_id


async def _admin(gw, admin_token, method, path):
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin_token}"}) as session:
        async with session.request(method, gw.url + path) as response:
            return response.status, await response.json()


def _client(gw, issuer, app_id) -> AsyncAzureOpenAI:
    return AsyncAzureOpenAI(azure_endpoint=gw.url, azure_ad_token=issuer.mint(app_id), api_version="2024-10-21", max_retries=0)


@pytest.fixture
def cached_app(logged_gateway, admin_token, issuer):
    async def make(**cache):
        settings = {"cache": {"enabled": True, "ttl_seconds": 600, **cache}, "trust_user_header": True}
        app_id = await _put_app(logged_gateway, admin_token, settings)
        return app_id, _client(logged_gateway, issuer, app_id)
    return make


def _messages(tag: str | None = None):
    return [{"role": "user", "content": f"cache me {tag or uuid.uuid4().hex}"}]


async def _chat(client, messages, headers=None, **kwargs):
    kwargs.setdefault("temperature", 0)
    raw = await client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=messages, extra_headers=headers or {}, **kwargs)
    return raw.headers["x-sekisho-cache"], raw.parse(), raw.headers


async def test_hit_miss_bypass_refresh(cached_app, logged_gateway):
    _, client = await cached_app()
    messages = _messages()
    status, first, headers = await _chat(client, messages)
    assert status == "MISS"
    status, second, hit_headers = await _chat(client, messages)
    assert status == "HIT" and second.choices[0].message.content == first.choices[0].message.content
    assert second.usage.total_tokens == first.usage.total_tokens  # the client sees the original usage
    assert (await _chat(client, messages, {"x-sekisho-cache": "no-store"}))[0] == "BYPASS"
    assert (await _chat(client, messages, {"x-sekisho-cache": "refresh"}))[0] == "MISS"
    assert (await _chat(client, messages))[0] == "HIT"
    assert (await _chat(client, messages, temperature=0.7))[0] == "BYPASS"  # non-deterministic: not cached
    # the hit is logged with no upstream tokens and the cost it saved
    record = await logged_gateway.log(hit_headers["x-sekisho-request-id"])
    assert record["usage"]["total_tokens"] == 0 and record["cost"]["amount"] == 0
    assert record["cache"]["status"] == "HIT" and record["cache"]["saved_tokens"] == first.usage.total_tokens
    assert record["cache"]["saved_cost"] > 0
    miss = await logged_gateway.log(headers["x-sekisho-request-id"])
    assert miss["cache"] == {"status": "MISS", "stored": True}


async def test_nondeterministic_when_the_policy_says_so(cached_app):
    _, client = await cached_app(cache_nondeterministic=True)
    messages = _messages()
    assert (await _chat(client, messages, temperature=0.9))[0] == "MISS"
    assert (await _chat(client, messages, temperature=0.9))[0] == "HIT"


async def test_stream_replay_is_parsed_by_the_sdk(cached_app):
    _, client = await cached_app()
    messages = _messages()
    _, whole, _ = await _chat(client, messages)
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=messages, temperature=0, stream=True, stream_options={"include_usage": True})
    assert raw.headers["x-sekisho-cache"] == "HIT"
    chunks = [c async for c in raw.parse()]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


async def test_a_streamed_answer_is_cached_once_complete(cached_app):
    _, client = await cached_app()
    messages = _messages()
    stream = await client.chat.completions.create(model="gpt-4o-mini", messages=messages, temperature=0, stream=True)
    streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    status, whole, _ = await _chat(client, messages)
    assert status == "HIT" and whole.choices[0].message.content == streamed


async def test_a_stream_cut_by_an_upstream_error_is_not_cached(cached_app):
    app_id, client = await cached_app()
    body = {"x_sim": {"reply": "one two three four", "break_after_chunks": 3}}
    messages = _messages()
    for _ in range(2):
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=messages, temperature=0, stream=True, extra_body=body)
        assert raw.headers["x-sekisho-cache"] == "MISS"
        with pytest.raises(Exception):
            async for _ in raw.parse():
                pass


async def test_replay_only(cached_app, logged_gateway, admin_token, issuer):
    app_id, client = await cached_app(allow_replay_header=True)
    recorded = _messages("recorded")
    await _chat(client, recorded)  # record once
    assert (await _chat(client, recorded, {"x-sekisho-cache": "replay-only"}))[0] == "HIT"
    with pytest.raises(openai.ConflictError) as caught:
        await _chat(client, _messages(), {"x-sekisho-cache": "replay-only"})
    assert caught.value.code == "cache_miss"
    record = await logged_gateway.log(caught.value.response.headers["x-sekisho-request-id"])
    assert record["status"] == 409
    # replay-only by policy, and the header refused where the policy does not allow it
    strict = _client(logged_gateway, issuer, await _put_app(logged_gateway, admin_token, {"cache": {"replay_only": True}}))
    with pytest.raises(openai.ConflictError):
        await _chat(strict, _messages())
    plain = _client(logged_gateway, issuer, await _put_app(logged_gateway, admin_token, {"cache": {"enabled": True}}))
    with pytest.raises(openai.PermissionDeniedError):
        await _chat(plain, _messages(), {"x-sekisho-cache": "replay-only"})


async def test_hits_skip_the_token_quota(cached_app, logged_gateway, admin_token):
    app_id, client = await cached_app()
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin_token}"}) as session:
        async with session.put(f"{logged_gateway.url}{ADMIN}/policies/apps/{app_id}", json={"name": "Cached app", "settings": {
                "cache": {"enabled": True}, "app_limits": {"tokens_per_day": 100000, "requests_per_minute": 1000}}}) as response:
            assert response.status == 200
    messages = _messages()
    _, first, _ = await _chat(client, messages)
    for _ in range(3):
        assert (await _chat(client, messages))[0] == "HIT"
    deadline = time.monotonic() + 5
    while True:
        status, usage = await _admin(logged_gateway, admin_token, "GET", f"{ADMIN}/usage/apps/{app_id}")
        if usage["metrics"]["tokens_per_day"]["used"] == first.usage.total_tokens or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert usage["metrics"]["tokens_per_day"]["used"] == first.usage.total_tokens  # one miss only
    assert usage["metrics"]["requests_per_minute"]["used"] >= 4  # hits still count as requests


async def test_ttl_expiry(cached_app):
    _, client = await cached_app()
    messages = _messages()
    assert (await _chat(client, messages, {"x-sekisho-cache-ttl": "1"}))[0] == "MISS"
    assert (await _chat(client, messages))[0] == "HIT"
    await asyncio.sleep(1.2)
    assert (await _chat(client, messages))[0] == "MISS"
    for bad in ("soon", "-5", "0"):
        with pytest.raises(openai.BadRequestError):
            await _chat(client, messages, {"x-sekisho-cache-ttl": bad})


async def test_apps_do_not_share_entries_unless_scoped_together(cached_app):
    _, a = await cached_app()
    _, b = await cached_app()
    messages = _messages()
    assert (await _chat(a, messages))[0] == "MISS"
    assert (await _chat(b, messages))[0] == "MISS"
    scope = "team-" + uuid.uuid4().hex[:6]
    _, c = await cached_app(shared_scope=scope)
    _, d = await cached_app(shared_scope=scope)
    assert (await _chat(c, messages))[0] == "MISS"
    assert (await _chat(d, messages))[0] == "HIT"


async def test_a_shared_scope_named_like_an_app_cannot_read_that_apps_entries(cached_app):
    """Shared scopes have a namespace of their own: naming one after an app id (an admin's
    mistake, or a guess) reads nothing of that app's."""
    victim_id, victim = await cached_app()
    messages = _messages()
    assert (await _chat(victim, messages))[0] == "MISS"
    assert (await _chat(victim, messages))[0] == "HIT"
    _, intruder = await cached_app(shared_scope=victim_id)
    assert (await _chat(intruder, messages))[0] == "MISS"


async def test_embeddings_and_responses_are_cached(cached_app):
    _, client = await cached_app()
    text = uuid.uuid4().hex
    first = await client.embeddings.with_raw_response.create(model="text-embedding-3-small", input=text, dimensions=8)
    second = await client.embeddings.with_raw_response.create(model="text-embedding-3-small", input=text, dimensions=8)
    assert (first.headers["x-sekisho-cache"], second.headers["x-sekisho-cache"]) == ("MISS", "HIT")
    assert second.parse().data[0].embedding == first.parse().data[0].embedding
    prompt = "respond " + text
    whole = await client.responses.create(model="gpt-4o-mini", input=prompt, temperature=0)
    events = [e async for e in await client.responses.create(model="gpt-4o-mini", input=prompt, temperature=0, stream=True)]
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == whole.output_text
    assert next(e for e in events if e.type == "response.completed").response.output_text == whole.output_text


async def test_concurrent_identical_misses_call_upstream_once(cached_app, simulator):
    _, client = await cached_app()
    messages = _messages()
    before = len(simulator.received())
    results = await asyncio.gather(*(_chat(client, messages, extra_body={"x_sim": {"latency_ms": 300}}) for _ in range(8)))
    statuses = sorted(status for status, _, _ in results)
    assert statuses == ["HIT"] * 7 + ["MISS"]
    assert len({r[1].choices[0].message.content for r in results}) == 1
    assert len(simulator.received()) - before == 1


async def test_admin_stats_and_purge(cached_app, logged_gateway, admin_token):
    app_id, client = await cached_app()
    messages = _messages()
    await _chat(client, messages)
    await _chat(client, messages)
    await _chat(client, messages)
    deadline = time.monotonic() + 5
    while True:
        status, stats = await _admin(logged_gateway, admin_token, "GET", f"{ADMIN}/cache/apps/{app_id}")
        # counters land off the hot path (on Cosmos one document after the other): wait for all
        if ((stats["hits"], stats["misses"]) == (2, 1) and stats["saved_tokens"] and stats["saved_cost"]) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert status == 200 and stats["hits"] == 2 and stats["misses"] == 1 and stats["hit_rate"] == pytest.approx(0.6667, abs=1e-3)
    assert stats["saved_cost"] > 0 and stats["saved_tokens"] > 0
    status, purged = await _admin(logged_gateway, admin_token, "POST", f"{ADMIN}/cache/apps/{app_id}/purge")
    assert status == 200 and purged["purged"] == 1
    assert (await _chat(client, messages))[0] == "MISS"
