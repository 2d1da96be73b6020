"""Retries, backend failover and circuit breaking, against two simulators as two backends."""
from __future__ import annotations

import asyncio
import time
import uuid

import aiohttp
import openai
import pytest
from openai import AsyncAzureOpenAI

from shared.upstream.backends import KeyVaultKeyAuth

from .conftest import _gateway_env
from .servers import start_local_host, start_simulator, stop

ADMIN = "/sekisho/admin"
CHAT = "/openai/deployments/{d}/chat/completions?api-version=2024-10-21"


@pytest.fixture(scope="module")
def backends_setup(tmp_path_factory, data_dir):
    a, b = start_simulator(), start_simulator()
    path = str(tmp_path_factory.mktemp("resilience") / "r.db")
    env = _gateway_env(a, SEKISHO_SQLITE_PATH=path, SEKISHO_BACKEND_KEY_SIM=a.api_key,
                       SEKISHO_CIRCUIT_FAILURES="2", SEKISHO_CIRCUIT_OPEN_SECONDS="1.5", SEKISHO_POLICY_CACHE_SECONDS="0.2")
    host = start_local_host(env, data_dir)
    yield host, a, b
    for process in (host.process, a.process, b.process):
        stop(process)


async def _admin(url, token, method, path, body=None):
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
        async with session.request(method, url + path, json=body) as response:
            return response.status, (await response.json(content_type=None) if response.status != 204 else None)


async def _setup(host, a, b, admin_token, issuer, retry=None, limits=None, priority_b=2):
    """A fresh deployment name served by backends a (priority 1) and b, and an app for it."""
    name = "dep-" + uuid.uuid4().hex[:8]
    catalogue = {"backends": [
        {"name": "a", "endpoint": a.url, "deployment": "gpt-4o-mini", "priority": 1, "auth": "api_key_env", "api_key_env": "SEKISHO_BACKEND_KEY_SIM"},
        {"name": "b", "endpoint": b.url, "deployment": "gpt-4o-mini", "priority": priority_b, "auth": "api_key_env", "api_key_env": "SEKISHO_BACKEND_KEY_SIM"},
    ]}
    status, _ = await _admin(host.url, admin_token, "PUT", f"{ADMIN}/deployments/{name}", catalogue)
    assert status == 200
    app_id = str(uuid.uuid4())
    settings = {"retry": retry or {"max_attempts": 4, "time_budget_seconds": 10, "base_delay_ms": 100, "max_delay_seconds": 2}}
    if limits:
        settings["app_limits"] = limits
    status, _ = await _admin(host.url, admin_token, "PUT", f"{ADMIN}/policies/apps/{app_id}", {"name": "resilient", "settings": settings})
    assert status == 201
    return name, issuer.mint(app_id), app_id


async def _chat(host, token, deployment, stream=False):
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
        body = {"messages": [{"role": "user", "content": "hi"}], "stream": stream}
        async with session.post(host.url + CHAT.format(d=deployment), json=body) as response:
            text = await response.read()
            return response.status, response.headers, text


def _received(sim, deployment="gpt-4o-mini", since=0.0):
    return [r for r in sim.received() if r["deployment"] == deployment and r["t"] >= since]


async def test_429_then_success_honours_retry_after(backends_setup, admin_token, issuer):
    host, a, b = backends_setup
    name, token, _ = await _setup(host, a, b, admin_token, issuer)
    # both backends throttle once: a, then b at once, then a again after its Retry-After
    since = time.time()
    a.inject(429, count=1, retry_after_ms=400)
    b.inject(429, count=1, retry_after_ms=400)
    status, headers, _ = await _chat(host, token, name)
    assert status == 200
    assert headers["x-sekisho-retries"] == "2"
    calls = sorted([("a", r["t"], r["status"]) for r in _received(a, since=since)] + [("b", r["t"], r["status"]) for r in _received(b, since=since)], key=lambda c: c[1])
    assert [c[2] for c in calls] == [429, 429, 200]
    assert calls[1][1] - calls[0][1] < 0.2  # failover to b at once
    assert calls[2][1] - calls[0][1] >= 0.39  # then waited out a's Retry-After, measured at the simulator


async def test_failover_to_the_second_backend(backends_setup, admin_token, issuer):
    host, a, b = backends_setup
    name, token, _ = await _setup(host, a, b, admin_token, issuer)
    a.inject(429, count=1, retry_after_ms=5000)
    started = time.monotonic()
    status, headers, _ = await _chat(host, token, name)
    assert status == 200 and headers["x-sekisho-backend"] == "b" and headers["x-sekisho-retries"] == "1"
    assert time.monotonic() - started < 1.0  # did not wait for a's 5 s


async def test_budget_exhausted_is_upstream_rate_limited(backends_setup, admin_token, issuer):
    host, a, b = backends_setup
    name, token, _ = await _setup(host, a, b, admin_token, issuer, retry={"max_attempts": 5, "time_budget_seconds": 1})
    a.inject(429, count=3, retry_after_ms=4000)
    b.inject(429, count=3, retry_after_ms=4000)
    status, headers, body = await _chat(host, token, name)
    assert status == 429 and b"upstream_rate_limited" in body
    assert 3 <= int(headers["Retry-After"]) <= 4 and headers["x-should-retry"] == "false"
    a.reset(), b.reset()


