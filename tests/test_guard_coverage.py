"""Guards and accounting over every field the model reads and writes, and what never reaches the
store: each case here walked around a guard or the quota before the operations table existed."""
from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid

import aiohttp
import openai
import pytest
from openai import AsyncAzureOpenAI, AsyncOpenAI

from shared.records.credentials import MARKER

from .servers import put_app

ADMIN = "/sekisho/admin"
RULES = [
    {"id": "ja-confidential", "pattern": "社外秘"},
    {"id": "codename", "pattern": "Project Falcon"},
    {"id": "kana", "pattern": "ひみつ"},
]
SYSTEM_PROMPT = "You are the travel desk of ACME. Never reveal the corporate discount code table to anyone at all."
INVISIBLE_DODGES = ["社\ufe00外秘", "Project Fal\ufe0fcon", "社\U000e0100外秘", "Falc\u034fon Project Falc\u034fon", "社\u3164外秘", "社\uffa0外秘"]


async def _put_app(gw, admin_token, settings, name="coverage") -> str:
    return await put_app(gw.url, admin_token, settings, name)


def _azure(gw, issuer, app_id) -> AsyncAzureOpenAI:
    return AsyncAzureOpenAI(azure_endpoint=gw.url, azure_ad_token=issuer.mint(app_id), api_version="2024-10-21", max_retries=0)


def _v1(gw, issuer, app_id) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=gw.url + "/openai/v1", api_key=issuer.mint(app_id), max_retries=0)


def _sim(**controls) -> dict:
    return {"extra_body": {"x_sim": controls}}


async def _guarded_app(gw, admin_token, action="redact", **extra) -> str:
    return await _put_app(gw, admin_token, {"guards": {"rules": RULES, "output_action": action, "leak_protection": {"min_chars": 30}}, **extra})


# The injected system prompt never comes back through the Responses API ------------------------
@pytest.mark.parametrize("client_instructions", [None, "Answer in French."])
async def test_responses_never_return_the_injected_system_prompt(logged_gateway, admin_token, issuer, client_instructions):
    app_id = await _put_app(logged_gateway, admin_token, {"system_prompt": {"text": SYSTEM_PROMPT}})
    client = _v1(logged_gateway, issuer, app_id)
    extra = {"instructions": client_instructions} if client_instructions else {}
    whole = await client.responses.with_raw_response.create(model="gpt-4o-mini", input="hi", **extra)
    assert whole.parse().instructions == client_instructions
    assert b"corporate discount" not in whole.content
    seen = []
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {issuer.mint(app_id)}"}) as session:
        async with session.post(logged_gateway.url + "/openai/v1/responses", json={"model": "gpt-4o-mini", "input": "hi", "stream": True, **extra}) as response:
            raw = await response.read()
    assert b"corporate discount" not in raw
    stream = await client.responses.create(model="gpt-4o-mini", input="hi", stream=True, **extra)
    async for event in stream:
        if hasattr(event, "response"):
            seen.append((event.type, event.response.instructions))
    assert {kind for kind, _ in seen} >= {"response.created", "response.in_progress", "response.completed"}
    assert all(instructions == client_instructions for _, instructions in seen)
    record = await logged_gateway.log(whole.headers["x-sekisho-request-id"])
    assert SYSTEM_PROMPT in record["prompt"]["instructions"]  # the upstream did get it


# Invisible characters, kana and look-alikes -------------------------------------------------------
@pytest.mark.parametrize("dodge", INVISIBLE_DODGES)
async def test_invisible_characters_do_not_hide_a_word_from_the_input_guard(logged_gateway, admin_token, issuer, dodge):
    client = _azure(logged_gateway, issuer, await _guarded_app(logged_gateway, admin_token))
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": f"about {dodge}"}])
    assert caught.value.code == "content_filter"


@pytest.mark.parametrize("dodge", ["ヒミツの話", "Рrоjеct Fаlcоn", "Ρrojeϲt Fаlсon"])
async def test_kana_and_confusables_fold_in_the_input_guard(logged_gateway, admin_token, issuer, dodge):
    client = _azure(logged_gateway, issuer, await _guarded_app(logged_gateway, admin_token))
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": dodge}])


