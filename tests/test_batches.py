"""Batches: every line obeys the app's policy, the batch is owned by its app, reserved at the batch
price when created and settled line by line when it ends — when the app polls, or by the
reconciling timer. Background responses are settled the same way."""
from __future__ import annotations

import asyncio
import time

import aiohttp
import openai
import orjson
import pytest
from openai import AsyncAzureOpenAI, AsyncOpenAI

from shared.store import LogQuery

from .servers import put_app

ADMIN = "/sekisho/admin"


def _v1(gw, issuer, app_id) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=gw.url + "/openai/v1", api_key=issuer.mint(app_id), max_retries=0)


def _lines(*contents: str, model: str = "gpt-4o-mini", url: str = "/v1/chat/completions") -> bytes:
    return b"".join(orjson.dumps({"custom_id": f"req-{n}", "method": "POST", "url": url,
                                  "body": {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 50}}) + b"\n"
                    for n, text in enumerate(contents, 1))


async def _admin(gw, admin_token, method: str, path: str):
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin_token}"}) as session:
        async with session.request(method, gw.url + path) as response:
            return response.status, await response.json(content_type=None)


async def _until(check, timeout: float = 15.0, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(every)


async def _settled(gw, app_id: str, kind: str, object_id: str, expected: int) -> list[dict]:
    async def records():
        found = [r for r in await gw.store.query_logs(LogQuery(app_id=app_id, limit=500))
                 if (r.get("settles") or {}).get("kind") == kind and r["settles"]["id"] == object_id]
        return found if len(found) >= expected else None
    return await _until(records) or []


async def _usage(gw, admin_token, app_id: str) -> dict:
    # Settlements are written within 50 ms, off the request's path. (The limits in these tests are
    # small enough that no instance takes a lease of them, so the counters are exact at once.)
    await asyncio.sleep(0.3)
    status, usage = await _admin(gw, admin_token, "GET", f"{ADMIN}/usage/apps/{app_id}")
    assert status == 200
    return usage["metrics"]


async def test_a_batch_runs_checked_lines_and_settles_each_at_the_batch_price(logged_gateway, admin_token, issuer):
    gw = logged_gateway
    app_id = await put_app(gw.url, admin_token, {
        "system_prompt": {"text": "Answer as Sekisho's batch helper.", "mode": "prepend"},
        "app_limits": {"tokens_per_day": 5_000, "tokens_per_minute": 500, "spend_per_month": 50},
    }, "batch app")
    client = _v1(gw, issuer, app_id)
    upload = await client.files.create(file=("batch.jsonl", _lines("one", "two", "three"), "application/jsonl"), purpose="batch")
    sent = (await client.files.content(upload.id)).content.decode()
    assert sent.count("Answer as Sekisho's batch helper.") == 3  # the app's prompt went into every line upstream
    upload_record = await gw.log((await client.files.with_raw_response.retrieve(upload.id)).headers["x-sekisho-request-id"])
    assert upload_record["owned_object"]["id"] == upload.id

    created = await client.batches.with_raw_response.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                                            completion_window="24h", metadata={"x_sim_seconds": "0.6"})
    batch = created.parse()
    assert batch.status == "validating"
    create_record = await gw.log(created.headers["x-sekisho-request-id"])
    assert create_record["operation"] == "batches.create" and create_record["cost"]["pending"] is True
    reserved = create_record["quota_estimate"]
    assert reserved["completion_tokens"] == 150  # three lines × max_tokens, reserved though 500 tokens/minute would not take it all
    metrics = await _usage(gw, admin_token, app_id)
    assert metrics["tokens_per_day"]["used"] == reserved["prompt_tokens"] + reserved["completion_tokens"]
    assert metrics["tokens_per_minute"]["used"] == 0  # a batch runs on Azure's batch capacity, not this minute's

    done = await _until(lambda: _status(client, batch.id, "completed"))
    assert done.request_counts.completed == 3
    output = (await client.files.content(done.output_file_id)).content  # the output file is the app's own now
    answers = [orjson.loads(line) for line in output.splitlines()]
    assert {a["custom_id"] for a in answers} == {"req-1", "req-2", "req-3"}
    records = await _settled(gw, app_id, "batch", batch.id, 3)
    assert sorted(r["settles"]["custom_id"] for r in records) == ["req-1", "req-2", "req-3"]
    by_id = {a["custom_id"]: a["response"]["body"]["usage"] for a in answers}
    total_tokens = 0
    for record in records:
        usage = by_id[record["settles"]["custom_id"]]
        assert record["operation"] == "chat.completions" and record["deployment"] == "gpt-4o-mini" and record["status"] == 200
        assert record["usage"]["total_tokens"] == usage["total_tokens"]
        full_price = (usage["prompt_tokens"] * 0.15 + usage["completion_tokens"] * 0.60) / 1_000_000  # gpt-4o-mini
        assert record["cost"]["amount"] == pytest.approx(full_price / 2, rel=1e-6)  # Azure's batch: half price
        assert record["settles"]["request_id"] == create_record["id"]
        total_tokens += usage["total_tokens"]
    metrics = await _usage(gw, admin_token, app_id)
    assert metrics["tokens_per_day"]["used"] == total_tokens  # the reservation settled to what the lines used
    spent = sum(r["cost"]["amount"] for r in records)
    assert metrics["spend_per_month"]["used"] == pytest.approx(spent, abs=1e-8)
    async def reported():  # the admin page's reports read the roll-ups, which the line records feed
        status, report = await _admin(gw, admin_token, "GET", f"{ADMIN}/reports/usage?by=operation&app_id={app_id}")
        rows = {r["operation"]: r for r in report["data"]}
        return rows if status == 200 and rows.get("chat.completions", {}).get("requests") == 3 else None
    rows = await _until(reported, timeout=5)
    assert rows["chat.completions"]["cost"] == pytest.approx(spent, abs=1e-8) and rows["batches.create"]["cost"] == 0
    await client.batches.retrieve(batch.id)  # polled again: settled once, no more records
    await asyncio.sleep(0.5)
    assert len(await _settled(gw, app_id, "batch", batch.id, 3)) == 3


