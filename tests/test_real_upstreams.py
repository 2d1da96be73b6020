"""Upstreams that are not the simulator's best behaviour: streams without a content type or usage,
finish_reason inside delta, bare [DONE], no v1 routes, old api-versions; a circuit that judges
backends, not paths; and the local host's children."""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import aiohttp
import openai
import pytest
from openai import AsyncAzureOpenAI, AsyncOpenAI

from .conftest import _gateway_env
from .servers import ROOT, free_port, start_local_host, stop, wait_for_port

ADMIN = "/sekisho/admin"
QUIRKS = "no_content_type,no_usage,finish_in_delta,bare_done,no_v1"


def _start_quirky_simulator(quirks: str = QUIRKS):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "shared.local.simulator", "--port", str(port), "--quirks", quirks,
                                "--chunk-interval-ms", "30"], cwd=ROOT, env={**os.environ, "SEKISHO_SIMULATOR_API_KEY": "quirky-key"})
    wait_for_port(port, process)
    return process, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def quirky(tmp_path_factory, data_dir):
    """A local host in front of a simulator with every quirk on; its default backend claims v1."""
    process, url = _start_quirky_simulator()
    path = str(tmp_path_factory.mktemp("quirky") / "q.db")
    env = {**_gateway_env(type("S", (), {"url": url, "api_key": "quirky-key"})()), "SEKISHO_SQLITE_PATH": path,
           "SEKISHO_BACKEND_KEY_QUIRKY": "quirky-key", "SEKISHO_DEPLOYMENTS": "gpt-4o-mini,gpt-4o,text-embedding-3-small",
           "SEKISHO_CIRCUIT_FAILURES": "2", "SEKISHO_CIRCUIT_OPEN_SECONDS": "30"}
    host = start_local_host(env, data_dir)
    yield host, url
    stop(host.process)
    stop(process)


async def _admin(method, url, admin_token, body=None):
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin_token}"}) as session:
        async with session.request(method, url, json=body) as response:
            return response.status, await response.json(content_type=None)


async def _app(host, admin_token, settings=None) -> str:
    app_id = str(uuid.uuid4())
    status, body = await _admin("PUT", f"{host.url}{ADMIN}/policies/apps/{app_id}", admin_token,
                                {"name": "quirky", "settings": {"retry": {"max_attempts": 4, "time_budget_seconds": 5}, **(settings or {})}})
    assert status == 201, body
    return app_id


async def _usage(host, admin_token, app_id) -> dict:
    status, body = await _admin("GET", f"{host.url}{ADMIN}/usage/apps/{app_id}", admin_token)
    assert status == 200
    return body["metrics"]