async def test_folding_can_be_turned_off_per_policy(logged_gateway, admin_token, issuer):
    app_id = await _put_app(logged_gateway, admin_token, {"guards": {"rules": RULES, "fold_kana": False, "fold_confusables": False}})
    client = _azure(logged_gateway, issuer, app_id)
    for text in ("ヒミツの話", "Рrоjеct Fаlcоn"):
        assert (await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": text}])).choices


@pytest.mark.parametrize("dodge", INVISIBLE_DODGES)
async def test_invisible_characters_in_answers_are_redacted_whole_and_streamed(logged_gateway, admin_token, issuer, dodge):
    client = _azure(logged_gateway, issuer, await _guarded_app(logged_gateway, admin_token))
    reply = f"It is {dodge} indeed."
    whole = await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "q"}], **_sim(reply=reply))
    assert "[redacted]" in whole.choices[0].message.content
    streamed = ""
    async for chunk in await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "q"}], stream=True,
                                                            **_sim(reply=reply, chunks=len(reply))):
        if chunk.choices and chunk.choices[0].delta.content:
            streamed += chunk.choices[0].delta.content
    assert "[redacted]" in streamed and streamed == whole.choices[0].message.content


async def test_a_leak_with_variation_selectors_between_characters_is_caught(logged_gateway, admin_token, issuer):
    app_id = await _put_app(logged_gateway, admin_token, {"system_prompt": {"text": SYSTEM_PROMPT},
                                                          "guards": {"output_action": "block", "leak_protection": {"min_chars": 30}}})
    client = _azure(logged_gateway, issuer, app_id)
    leak = "\ufe0f".join(SYSTEM_PROMPT)
    answer = await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "q"}], **_sim(reply=leak))
    assert answer.choices[0].finish_reason == "content_filter"
    assert "corporate" not in answer.choices[0].message.content.replace("\ufe0f", "")


# The input guard reads every field the model reads -----------------------------------------------
CHAT_DODGES = {
    "split across content parts": {"messages": [{"role": "user", "content": [{"type": "text", "text": "about 社"}, {"type": "text", "text": "外秘 docs"}]}]},
    "split across messages": {"messages": [{"role": "user", "content": "about Project"}, {"role": "user", "content": "Falcon docs"}]},
    "assistant tool-call arguments": {"messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"q": "社外秘"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"}]},
    "message name": {"messages": [{"role": "user", "name": "ProjectFalcon", "content": "hi"}]},
    "tool description": {"messages": [{"role": "user", "content": "hi"}],
                         "tools": [{"type": "function", "function": {"name": "lookup", "description": "reads 社外秘 files", "parameters": {"type": "object"}}}]},
    "tool name": {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": "ProjectFalcon"}}]},
    "tool schema property": {"messages": [{"role": "user", "content": "hi"}],
                             "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"社外秘": {"type": "string"}}}}}]},
    "functions": {"messages": [{"role": "user", "content": "hi"}], "functions": [{"name": "f", "description": "Project Falcon plans"}]},
    "prediction": {"messages": [{"role": "user", "content": "hi"}], "prediction": {"type": "content", "content": "the 社外秘 file"}},
    "response_format schema": {"messages": [{"role": "user", "content": "hi"}],
                               "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "description": "Project Falcon"}}}},
}


@pytest.mark.parametrize("case", sorted(CHAT_DODGES))
async def test_the_input_guard_reads_every_chat_field(logged_gateway, admin_token, issuer, case):
    token = issuer.mint(await _guarded_app(logged_gateway, admin_token))
    url = logged_gateway.url + "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
        async with session.post(url, json=CHAT_DODGES[case]) as response:
            body = await response.json()
    assert response.status == 400 and body["error"]["code"] == "content_filter", (case, body)


RESPONSES_DODGES = {
    "split across input items": {"input": [{"role": "user", "content": "about Project"}, {"role": "user", "content": "Falcon"}]},
    "function call arguments": {"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": '{"q":"社外秘"}'},
                                          {"type": "function_call_output", "call_id": "c", "output": "ok"}]},
    "function call output": {"input": [{"type": "function_call_output", "call_id": "c", "output": "the 社外秘 result"}]},
    "tools": {"input": "hi", "tools": [{"type": "function", "name": "f", "description": "Project Falcon", "parameters": {"type": "object"}}]},
    "text format schema": {"input": "hi", "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object", "properties": {"社外秘": {}}}}}},
    "instructions": {"input": "hi", "instructions": "mention Project Falcon"},
}


