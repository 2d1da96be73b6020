"""Who may call: Entra-shaped tokens through the local host, every attack refused with 401."""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid

import aiohttp
import openai
import pytest
from cryptography.hazmat.primitives import serialization
from openai import AzureOpenAI

from shared.local.issuer import new_key

from .conftest import TEST_APP_ID

CHAT = "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"
BODY = {"messages": [{"role": "user", "content": "hi"}]}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _forge(header: dict, payload: dict, signature: bytes = b"") -> str:
    head = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(payload).encode())
    return head + "." + _b64(signature)


def _claims(token: str) -> dict:
    part = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


async def _call(url: str, token: str | None, body=BODY, headers=None, path=CHAT):
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    async with aiohttp.ClientSession() as session:
        async with session.post(url + path, json=body, headers=sent) as response:
            return response.status, response.headers, await response.json()


_OTHER_KEY = []


def _other_key():
    if not _OTHER_KEY:
        _OTHER_KEY.append(new_key())  # RSA key generation is slow: once per run
    return _OTHER_KEY[0]


def _attacks(issuer):
    now = int(time.time())
    valid = issuer.mint(TEST_APP_ID)
    claims = _claims(valid)
    header = {"alg": "RS256", "kid": issuer.keys[-1].kid, "typ": "JWT"}
    public_pem = issuer.keys[-1].private_key().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    hs_head = _b64(json.dumps({**header, "alg": "HS256"}).encode()) + "." + _b64(json.dumps(claims).encode())
    hs256 = hs_head + "." + _b64(hmac.new(public_pem, hs_head.encode(), hashlib.sha256).digest())
    head, payload, signature = valid.split(".")
    tampered = head + "." + _b64(json.dumps({**claims, "azp": str(uuid.uuid4())}).encode()) + "." + signature
    other = _other_key()
    unknown_kid = __import__("jwt").encode(claims, other.private_key(), algorithm="RS256", headers={"kid": other.kid})
    other_tenant = str(uuid.uuid4())
    return {
        "no token": (None, "Missing credentials"),
        "malformed": ("not-a-jwt", "not a JWT"),
        "garbage segments": ("a.b.c", "base64url"),
        "expired": (issuer.mint(TEST_APP_ID, exp=now - 600, iat=now - 4000, nbf=now - 4000), "expired"),
        "not yet valid": (issuer.mint(TEST_APP_ID, nbf=now + 900, iat=now), "not valid yet"),
        "wrong audience": (issuer.mint(TEST_APP_ID, audience="api://someone-else"), "audience"),
        "wrong issuer": (issuer.mint(TEST_APP_ID, iss=f"https://evil.example/{issuer.tenant_id}/v2.0"), "issuer"),
        "other tenant": (issuer.mint(TEST_APP_ID, tid=other_tenant, iss=f"https://login.microsoftonline.com/{other_tenant}/v2.0"), "tenant"),
        "unknown kid": (unknown_kid, "key (kid)"),
        "alg none": (_forge({"alg": "none", "typ": "JWT"}, claims), "'none' is not accepted"),
        "HS256 with the public key": (hs256, "'HS256' is not accepted"),
        "tampered payload": (tampered, "signature"),
        "no app claim": (issuer.mint(TEST_APP_ID, azp=None), "client application"),
    }


ATTACKS = ["no token", "malformed", "garbage segments", "expired", "not yet valid", "wrong audience", "wrong issuer",
           "other tenant", "unknown kid", "alg none", "HS256 with the public key", "tampered payload", "no app claim"]


@pytest.mark.parametrize("attack", ATTACKS)
async def test_attacks_get_401_invalid_token(logged_gateway, issuer, attack):
    token, expected = _attacks(issuer)[attack]
    status, headers, body = await _call(logged_gateway.url, token)
    assert status == 401, body
    assert body["error"]["code"] == "invalid_token"
    assert expected in body["error"]["message"]
    assert headers["WWW-Authenticate"].startswith("Bearer")
    record = await logged_gateway.log(headers["x-sekisho-request-id"])
    assert record["status"] == 401 and record["error"]["code"] == "invalid_token"
    if token:
        assert token not in json.dumps(record)  # tokens never reach the log


@pytest.mark.parametrize("version", ["1.0", "2.0"])
@pytest.mark.parametrize("delegated", [False, True])
async def test_app_only_and_delegated_tokens_of_both_versions(logged_gateway, issuer, version, delegated):
    user = str(uuid.uuid4()) if delegated else None
    token = issuer.mint(TEST_APP_ID, version=version, user_oid=user)
    status, headers, body = await _call(logged_gateway.url, token)
    assert status == 200, body
    record = await logged_gateway.log(headers["x-sekisho-request-id"])
    assert record["app_id"] == TEST_APP_ID
    assert record["tenant_id"] == issuer.tenant_id
    assert record["user_id"] == (user if delegated else TEST_APP_ID)
    assert token not in json.dumps(record)


async def test_trusted_app_names_its_end_user(logged_gateway, issuer):
    token = issuer.mint(TEST_APP_ID)
    status, headers, _ = await _call(logged_gateway.url, token, headers={"x-sekisho-user": "slack:U123"})
    assert status == 200
    assert (await logged_gateway.log(headers["x-sekisho-request-id"]))["user_id"] == "slack:U123"
    status, headers, _ = await _call(logged_gateway.url, token, body={**BODY, "user": "line:abc"})
    assert (await logged_gateway.log(headers["x-sekisho-request-id"]))["user_id"] == "line:abc"