async def _status(client, batch_id: str, status: str):
    batch = await client.batches.retrieve(batch_id)
    return batch if batch.status == status else None


async def test_a_line_the_policy_refuses_refuses_the_upload_naming_the_line(gateway, admin_token, issuer):
    app_id = await put_app(gateway.url, admin_token, {
        "allowed_deployments": ["gpt-4o-mini"],
        "guards": {"rules": [{"id": "codename", "pattern": "Project Bluebird"}]},
    }, "strict batch app")
    client = _v1(gateway, issuer, app_id)
    with pytest.raises(openai.BadRequestError) as caught:
        await client.files.create(file=("b.jsonl", _lines("fine", "about project blue-bird", "fine too"), "application/jsonl"), purpose="batch")
    assert caught.value.code == "content_filter" and "line 2 (custom_id 'req-2')" in caught.value.message
    with pytest.raises(openai.PermissionDeniedError) as caught:
        await client.files.create(file=("b.jsonl", _lines("hello", model="gpt-4o"), "application/jsonl"), purpose="batch")
    assert "line 1" in caught.value.message and "gpt-4o" in caught.value.message
    mixed = _lines("a") + _lines("b", url="/v1/embeddings").replace(b"req-1", b"req-9")
    with pytest.raises(openai.BadRequestError) as caught:
        await client.files.create(file=("b.jsonl", mixed, "application/jsonl"), purpose="batch")
    assert "one endpoint" in caught.value.message
    for bad, words in ((b"not json\n", "not valid JSON"), (_lines("a") + _lines("b"), "used twice"),
                       (_lines("a").replace(b'"max_tokens":50', b'"max_tokens":50,"stream":true'), "cannot be streamed")):
        with pytest.raises(openai.BadRequestError) as caught:
            await client.files.create(file=("b.jsonl", bad, "application/jsonl"), purpose="batch")
        assert words in caught.value.message
    plain = await client.files.create(file=("notes.jsonl", _lines("hello"), "application/jsonl"), purpose="assistants")
    with pytest.raises(openai.BadRequestError) as caught:  # never checked line by line: not a batch's input
        await client.batches.create(input_file_id=plain.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert caught.value.param == "input_file_id"


async def test_what_the_model_wrote_in_a_batch_passes_the_output_guard(logged_gateway, admin_token, issuer):
    gw = logged_gateway
    app_id = await put_app(gw.url, admin_token, {"guards": {"rules": [{"id": "codename", "pattern": "Project Bluebird"}], "output_action": "redact"}},
                           "guarded batch app")
    client = _v1(gw, issuer, app_id)
    lines = _lines("one", "two").replace(b'"max_tokens":50}', b'"max_tokens":50,"x_sim":{"reply":"The plan is Project Bluebird, as agreed."}}', 1)
    upload = await client.files.create(file=("b.jsonl", lines, "application/jsonl"), purpose="batch")
    batch = await client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h",
                                        metadata={"x_sim_seconds": "0.2"})
    done = await _until(lambda: _status(client, batch.id, "completed"))
    read = await client.files.with_raw_response.content(done.output_file_id)
    answers = {a["custom_id"]: a["response"]["body"]["choices"][0]["message"]["content"] for a in map(orjson.loads, read.content.splitlines())}
    assert "Bluebird" not in answers["req-1"] and answers["req-1"].startswith("The plan is ")  # redacted as the same answer on its own would be
    assert answers["req-2"]  # untouched
    record = await gw.log(read.headers["x-sekisho-request-id"])
    assert record["guard"] and record["guard"][0]["rule"] == "codename" and record["guard"][0]["where"].startswith("req-1")