async def _log(host, admin_token, request_id, timeout=10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status, record = await _admin("GET", f"{host.url}{ADMIN}/logs/{request_id}", admin_token)
        if status == 200 or time.monotonic() > deadline:
            assert status == 200, record
            return record
        await asyncio.sleep(0.05)


async def _charged(host, admin_token, app_id, expected) -> int:
    deadline = time.monotonic() + 5
    while (used := (await _usage(host, admin_token, app_id))["tokens_per_day"]["used"]) != expected and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return used


# Streams that do not say they are streams -----------------------------------------------------------
async def test_a_stream_without_content_type_or_usage_is_relayed_and_counted(quirky, admin_token, issuer):
    host, _ = quirky
    app_id = await _app(host, admin_token, {"app_limits": {"tokens_per_day": 1_000_000}})
    body = {"messages": [{"role": "user", "content": "Tell me about the checkpoint on the old highway."}], "stream": True,
            "x_sim": {"chunk_interval_ms": 40}}
    url = host.url + "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"
    arrivals, raw = [], b""
    started = time.monotonic()
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {issuer.mint(app_id)}"}) as session:
        async with session.post(url, json=body) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            request_id = response.headers["x-sekisho-request-id"]
            async for chunk in response.content.iter_any():
                arrivals.append(time.monotonic() - started)
                raw += chunk
    assert len(arrivals) > 5 and arrivals[-1] - arrivals[0] > 0.5  # streamed as it came, not read whole
    assert raw.endswith(b"data: [DONE]\n\n") and b"\n[DONE]" not in raw.replace(b"data: [DONE]", b"")
    assert b'"finish_reason":"stop"' in raw and b'"delta":{"finish_reason"' not in raw
    record = await _log(host, admin_token, request_id)
    usage = record["usage"]
    assert usage["estimated"] is True and usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    streamed = "".join(line for line in record["response"]["choices"][0]["text"])
    assert streamed and "data:" not in streamed and record["response"]["choices"][0]["finish_reason"] == "stop"
    assert await _charged(host, admin_token, app_id, usage["total_tokens"]) == usage["total_tokens"]


async def test_the_openai_sdk_reads_such_a_stream_to_its_end(quirky, admin_token, issuer):
    host, _ = quirky
    client = AsyncAzureOpenAI(azure_endpoint=host.url, azure_ad_token=issuer.mint(await _app(host, admin_token)), api_version="2024-10-21", max_retries=0)
    finish, text = None, ""
    async for chunk in await client.chat.completions.create(model="gpt-4o-mini", stream=True, messages=[{"role": "user", "content": "hi"}]):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    assert text and finish == "stop"


async def test_a_whole_answer_without_usage_is_counted_and_log_quota_and_cost_agree(quirky, admin_token, issuer):
    host, _ = quirky
    app_id = await _app(host, admin_token, {"app_limits": {"tokens_per_day": 1_000_000}})
    client = AsyncAzureOpenAI(azure_endpoint=host.url, azure_ad_token=issuer.mint(app_id), api_version="2024-10-21", max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hello there"}])
    record = await _log(host, admin_token, raw.headers["x-sekisho-request-id"])
    usage = record["usage"]
    assert usage["estimated"] is True and usage["completion_tokens"] > 0
    assert float(raw.headers["x-sekisho-cost"]) == pytest.approx(record["cost"]["amount"]) and record["cost"]["amount"] > 0
    assert await _charged(host, admin_token, app_id, usage["total_tokens"]) == usage["total_tokens"]


# Old api-versions keep streaming -------------------------------------------------------------------
async def test_an_old_api_version_streams_without_stream_options_and_is_counted(logged_gateway, admin_token, issuer):
    status, _ = await _admin("PUT", f"{logged_gateway.url}{ADMIN}/policies/apps/{(app_id := str(uuid.uuid4()))}", admin_token, {"name": "old", "settings": {}})
    assert status == 201
    client = AsyncAzureOpenAI(azure_endpoint=logged_gateway.url, azure_ad_token=issuer.mint(app_id), api_version="2024-02-01", max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(model="gpt-4o-mini", stream=True, messages=[{"role": "user", "content": "old"}])
    text = "".join([chunk.choices[0].delta.content or "" async for chunk in raw.parse() if chunk.choices])
    assert text
    record = await logged_gateway.log(raw.headers["x-sekisho-request-id"])
    assert record["status"] == 200 and "stream_options" not in record["parameters"]
    assert record["usage"]["estimated"] is True and record["usage"]["completion_tokens"] > 0


async def test_the_simulator_refuses_stream_options_on_old_api_versions_as_azure_does(simulator):
    async with aiohttp.ClientSession(headers={"api-key": simulator.api_key}) as session:
        url = f"{simulator.url}/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-02-01"
        async with session.post(url, json={"messages": [{"role": "user", "content": "x"}], "stream": True, "stream_options": {"include_usage": True}}) as response:
            body = await response.json()
    assert response.status == 400 and "Unrecognized request argument supplied: stream_options" in body["error"]["message"]


# Backends without v1 routes, and a circuit that judges backends ----------------------------------------
async def test_v1_calls_go_to_the_deployment_routes_of_a_backend_without_v1(quirky, admin_token, issuer):
    host, url = quirky
    status, body = await _admin("PUT", f"{host.url}{ADMIN}/deployments/gpt-4o-mini", admin_token, {"backends": [
        {"name": "old-resource", "endpoint": url, "auth": "api_key_env", "api_key_env": "SEKISHO_BACKEND_KEY_QUIRKY", "v1_routes": False}]})
    assert status in (200, 201), body
    try:
        client = AsyncOpenAI(base_url=host.url + "/openai/v1", api_key=issuer.mint(await _app(host, admin_token)), max_retries=0)
        answer = await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "v1 please"}])
        assert answer.choices[0].message.content
        reply = await client.responses.create(model="gpt-4o-mini", input="v1 responses")
        assert reply.output_text
    finally:
        await _admin("DELETE", f"{host.url}{ADMIN}/deployments/gpt-4o-mini", admin_token)


async def test_v1_calls_failing_on_one_path_do_not_pause_a_healthy_deployment(quirky, admin_token, issuer):
    """The default backend claims v1 but the server has none: each v1 call gets the server's empty
    500 at once (no retries, no circuit), and Azure-style calls on other deployments go on."""
    host, _ = quirky
    token = issuer.mint(await _app(host, admin_token))
    v1 = AsyncOpenAI(base_url=host.url + "/openai/v1", api_key=token, max_retries=0)
    for _ in range(4):
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as caught:
            await v1.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "v1"}])
        assert caught.value.status_code == 500 and time.monotonic() - started < 1.0
    azure = AsyncAzureOpenAI(azure_endpoint=host.url, azure_ad_token=token, api_version="2024-10-21", max_retries=0)
    for deployment in ("gpt-4o", "gpt-4o-mini"):
        started = time.monotonic()
        answer = await azure.chat.completions.create(model=deployment, messages=[{"role": "user", "content": "healthy"}])
        assert answer.choices[0].message.content and time.monotonic() - started < 1.0