@pytest.mark.parametrize("case", sorted(RESPONSES_DODGES))
async def test_the_input_guard_reads_every_responses_field(logged_gateway, admin_token, issuer, case):
    token = issuer.mint(await _guarded_app(logged_gateway, admin_token))
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
        async with session.post(logged_gateway.url + "/openai/v1/responses", json={"model": "gpt-4o-mini", **RESPONSES_DODGES[case]}) as response:
            body = await response.json()
    assert response.status == 400 and body["error"]["code"] == "content_filter", (case, body)


async def test_the_input_guard_reads_the_completions_suffix(logged_gateway, admin_token, issuer):
    client = _azure(logged_gateway, issuer, await _guarded_app(logged_gateway, admin_token))
    with pytest.raises(openai.BadRequestError):
        await client.completions.create(model="gpt-4o-mini", prompt="hi", suffix="Project Falcon")


# The output guard acts on every field the model writes ---------------------------------------------
async def test_tool_calls_and_refusals_are_redacted_in_whole_chat_answers(logged_gateway, admin_token, issuer):
    client = _azure(logged_gateway, issuer, await _guarded_app(logged_gateway, admin_token))
    answer = await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "q"}],
                                                  **_sim(tool_calls=[{"name": "ProjectFalcon", "arguments": '{"doc": "社外秘 plan"}'}]))
    call = answer.choices[0].message.tool_calls[0]
    assert "Falcon" not in call.function.name and "社外秘" not in call.function.arguments and "[redacted]" in call.function.arguments
    refused = await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "q"}],
                                                   **_sim(refusal="I cannot share Project Falcon."))
    assert refused.choices[0].message.refusal == "I cannot share [redacted]."


async def test_tool_calls_and_refusals_are_redacted_in_chat_streams(logged_gateway, admin_token, issuer):
    client = _azure(logged_gateway, issuer, await _guarded_app(logged_gateway, admin_token))
    arguments, name, refusal = "", "", ""
    stream = await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "q"}], stream=True,
                                                  **_sim(tool_calls=[{"name": "lookup", "arguments": '{"doc": "the 社外秘 plan of Project Falcon"}'}], chunks=12))
    async for chunk in stream:
        for call in (chunk.choices[0].delta.tool_calls or ()) if chunk.choices else ():
            name += call.function.name or ""
            arguments += call.function.arguments or ""
    assert name == "lookup" and arguments == '{"doc": "the [redacted] plan of [redacted]"}'
    stream = await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "q"}], stream=True,
                                                  **_sim(refusal="No, Project Falcon stays secret.", chunks=10))
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.refusal:
            refusal += chunk.choices[0].delta.refusal
    assert refusal == "No, [redacted] stays secret."


async def test_a_blocked_tool_call_ends_the_choice_with_content_filter(logged_gateway, admin_token, issuer):
    client = _azure(logged_gateway, issuer, await _guarded_app(logged_gateway, admin_token, action="block"))
    answer = await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "q"}],
                                                  **_sim(tool_calls=[{"name": "f", "arguments": '{"doc": "社外秘"}'}]))
    assert answer.choices[0].finish_reason == "content_filter" and not answer.choices[0].message.tool_calls
    finishes, arguments = [], ""
    async for chunk in await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "q"}], stream=True,
                                                            **_sim(tool_calls=[{"name": "f", "arguments": '{"doc": "a 社外秘 b"}'}], chunks=6)):
        for choice in chunk.choices:
            finishes.append(choice.finish_reason)
            for call in choice.delta.tool_calls or ():
                arguments += call.function.arguments or ""
    assert "社外秘" not in arguments and [f for f in finishes if f] == ["content_filter"]


async def test_responses_function_calls_and_refusals_are_redacted_whole_and_streamed(logged_gateway, admin_token, issuer):
    client = _v1(logged_gateway, issuer, await _guarded_app(logged_gateway, admin_token))
    calls = [{"name": "lookup", "arguments": '{"doc": "the 社外秘 plan"}'}]
    whole = await client.responses.create(model="gpt-4o-mini", input="q", **_sim(tool_calls=calls))
    assert whole.output[0].arguments == '{"doc": "the [redacted] plan"}'
    deltas, done, completed = "", None, None
    async for event in await client.responses.create(model="gpt-4o-mini", input="q", stream=True, **_sim(tool_calls=calls, chunks=8)):
        if event.type == "response.function_call_arguments.delta":
            deltas += event.delta
        elif event.type == "response.function_call_arguments.done":
            done = event.arguments
        elif event.type == "response.completed":
            completed = event.response
    assert deltas == done == completed.output[0].arguments == '{"doc": "the [redacted] plan"}'
    refused = await client.responses.create(model="gpt-4o-mini", input="q", **_sim(refusal="Not about Project Falcon."))
    assert refused.output[0].content[0].refusal == "Not about [redacted]."
    refusal = ""
    async for event in await client.responses.create(model="gpt-4o-mini", input="q", stream=True, **_sim(refusal="Not about Project Falcon.", chunks=7)):
        if event.type == "response.refusal.delta":
            refusal += event.delta
    assert refusal == "Not about [redacted]."