async def test_batches_belong_to_their_app(logged_gateway, admin_token, issuer):
    owner = _v1(logged_gateway, issuer, await put_app(logged_gateway.url, admin_token, {}, "owner"))
    intruder = _v1(logged_gateway, issuer, await put_app(logged_gateway.url, admin_token, {}, "intruder"))
    upload = await owner.files.create(file=("b.jsonl", _lines("secret plans"), "application/jsonl"), purpose="batch")
    with pytest.raises(openai.NotFoundError):  # a batch may only read its own app's input file
        await intruder.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    batch = await owner.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h",
                                       metadata={"x_sim_seconds": "0.3"})
    assert [b.id for b in (await owner.batches.list()).data] == [batch.id]
    assert (await intruder.batches.list()).data == []
    for attempt in (lambda: intruder.batches.retrieve(batch.id), lambda: intruder.batches.cancel(batch.id)):
        with pytest.raises(openai.NotFoundError):
            await attempt()
    done = await _until(lambda: _status(owner, batch.id, "completed"))
    async def listed_completed():  # the list follows what polls saw (recorded once each answer is out)
        return (await owner.batches.list()).data[0].status == "completed"
    assert await _until(listed_completed, timeout=3)
    with pytest.raises(openai.NotFoundError):
        await intruder.files.content(done.output_file_id)
    azure = AsyncAzureOpenAI(azure_endpoint=logged_gateway.url, azure_ad_token=owner.api_key, api_version="2024-10-21", max_retries=0)
    assert (await azure.batches.retrieve(batch.id)).status == "completed"