async def test_delegated_user_cannot_be_overridden_by_header(logged_gateway, issuer):
    user = str(uuid.uuid4())
    status, headers, _ = await _call(logged_gateway.url, issuer.mint(TEST_APP_ID, user_oid=user), headers={"x-sekisho-user": "someone-else"})
    assert status == 200
    assert (await logged_gateway.log(headers["x-sekisho-request-id"]))["user_id"] == user


def test_sdk_with_azure_ad_token_provider(gateway, issuer):
    calls = []

    def provider() -> str:
        calls.append(1)
        return issuer.mint(TEST_APP_ID)

    client = AzureOpenAI(azure_endpoint=gateway.url, azure_ad_token_provider=provider, api_version="2024-10-21", max_retries=0)
    assert client.chat.completions.create(model="gpt-4o-mini", messages=BODY["messages"]).choices[0].message.content
    assert calls
    bad = AzureOpenAI(azure_endpoint=gateway.url, azure_ad_token="x.y.z", api_version="2024-10-21", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        bad.chat.completions.create(model="gpt-4o-mini", messages=BODY["messages"])
    assert caught.value.code == "invalid_token"


async def test_unregistered_app_is_forbidden(logged_gateway, issuer):
    status, headers, body = await _call(logged_gateway.url, issuer.mint(str(uuid.uuid4())))
    assert status == 403 and body["error"]["code"] == "forbidden"
    assert "not registered" in body["error"]["message"]
    assert (await logged_gateway.log(headers["x-sekisho-request-id"]))["status"] == 403


async def test_easy_auth_header_is_ignored_unless_enabled(gateway, issuer):
    principal = base64.b64encode(json.dumps({
        "auth_typ": "aad", "claims": [{"typ": "azp", "val": TEST_APP_ID},
                                      {"typ": "http://schemas.microsoft.com/identity/claims/tenantid", "val": issuer.tenant_id}],
    }).encode()).decode()
    status, _, body = await _call(gateway.url, None, headers={"X-MS-CLIENT-PRINCIPAL": principal})
    assert status == 401 and body["error"]["code"] == "invalid_token"


async def test_easy_auth_principal_when_enabled(simulator, tmp_path, issuer, data_dir):
    from shared.store.sqlite import SqliteStore

    from .conftest import _gateway_env, _seed, run_async
    from .servers import start_local_host, stop

    path = str(tmp_path / "easy.db")
    run_async(_seed(SqliteStore(path)))
    host = start_local_host(_gateway_env(simulator, SEKISHO_SQLITE_PATH=path, SEKISHO_EASY_AUTH_ENABLED="true"), data_dir)
    user = str(uuid.uuid4())
    principal = base64.b64encode(json.dumps({
        "auth_typ": "aad", "name_typ": "name", "role_typ": "http://schemas.microsoft.com/ws/2008/06/identity/claims/role",
        "claims": [
            {"typ": "azp", "val": TEST_APP_ID},
            {"typ": "http://schemas.microsoft.com/identity/claims/tenantid", "val": issuer.tenant_id},
            {"typ": "http://schemas.microsoft.com/identity/claims/objectidentifier", "val": user},
            {"typ": "http://schemas.microsoft.com/identity/claims/scope", "val": "user_impersonation"},
        ],
    }).encode()).decode()
    try:
        status, headers, body = await _call(host.url, None, headers={"X-MS-CLIENT-PRINCIPAL": principal})
        assert status == 200, body
        # a bearer token still works when no principal header is present
        status, _, _ = await _call(host.url, issuer.mint(TEST_APP_ID))
        assert status == 200
        status, _, body = await _call(host.url, None, headers={"X-MS-CLIENT-PRINCIPAL": "bm90IGpzb24="})
        assert status == 401 and "client principal" in body["error"]["message"]
        # A browser sign-in to the admin page: ID-token claims (aud, oid, roles), no client app.
        def browser(roles):
            return base64.b64encode(json.dumps({"auth_typ": "aad", "role_typ": "roles", "claims": [
                {"typ": "aud", "val": "gateway-client-id"}, {"typ": "tid", "val": issuer.tenant_id},
                {"typ": "http://schemas.microsoft.com/identity/claims/objectidentifier", "val": user},
                *({"typ": "roles", "val": r} for r in roles)]}).encode()).decode()
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{host.url}/sekisho/admin", headers={"X-MS-CLIENT-PRINCIPAL": browser(["Sekisho.Admin"])}) as response:
                assert response.status == 200 and "Sekisho admin" in await response.text()
            async with session.get(f"{host.url}/sekisho/admin", headers={"X-MS-CLIENT-PRINCIPAL": browser([])}) as response:
                assert response.status == 403
            # A browser sign-in reads only: no change (cross-site requests carry its cookie), no model call.
            async with session.post(f"{host.url}/sekisho/admin/cache/apps/{TEST_APP_ID}/purge", headers={"X-MS-CLIENT-PRINCIPAL": browser(["Sekisho.Admin"])}) as response:
                assert response.status == 403
        status, _, body = await _call(host.url, None, headers={"X-MS-CLIENT-PRINCIPAL": browser(["Sekisho.Admin"])})
        assert status == 401 and "admin page only" in body["error"]["message"]
    finally:
        stop(host.process)
    store = SqliteStore(path)
    await store.open()
    for _ in range(100):
        record = await store.get_log(headers["x-sekisho-request-id"])
        if record:
            break
        await __import__("asyncio").sleep(0.05)
    await store.close()
    assert record["user_id"] == user and record["app_id"] == TEST_APP_ID
