"""Every request that reaches the gateway leaves exactly one record, on both stores."""
from __future__ import annotations

import aiohttp
import pytest
from openai import AsyncAzureOpenAI

from shared.store import LogQuery

from .conftest import TEST_APP_ID

_TOKEN: list[str] = []


@pytest.fixture(autouse=True)
def _token(token):
    _TOKEN[:] = [token]


def _client(url: str) -> AsyncAzureOpenAI:
    return AsyncAzureOpenAI(azure_endpoint=url, azure_ad_token=_TOKEN[0], api_version="2024-10-21", max_retries=0)


async def test_chat_record_has_every_field(logged_gateway):
    client = _client(logged_gateway.url)
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "東京の天気は?"}],
        temperature=0.2,
        max_tokens=50,
        tools=[{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}],
        extra_headers={"x-sekisho-property-feature": "weather-bot"},
    )
    completion = raw.parse()
    record = await logged_gateway.log(raw.headers["x-sekisho-request-id"])
    assert record["timestamp"].endswith("Z")
    assert record["deployment"] == "gpt-4o-mini"
    assert record["model"] == completion.model
    assert record["operation"] == "chat.completions" and record["api_style"] == "azure"
    assert record["api_version"] == "2024-10-21"
    assert record["prompt"] == {"messages": [{"role": "user", "content": "東京の天気は?"}]}
    assert record["parameters"]["temperature"] == 0.2 and record["parameters"]["max_tokens"] == 50
    assert record["parameters"]["tools"][0]["function"]["name"] == "weather"
    assert record["response"]["choices"][0]["message"]["content"] == completion.choices[0].message.content
    assert record["usage"]["prompt_tokens"] == completion.usage.prompt_tokens
    assert record["usage"]["completion_tokens"] == completion.usage.completion_tokens
    assert record["usage"]["total_tokens"] == completion.usage.total_tokens
    assert record["status"] == 200 and record["stream"] is False
    assert record["latency_ms"] >= record["upstream_latency_ms"] > 0
    assert record["upstream_request_id"] == raw.headers["apim-request-id"]
    assert record["properties"] == {"feature": "weather-bot"}
    assert record["ttl"] == 30 * 86400
    assert record["error"] is None
    assert record["app_id"] == TEST_APP_ID and record["app_name"] == "Test app"
    assert record["user_id"] == TEST_APP_ID  # app-only token, no end user named
    assert record["tenant_id"]


async def test_stream_record_has_assembled_text_and_exact_usage(logged_gateway):
    client = _client(logged_gateway.url)
    messages = [{"role": "user", "content": "stream please"}]
    whole = await client.chat.completions.create(model="gpt-4o-mini", messages=messages)
    response = await client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=messages, stream=True)
    stream = response.parse()
    async for _ in stream:
        pass
    record = await logged_gateway.log(response.headers["x-sekisho-request-id"])
    assert record["stream"] is True and record["status"] == 200
    assert record["response"]["choices"][0]["text"] == whole.choices[0].message.content
    assert record["response"]["choices"][0]["finish_reason"] == "stop"
    # usage comes from the usage chunk the gateway asked for, though the client did not
    assert record["usage"]["total_tokens"] == whole.usage.total_tokens
    assert record["time_to_first_byte_ms"] > 0
    # the log shows the request as sent upstream, include_usage added by the gateway
    assert record["parameters"]["stream_options"] == {"include_usage": True}


async def test_embeddings_record_keeps_counts_not_vectors(logged_gateway):
    client = _client(logged_gateway.url)
    raw = await client.embeddings.with_raw_response.create(model="text-embedding-3-small", input=["a", "b"])
    record = await logged_gateway.log(raw.headers["x-sekisho-request-id"])
    assert record["prompt"] == {"input": ["a", "b"]}
    assert record["response"]["data"] == "[2 embedding(s)]"
    assert record["usage"]["prompt_tokens"] == raw.parse().usage.prompt_tokens


async def test_exactly_one_record_per_request(logged_gateway):
    client = _client(logged_gateway.url)
    ids = []
    for i in range(5):
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": f"n{i}"}],
            extra_headers={"x-sekisho-property-batch": logged_gateway.kind + "-once"},
        )
        ids.append(raw.headers["x-sekisho-request-id"])
    for request_id in ids:
        await logged_gateway.log(request_id)
    records = await logged_gateway.store.query_logs(LogQuery(app_id=TEST_APP_ID, limit=1000))
    mine = [r for r in records if r["properties"].get("batch") == logged_gateway.kind + "-once"]
    assert sorted(r["id"] for r in mine) == sorted(ids)


async def test_client_disconnect_mid_stream_is_logged(logged_gateway):
    body = {"messages": [{"role": "user", "content": "x"}], "stream": True, "x_sim": {"reply": "a b c d e f g h", "chunk_interval_ms": 200}}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {_TOKEN[0]}"}) as session:
        async with session.post(logged_gateway.url + "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21", json=body) as response:
            request_id = response.headers["x-sekisho-request-id"]
            await response.content.readuntil(b"\n\n")  # first event, then hang up
    record = await logged_gateway.log(request_id)
    assert record["status"] == 499 and record["client_disconnected"] is True


def test_request_ids_sort_by_time_and_do_not_repeat():
    """Time-ordered ids keep the log's primary-key index growing at its end (context.new_request_id)."""
    import time as _time

    from shared.context import new_request_id

    first = new_request_id()
    _time.sleep(0.002)
    ids = [new_request_id() for _ in range(10_000)]
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert len(set(ids)) == len(ids)
    assert first < min(ids) and int(first[:12], 16) <= _time.time() * 1000


def test_stages_contribute_only_declared_fields_and_undeclared_ones_stay_out():
    """Each stage's part of the record uses names RECORD_FIELDS declares; anything else is left
    out of the stored record (and logged as a bug) instead of growing the store's schema."""
    from starlette.requests import Request

    from shared.cache.responses import CacheState
    from shared.context import RequestContext
    from shared.policy.system_prompt import AppliedPrompt
    from shared.quota.enforce import Accounting
    from shared.records.request_log import RECORD_FIELDS, build_record
    from shared.routes import ROUTES_BY_FUNCTION

    parts = [
        Accounting(estimate={"prompt_tokens": 1, "completion_tokens": 2}, degraded=True, refused={"metric": "x"}, cost={"amount": 0}).record(),
        AppliedPrompt("text", "prepend", "keep").record(),
        {"cache": CacheState("s", "k", 1, outcome={"status": "MISS"}).outcome},
        {"claimed_user_ignored": True},
    ]
    for part in parts:
        assert set(part) <= set(RECORD_FIELDS), part
    scope = {"type": "http", "method": "POST", "path": "/openai/v1/chat/completions", "headers": [], "query_string": b""}
    ctx = RequestContext("r1", Request(scope), ROUTES_BY_FUNCTION["v1_chat_completions"])
    record = build_record(ctx, "full", 1, [*parts, {"not_declared": 1}])
    assert record["quota_degraded"] is True and record["system_prompt"]["mode"] == "prepend" and "not_declared" not in record
    assert set(record) <= set(RECORD_FIELDS)