async def test_a_cancelled_batch_releases_what_it_did_not_use(gateway, admin_token, issuer):
    app_id = await put_app(gateway.url, admin_token, {"app_limits": {"tokens_per_day": 5_000}}, "cancelling app")
    client = _v1(gateway, issuer, app_id)
    upload = await client.files.create(file=("b.jsonl", _lines("a", "b", "c", "d"), "application/jsonl"), purpose="batch")
    batch = await client.batches.create(input_file_id=upload.id, endpoint="/chat/completions", completion_window="24h",
                                        metadata={"x_sim_seconds": "30"})
    assert (await _usage(gateway, admin_token, app_id))["tokens_per_day"]["used"] > 200
    assert (await client.batches.cancel(batch.id)).status == "cancelling"
    cancelled = await _until(lambda: _status(client, batch.id, "cancelled"))
    assert cancelled.output_file_id is None  # cancelled before any line ran
    assert (await _usage(gateway, admin_token, app_id))["tokens_per_day"]["used"] == 0
    expiring = await client.batches.create(input_file_id=upload.id, endpoint="/chat/completions", completion_window="24h",
                                           metadata={"x_sim_seconds": "0.2", "x_sim_expire": "1"})
    assert (await _usage(gateway, admin_token, app_id))["tokens_per_day"]["used"] > 200
    expired = await _until(lambda: _status(client, expiring.id, "expired"))
    assert expired.output_file_id is None
    assert (await _usage(gateway, admin_token, app_id))["tokens_per_day"]["used"] == 0  # an expired batch releases it all


async def test_the_timer_settles_batches_nobody_polls(logged_gateway, admin_token, issuer):
    gw = logged_gateway
    app_id = await put_app(gw.url, admin_token, {}, "unpolled batches")
    client = _v1(gw, issuer, app_id)
    upload = await client.files.create(file=("b.jsonl", _lines("x", "y"), "application/jsonl"), purpose="batch")
    batch = await client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h",
                                        metadata={"x_sim_seconds": "0.2"})
    await asyncio.sleep(0.5)
    async with aiohttp.ClientSession() as session:  # what the Functions host's admin API does: run the timer function now
        async with session.post(gw.url + "/admin/functions/reconcile_deferred_work", json={"input": ""}) as response:
            assert response.status == 202
    records = await _settled(gw, app_id, "batch", batch.id, 2)
    assert len(records) == 2 and all(r["cost"]["amount"] > 0 for r in records)


async def test_background_responses_are_settled_and_logged_when_they_end(logged_gateway, admin_token, issuer):
    gw = logged_gateway
    app_id = await put_app(gw.url, admin_token, {"app_limits": {"tokens_per_day": 5_000}}, "background app")
    client = _v1(gw, issuer, app_id)
    started = await client.responses.with_raw_response.create(model="gpt-4o-mini", input="Write a haiku.", background=True,
                                                              max_output_tokens=100)
    response = started.parse()
    assert response.status == "queued"
    first = await gw.log(started.headers["x-sekisho-request-id"])
    assert first["cost"]["pending"] is True
    assert (await _usage(gw, admin_token, app_id))["tokens_per_day"]["used"] >= 100  # still reserved while it runs

    async def completed():
        current = await client.responses.retrieve(response.id)
        return current if current.status == "completed" else None
    done = await _until(completed)
    records = await _settled(gw, app_id, "response", response.id, 1)
    assert len(records) == 1
    record = records[0]
    assert record["operation"] == "responses" and record["usage"]["total_tokens"] == done.usage.total_tokens
    assert record["settles"]["request_id"] == first["id"] and record["cost"]["amount"] > 0
    assert (await _usage(gw, admin_token, app_id))["tokens_per_day"]["used"] == done.usage.total_tokens
    running = await client.responses.create(model="gpt-4o-mini", input="Another.", background=True, max_output_tokens=100,
                                            extra_body={"x_sim": {"background_ms": 30_000}})
    assert (await _usage(gw, admin_token, app_id))["tokens_per_day"]["used"] > done.usage.total_tokens
    await client.responses.delete(running.id)  # deleted while it runs: nothing more will be used
    assert len(await _settled(gw, app_id, "response", running.id, 1)) == 1
    assert (await _usage(gw, admin_token, app_id))["tokens_per_day"]["used"] == done.usage.total_tokens