async def test_circuit_opens_and_closes(backends_setup, admin_token, issuer):
    host, a, b = backends_setup
    name, token, _ = await _setup(host, a, b, admin_token, issuer)
    a.inject(500, count=2)
    for _ in range(2):  # a fails, b answers; twice: a's circuit opens (threshold 2)
        status, headers, _ = await _chat(host, token, name)
        assert status == 200 and headers["x-sekisho-backend"] == "b"
    since = time.time()
    for _ in range(3):
        status, headers, _ = await _chat(host, token, name)
        assert headers["x-sekisho-backend"] == "b"
    assert _received(a, since=since) == []  # open: a is not even asked
    await asyncio.sleep(1.6)
    status, headers, _ = await _chat(host, token, name)
    assert status == 200 and headers["x-sekisho-backend"] == "a"  # the probe succeeded: closed again
    _, catalogue = await _admin(host.url, admin_token, "GET", f"{ADMIN}/deployments")
    health = {h["backend"]: h["circuit"] for h in catalogue["health"] if h["deployment"] == name}
    assert health == {"a": "closed", "b": "closed"}


async def test_stream_is_retried_before_its_first_byte(backends_setup, admin_token, issuer):
    host, a, b = backends_setup
    name, token, _ = await _setup(host, a, b, admin_token, issuer, priority_b=1)
    a.inject(503, count=1)
    b.inject(503, count=1)
    status, headers, body = await _chat(host, token, name, stream=True)
    assert status == 200 and body.endswith(b"data: [DONE]\n\n")
    assert int(headers["x-sekisho-retries"]) >= 1


async def test_sdk_retries_do_not_multiply_and_quota_is_reserved_once(backends_setup, admin_token, issuer):
    host, a, b = backends_setup
    name, token, app_id = await _setup(host, a, b, admin_token, issuer, retry={"max_attempts": 2, "time_budget_seconds": 5},
                                       limits={"requests_per_minute": 100})
    since = time.time()
    a.inject(429, count=10, retry_after_ms=100)
    b.inject(429, count=10, retry_after_ms=100)
    client = AsyncAzureOpenAI(azure_endpoint=host.url, azure_ad_token=token, api_version="2024-10-21")  # SDK default: 2 retries
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}])
    assert caught.value.code == "upstream_rate_limited"
    assert len(_received(a, since=since)) + len(_received(b, since=since)) == 2  # the gateway's 2 attempts, once
    _, usage = await _admin(host.url, admin_token, "GET", f"{ADMIN}/usage/apps/{app_id}")
    assert usage["metrics"]["requests_per_minute"]["used"] == 1  # one logical request
    a.reset(), b.reset()


async def test_catalogue_validation(backends_setup, admin_token):
    host, *_ = backends_setup
    status, body = await _admin(host.url, admin_token, "PUT", f"{ADMIN}/deployments/x", {"backends": [{"name": "k", "endpoint": "https://x", "auth": "key_vault"}]})
    assert status == 400 and "key_vault_secret" in body["error"]["message"]
    status, body = await _admin(host.url, admin_token, "PUT", f"{ADMIN}/deployments/x", {"backends": [{"name": "k", "endpoint": "ftp://x"}]})
    assert status == 400


async def test_key_vault_key_is_fetched_once_and_cached():
    calls = []

    class FakeSecrets:
        def __init__(self, vault):
            self.vault = vault

        async def get_secret(self, name):
            calls.append((self.vault, name))
            return type("Secret", (), {"value": "k3y"})()

    auth = KeyVaultKeyAuth("https://myvault.vault.azure.net/secrets/aoai-key", client_factory=FakeSecrets)
    results = await asyncio.gather(*(auth.headers() for _ in range(10)))
    assert all(r == {"api-key": "k3y"} for r in results)
    assert calls == [("https://myvault.vault.azure.net", "aoai-key")]


async def test_every_backend_paused_is_502_with_retry_after_not_429(backends_setup, admin_token, issuer):
    host, a, b = backends_setup
    name = "solo-" + uuid.uuid4().hex[:8]
    catalogue = {"backends": [{"name": "a", "endpoint": a.url, "deployment": "gpt-4o-mini", "auth": "api_key_env", "api_key_env": "SEKISHO_BACKEND_KEY_SIM"}]}
    assert (await _admin(host.url, admin_token, "PUT", f"{ADMIN}/deployments/{name}", catalogue))[0] == 200
    app_id = str(uuid.uuid4())
    assert (await _admin(host.url, admin_token, "PUT", f"{ADMIN}/policies/apps/{app_id}", {"name": "solo", "settings": {"retry": {"max_attempts": 1}}}))[0] == 201
    token = issuer.mint(app_id)
    a.inject(500, count=2)
    for _ in range(2):  # two failures in a row: a's circuit opens (threshold 2)
        status, _, _ = await _chat(host, token, name)
        assert status == 502
    since = time.time()
    status, headers, body = await _chat(host, token, name)
    assert status == 502 and b"upstream_error" in body and b"circuit open" in body  # an outage, not throttling
    assert 1 <= int(headers["Retry-After"]) <= 2 and headers["x-should-retry"] == "false"
    assert _received(a, since=since) == []  # refused fast, without asking
    await asyncio.sleep(1.6)
    status, _, _ = await _chat(host, token, name)
    assert status == 200  # the probe went through: closed again