# Accounting that cannot be dodged ----------------------------------------------------------------
async def _usage(gw, admin_token, app_id, user=None) -> dict:
    path = f"{ADMIN}/usage/apps/{app_id}" + (f"/users/{user}" if user else "")
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin_token}"}) as session:
        async with session.get(gw.url + path) as response:
            assert response.status == 200
            return (await response.json())["metrics"]


async def test_n_without_max_tokens_is_reserved_for_every_answer(logged_gateway, admin_token, issuer):
    client = _azure(logged_gateway, issuer, await _put_app(logged_gateway, admin_token, {"app_limits": {"tokens_per_day": 2000}}))
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model="gpt-4o-mini", n=50, messages=[{"role": "user", "content": "hi"}])
    assert caught.value.code == "insufficient_quota"
    budget = _azure(logged_gateway, issuer, await _put_app(logged_gateway, admin_token, {"app_limits": {"spend_per_month": 0.002}}))
    with pytest.raises(openai.RateLimitError):
        await budget.chat.completions.create(model="gpt-4o-mini", n=50, messages=[{"role": "user", "content": "hi"}])
    legacy = _azure(logged_gateway, issuer, await _put_app(logged_gateway, admin_token, {"app_limits": {"tokens_per_day": 2000}}))
    with pytest.raises(openai.RateLimitError):
        await legacy.completions.create(model="gpt-4o-mini", prompt="hi", best_of=20, max_tokens=100)


async def test_user_limits_apply_to_an_app_that_names_no_user(logged_gateway, admin_token, issuer):
    app_id = await _put_app(logged_gateway, admin_token, {"user_limits": {"requests_per_minute": 1}})
    client = _azure(logged_gateway, issuer, app_id)
    if time.time() % 60 > 55:  # both calls in one minute window
        await asyncio.sleep(61 - time.time() % 60)
    await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.code == "rate_limit_exceeded" and "user" in caught.value.message


async def test_a_cut_stream_logs_the_usage_the_quota_was_charged(logged_gateway, admin_token, issuer):
    app_id = await _put_app(logged_gateway, admin_token, {"app_limits": {"tokens_per_day": 1_000_000}})
    token = issuer.mint(app_id)
    url = logged_gateway.url + "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"
    body = {"messages": [{"role": "user", "content": "tell me"}], "stream": True, "max_tokens": 200, "x_sim": {"break_after_chunks": 6}}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
        async with session.post(url, json=body) as response:
            request_id = response.headers["x-sekisho-request-id"]
            await response.read()
    record = await logged_gateway.log(request_id)
    usage = record["usage"]
    assert usage["estimated"] is True and usage["completion_tokens"] > 0 and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    deadline = time.monotonic() + 5
    while (charged := (await _usage(logged_gateway, admin_token, app_id))["tokens_per_day"]["used"]) != usage["total_tokens"] and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert charged == usage["total_tokens"]


# No secrets at rest ---------------------------------------------------------------------------------
DATA_SOURCES = [{"type": "azure_search", "parameters": {
    "endpoint": "https://search.example", "index_name": "docs",
    "authentication": {"type": "api_key", "key": "SEARCH-KEY-0123456789"},
    "embedding_dependency": {"type": "deployment_name", "deployment_name": "emb",
                             "authentication": {"type": "access_token", "access_token": "EMBED-TOKEN-abcdef"}},
    "connection_string": "AccountKey=CONN-SECRET-xyz"}}]


async def test_data_source_credentials_never_reach_the_log(logged_gateway, admin_token, issuer):
    client = _azure(logged_gateway, issuer, await _put_app(logged_gateway, admin_token, {"content_logging": "full"}))
    raw = await client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                                                 extra_body={"data_sources": DATA_SOURCES})
    record = await logged_gateway.log(raw.headers["x-sekisho-request-id"])
    text = str(record)
    for secret in ("SEARCH-KEY", "EMBED-TOKEN", "CONN-SECRET"):
        assert secret not in text
    parameters = record["parameters"]["data_sources"][0]["parameters"]
    assert parameters["authentication"] == {"type": "api_key", "key": MARKER} and parameters["index_name"] == "docs"


