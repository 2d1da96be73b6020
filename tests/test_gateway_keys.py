"""Gateway keys for tools that can only send an api-key: the openai SDK with only a base URL and a
key, the app's policy applied, and a key that is never stored, logged or echoed."""
from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import time
import uuid

import aiohttp
import openai
import pytest
from openai import AsyncAzureOpenAI, AsyncOpenAI

from .conftest import _gateway_env
from .servers import ROOT, free_port, stop, wait_for_port

ADMIN = "/sekisho/admin"


async def _call(method, url, token, body=None):
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
        async with session.request(method, url, json=body) as response:
            return response.status, await response.json(content_type=None)


async def _app(gw, admin_token, keys=True, **settings) -> str:
    app_id = str(uuid.uuid4())
    status, body = await _call("PUT", f"{gw.url}{ADMIN}/policies/apps/{app_id}", admin_token,
                               {"name": "tool", "settings": {"gateway_keys": {"enabled": keys}, **settings}})
    assert status == 201, body
    return app_id


async def _key(gw, admin_token, app_id, **spec) -> tuple[str, dict]:
    status, body = await _call("POST", f"{gw.url}{ADMIN}/keys/apps/{app_id}", admin_token, {"name": "chat front end", **spec})
    assert status == 201, body
    return body.pop("key"), body


async def test_a_tool_with_only_url_and_key_works_end_to_end(logged_gateway, admin_token, issuer):
    app_id = await _app(logged_gateway, admin_token)
    key, doc = await _key(logged_gateway, admin_token, app_id)
    assert key.startswith("sekisho-gk-" + doc["id"] + "-") and len(key) > 60 and "hash" not in doc
    azure = AsyncAzureOpenAI(azure_endpoint=logged_gateway.url, api_key=key, api_version="2024-10-21", max_retries=0)
    raw = await azure.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert raw.parse().choices[0].message.content
    streamed = [c async for c in await azure.chat.completions.create(model="gpt-4o-mini", stream=True, messages=[{"role": "user", "content": "hi"}])]
    assert streamed
    assert (await azure.embeddings.create(model="text-embedding-3-small", input="key")).data
    v1 = AsyncOpenAI(base_url=logged_gateway.url + "/openai/v1", api_key=key, max_retries=0)
    assert (await v1.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])).choices
    record = await logged_gateway.log(raw.headers["x-sekisho-request-id"])
    assert record["app_id"] == app_id and record["gateway_key"] == doc["id"] and record["user_id"] == app_id
    assert key not in str(record) and key.split("-", 3)[3] not in str(record)
    listed = (await _call("GET", f"{logged_gateway.url}{ADMIN}/keys/apps/{app_id}", admin_token))[1]["data"]
    assert [k["id"] for k in listed] == [doc["id"]] and "key" not in listed[0] and "hash" not in listed[0]


async def test_an_entra_token_sent_as_api_key_is_validated_as_a_token(gateway, token):
    azure = AsyncAzureOpenAI(azure_endpoint=gateway.url, api_key=token, api_version="2024-10-21", max_retries=0)
    assert (await azure.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])).choices
    forged = AsyncAzureOpenAI(azure_endpoint=gateway.url, api_key=token[:-4] + "AAAA", api_version="2024-10-21", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        await forged.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.code == "invalid_token"


async def test_unknown_revoked_expired_and_disallowed_keys_are_refused(logged_gateway, admin_token):
    app_id = await _app(logged_gateway, admin_token)

    def client(key):
        return AsyncAzureOpenAI(azure_endpoint=logged_gateway.url, api_key=key, api_version="2024-10-21", max_retries=0)

    async def refused(key, why):
        with pytest.raises(openai.AuthenticationError) as caught:
            await client(key).chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        assert caught.value.code == "invalid_api_key" and why in caught.value.message, caught.value.message
        parts = key.split("-", 3)
        assert len(parts) < 4 or parts[3] not in caught.value.message  # the secret part is never echoed
        return caught.value

    key, doc = await _key(logged_gateway, admin_token, app_id)
    error = await refused(key[:-3] + "AAA", "not known")  # a wrong secret for a real key id
    record = await logged_gateway.log(error.response.headers["x-sekisho-request-id"])
    assert record["status"] == 401 and key not in str(record)
    await refused("sekisho-gk-000000000000-" + "A" * 43, "not known")
    await refused("sekisho-gk-nonsense", "not a gateway key")
    status, revoked = await _call("DELETE", f"{logged_gateway.url}{ADMIN}/keys/apps/{app_id}/{doc['id']}", admin_token)
    assert status == 200 and revoked["revoked_at"]
    await refused(key, "revoked")
    short, _ = await _key(logged_gateway, admin_token, app_id, expires_in_days=1.5 / 86400)
    await asyncio.sleep(2)
    await refused(short, "expired")
    closed_app = await _app(logged_gateway, admin_token, keys=False)
    closed, _ = await _key(logged_gateway, admin_token, closed_app)
    await refused(closed, "does not accept gateway keys")


async def test_a_key_narrower_than_its_app(gateway, admin_token):
    app_id = await _app(gateway, admin_token, trust_user_header=True)
    key, _ = await _key(gateway, admin_token, app_id, deployments=["gpt-4o-mini"], user="kiosk-7")
    azure = AsyncAzureOpenAI(azure_endpoint=gateway.url, api_key=key, api_version="2024-10-21", max_retries=0)
    assert (await azure.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])).choices
    with pytest.raises(openai.PermissionDeniedError) as caught:
        await azure.embeddings.create(model="text-embedding-3-small", input="outside the key")
    assert "gateway key may not use" in caught.value.message
    v1 = AsyncOpenAI(base_url=gateway.url + "/openai/v1", api_key=key, max_retries=0)
    assert [m.id for m in (await v1.models.list()).data] == ["gpt-4o-mini"]