async def test_when_every_backend_is_paused_the_answer_is_an_immediate_502(quirky, admin_token, issuer):
    host, url = quirky
    status, body = await _admin("PUT", f"{host.url}{ADMIN}/deployments/gpt-4o", admin_token, {"backends": [
        {"name": "failing", "endpoint": url, "auth": "api_key_env", "api_key_env": "SEKISHO_BACKEND_KEY_QUIRKY"}]})
    assert status in (200, 201), body
    token = issuer.mint(await _app(host, admin_token))
    chat = host.url + "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
    failing = {"messages": [{"role": "user", "content": "x"}], "x_sim": {"fail": 503}}
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
            async with session.post(chat, json=failing) as response:  # two failures open the circuit (SEKISHO_CIRCUIT_FAILURES=2)
                assert response.status == 502
            started = time.monotonic()
            async with session.post(chat, json={"messages": [{"role": "user", "content": "now"}]}) as response:
                body = await response.json()
                elapsed = time.monotonic() - started
                assert response.status == 502 and body["error"]["code"] == "upstream_error" and "paused" in body["error"]["message"]
                assert int(response.headers["Retry-After"]) >= 1
            assert elapsed < 0.5
    finally:
        await _admin("DELETE", f"{host.url}{ADMIN}/deployments/gpt-4o", admin_token)


# Tools and structured outputs from the simulator, through the gateway ---------------------------------
async def test_tools_offered_are_called_with_schema_valid_arguments(gateway, token):
    client = AsyncAzureOpenAI(azure_endpoint=gateway.url, azure_ad_token=token, api_version="2024-10-21", max_retries=0)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
                 "type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
                 "required": ["city", "unit"], "additionalProperties": False}}},
             {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}}]
    messages = [{"role": "user", "content": "Weather in Tokyo?"}]
    answer = await client.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=tools)
    call = answer.choices[0].message.tool_calls[0]
    assert answer.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    import json

    arguments = json.loads(call.function.arguments)
    assert set(arguments) == {"city", "unit"} and arguments["unit"] in ("c", "f")
    both = await client.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=tools, tool_choice="required")
    assert [c.function.name for c in both.choices[0].message.tool_calls] == ["get_weather", "get_time"]
    named = await client.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=tools,
                                                 tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert [c.function.name for c in named.choices[0].message.tool_calls] == ["get_time"]
    none = await client.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=tools, tool_choice="none")
    assert none.choices[0].message.content and not none.choices[0].message.tool_calls
    after = await client.chat.completions.create(model="gpt-4o-mini", tools=tools, messages=[
        *messages, {"role": "assistant", "tool_calls": [call.model_dump()]}, {"role": "tool", "tool_call_id": call.id, "content": "sunny"}])
    assert after.choices[0].message.content and after.choices[0].finish_reason == "stop"
    streamed = ""
    async for chunk in await client.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=tools, stream=True):
        for delta_call in (chunk.choices[0].delta.tool_calls or ()) if chunk.choices else ():
            streamed += delta_call.function.arguments or ""
    assert json.loads(streamed) == arguments


async def test_structured_outputs_parse_with_the_openai_sdk(gateway, token):
    from pydantic import BaseModel

    class Trip(BaseModel):
        city: str
        nights: int
        tags: list[str]
        refundable: bool

    client = AsyncAzureOpenAI(azure_endpoint=gateway.url, azure_ad_token=token, api_version="2024-10-21", max_retries=0)
    parsed = await client.beta.chat.completions.parse(model="gpt-4o-mini", messages=[{"role": "user", "content": "Plan a trip"}], response_format=Trip)
    assert isinstance(parsed.choices[0].message.parsed, Trip)
    plain = await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "json"}], response_format={"type": "json_object"})
    import json

    assert isinstance(json.loads(plain.choices[0].message.content), dict)
    v1 = AsyncOpenAI(base_url=gateway.url + "/openai/v1", api_key=token, max_retries=0)
    reply = await v1.responses.parse(model="gpt-4o-mini", input="Plan a trip", text_format=Trip)
    assert isinstance(reply.output_parsed, Trip)
    called = await v1.responses.create(model="gpt-4o-mini", input="weather?", tools=[
        {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}])
    assert called.output[0].type == "function_call" and "city" in json.loads(called.output[0].arguments)


# The local host's children ---------------------------------------------------------------------
def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_no_child_outlives_the_local_host(tmp_path, how):
    port, simulator_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SEKISHO_", "AZURE_OPENAI_"))}
    env["SEKISHO_SIMULATOR_PORT"] = str(simulator_port)
    host = subprocess.Popen([sys.executable, "-m", "shared.local.host", "--port", str(port), "--quiet", "--no-seed", "--data-dir", str(tmp_path)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, host)
        assert _listening(simulator_port)  # the simulator runs on the port the setting names
        listing = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        ours = [line for line in listing.splitlines() if "shared.local.simulator" in line and f"--port {simulator_port}" in line]
        assert ours and not any("--api-key" in line for line in ours)  # the key is not in the process list
        host.send_signal(how)
        host.wait(timeout=15)
        deadline = time.monotonic() + 5
        while _listening(simulator_port) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _listening(simulator_port)
    finally:
        if host.poll() is None:
            host.kill()