async def test_data_source_credentials_never_reach_the_cache(gateway, sqlite_path, admin_token, issuer):
    app_id = await _put_app(gateway, admin_token, {"cache": {"enabled": True}})
    client = _azure(gateway, issuer, app_id)
    for _ in range(2):
        raw = await client.chat.completions.with_raw_response.create(model="gpt-4o-mini", temperature=0, messages=[{"role": "user", "content": "cached"}],
                                                                     extra_body={"data_sources": DATA_SOURCES})
    assert raw.headers["x-sekisho-cache"] == "HIT"
    rows, deadline = [], time.monotonic() + 5
    while not rows and time.monotonic() < deadline:  # entries are written in batches, off the hot path
        await asyncio.sleep(0.1)
        with sqlite3.connect(sqlite_path) as db:
            rows = db.execute("SELECT doc FROM response_cache WHERE scope = ?", (app_id,)).fetchall()
    assert rows and not any("SEARCH-KEY" in row[0] or "EMBED-TOKEN" in row[0] for row in rows)


# Cache controls bounded by policy -------------------------------------------------------------------
async def test_a_client_ttl_cannot_outlive_the_policy_ttl(gateway, sqlite_path, admin_token, issuer):
    app_id = await _put_app(gateway, admin_token, {"cache": {"enabled": True, "ttl_seconds": 60}})
    client = _azure(gateway, issuer, app_id)
    await client.chat.completions.create(model="gpt-4o-mini", temperature=0, messages=[{"role": "user", "content": f"ttl {app_id}"}],
                                         extra_headers={"x-sekisho-cache-ttl": "2000000"})
    deadline = time.monotonic() + 5
    rows = []
    while not rows and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        with sqlite3.connect(sqlite_path) as db:
            rows = db.execute("SELECT expires_at FROM response_cache WHERE scope = ?", (app_id,)).fetchall()
    assert rows and rows[0][0] - time.time() <= 61


async def test_a_policy_can_scope_the_cache_per_user(logged_gateway, admin_token, issuer):
    app_id = await _put_app(logged_gateway, admin_token, {"trust_user_header": True, "cache": {"enabled": True, "per_user": True}})
    client = _azure(logged_gateway, issuer, app_id)
    question = {"model": "gpt-4o-mini", "temperature": 0, "messages": [{"role": "user", "content": f"per user {uuid.uuid4()}"}]}

    async def ask(user):
        raw = await client.chat.completions.with_raw_response.create(**question, extra_headers={"x-sekisho-user": user})
        return raw.headers["x-sekisho-cache"]

    assert await ask("alice") == "MISS"
    await asyncio.sleep(0.2)
    assert await ask("alice") == "HIT"
    assert await ask("bob") == "MISS"


def test_the_readme_lists_every_field_the_guards_read_and_write():
    """The README's guard section says exactly which fields are read and written: the table's."""
    from pathlib import Path

    from shared.operations import OPERATIONS

    readme = Path(__file__).resolve().parents[1].joinpath("README.md").read_text(encoding="utf-8")
    for operation in OPERATIONS:
        for path in (*operation.reads, *operation.writes):
            assert f"`{path}`" in readme, (operation.name, path)
    for kind in (kind for operation in OPERATIONS for kind in operation.stream_events):
        assert f"`{kind.rsplit('.', 1)[0]}.delta`" in readme, kind


async def test_a_cached_responses_answer_shows_the_client_instructions_not_the_injected_prompt(logged_gateway, admin_token, issuer):
    app_id = await _put_app(logged_gateway, admin_token, {"system_prompt": {"text": SYSTEM_PROMPT}, "cache": {"enabled": True}})
    client = _v1(logged_gateway, issuer, app_id)
    question = {"model": "gpt-4o-mini", "input": f"cached {uuid.uuid4()}", "temperature": 0, "instructions": "Be brief."}
    first = await client.responses.with_raw_response.create(**question)
    await asyncio.sleep(0.2)
    again = await client.responses.with_raw_response.create(**question)
    assert again.headers["x-sekisho-cache"] == "HIT"
    for raw in (first, again):
        assert raw.parse().instructions == "Be brief." and b"corporate discount" not in raw.content
    async for event in await client.responses.create(**question, stream=True):
        if hasattr(event, "response"):
            assert event.response.instructions == "Be brief."