async def test_repeated_failures_from_one_client_are_refused_but_valid_keys_still_work(gateway, admin_token):
    app_id = await _app(gateway, admin_token)
    key, _ = await _key(gateway, admin_token, app_id)
    url = gateway.url + "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"
    body = {"messages": [{"role": "user", "content": "hi"}]}
    statuses, times = [], []
    async with aiohttp.ClientSession() as session:
        for number in range(25):
            async with session.post(url, json=body, headers={"api-key": f"sekisho-gk-{number:012x}-" + "B" * 43}) as response:
                statuses.append(response.status)
                times.append(time.monotonic())
                if response.status == 429:
                    assert int(response.headers["Retry-After"]) >= 1
        await asyncio.sleep(1.1)  # a refused client gets one store lookup a second
        async with session.post(url, json=body, headers={"api-key": key}) as response:
            assert response.status == 200  # the app's own key is not locked out
    first_refusal = statuses.index(429)  # earlier tests on this gateway may have failed keys from this client too
    assert 0 < first_refusal <= 20 and set(statuses[:first_refusal]) == {401}
    # Once refused, the client gets one store lookup a second, no more: any later 401 comes at
    # least a second after the refusal or the lookup before it.
    looked_up = [times[first_refusal]] + [t for t, s in zip(times[first_refusal:], statuses[first_refusal:]) if s == 401]
    assert set(statuses[first_refusal:]) <= {401, 429}
    assert all(later - earlier >= 0.9 for earlier, later in zip(looked_up, looked_up[1:])), statuses


def _host(env: dict, data_dir, log_path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    full = {k: v for k, v in os.environ.items() if not k.startswith(("SEKISHO_", "AZURE_OPENAI_"))}
    full.update(env)
    with open(log_path, "ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "shared.local.host", "--port", str(port), "--no-seed", "--data-dir", str(data_dir)],
                                   cwd=ROOT, env=full, stdout=log, stderr=log)
    wait_for_port(port, process)
    return process, f"http://127.0.0.1:{port}"


async def test_rotation_overlap_and_revocation_across_instances(simulator, data_dir, tmp_path, admin_token):
    """Two instances on one store: a revoke through one is refused by the other within the cache
    time (SEKISHO_POLICY_CACHE_SECONDS, 1 s here); the key never reaches the store or the output."""
    database = tmp_path / "keys.db"
    env = {**_gateway_env(simulator), "SEKISHO_SQLITE_PATH": str(database), "SEKISHO_POLICY_CACHE_SECONDS": "1"}
    log_path = tmp_path / "hosts.log"
    first, first_url = _host(env, data_dir, log_path)
    second, second_url = _host(env, data_dir, log_path)
    try:
        gw = type("G", (), {"url": first_url})()
        app_id = await _app(gw, admin_token)
        key, doc = await _key(gw, admin_token, app_id)

        async def works(url, value) -> bool:
            client = AsyncAzureOpenAI(azure_endpoint=url, api_key=value, api_version="2024-10-21", max_retries=0)
            try:
                await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
                return True
            except openai.AuthenticationError:
                return False

        assert await works(second_url, key)
        status, rotated = await _call("POST", f"{first_url}{ADMIN}/keys/apps/{app_id}/{doc['id']}/rotate", admin_token, {"overlap_seconds": 3})
        assert status == 201 and rotated["rotated_from"] == doc["id"]
        new_key = rotated["key"]
        assert await works(first_url, key) and await works(first_url, new_key)  # the overlap: both work
        await asyncio.sleep(4.5)
        assert not await works(first_url, key) and not await works(second_url, key) and await works(second_url, new_key)
        status, _ = await _call("DELETE", f"{first_url}{ADMIN}/keys/apps/{app_id}/{rotated['id']}", admin_token)
        assert status == 200
        assert not await works(first_url, new_key)  # at once on the instance that revoked it
        started = time.monotonic()
        while await works(second_url, new_key):
            assert time.monotonic() - started < 2.5, "the other instance kept accepting a revoked key past its cache time"
            await asyncio.sleep(0.2)
        with sqlite3.connect(database) as db:
            dump = "\n".join(db.iterdump())
        assert key not in dump and new_key not in dump and key.split("-", 3)[3] not in dump
    finally:
        stop(first)
        stop(second)
    output = log_path.read_bytes().decode("utf-8", "replace")
    assert key not in output and new_key not in output
