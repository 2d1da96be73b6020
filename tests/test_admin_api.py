"""The admin API on both stores: policies with ETags, precedence, 403s, log filters."""
from __future__ import annotations

import uuid

import aiohttp
import pytest

from .conftest import ADMIN_APP_ID, TEST_APP_ID

ADMIN = "/sekisho/admin"
CHAT = "/openai/deployments/{deployment}/chat/completions?api-version=2024-10-21"


class Client:
    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.headers = {"Authorization": f"Bearer {token}"}

    async def request(self, method: str, path: str, json=None, headers=None):
        async with aiohttp.ClientSession() as session:
            async with session.request(method, self.url + path, json=json, headers={**self.headers, **(headers or {})}) as response:
                body = await response.json(content_type=None) if response.status != 204 else None
                return response.status, response.headers, body

    async def chat(self, deployment="gpt-4o-mini", headers=None):
        return await self.request("POST", CHAT.format(deployment=deployment), {"messages": [{"role": "user", "content": "hi"}]}, headers)


@pytest.fixture
def admin(logged_gateway, admin_token):
    return Client(logged_gateway.url, admin_token)


def _app_id() -> str:
    return str(uuid.uuid4())


async def test_register_app_then_call(admin, issuer, logged_gateway):
    app_id = _app_id()
    caller = Client(logged_gateway.url, issuer.mint(app_id))
    status, _, body = await caller.chat()
    assert status == 403 and "not registered" in body["error"]["message"]
    status, headers, doc = await admin.request("PUT", f"{ADMIN}/policies/apps/{app_id}", {"name": "HR bot", "settings": {"allowed_deployments": ["gpt-4o-mini"]}})
    assert status == 201 and headers["ETag"] == doc["etag"]
    assert doc["kind"] == "app" and doc["name"] == "HR bot" and doc["updated_by"] == ADMIN_APP_ID
    status, _, _ = await caller.chat()
    assert status == 200  # the admin change is effective at once on this instance
    status, _, body = await caller.chat("text-embedding-3-small")
    assert status == 403 and "may not use the deployment" in body["error"]["message"]
    status, _, models = await caller.request("GET", "/openai/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == ["gpt-4o-mini"]
    status, _, models = await caller.request("GET", "/openai/models")
    assert [m["id"] for m in models["data"]] == ["gpt-4o-mini"]


async def test_disable_app_and_user(admin, issuer, logged_gateway):
    app_id = _app_id()
    await admin.request("PUT", f"{ADMIN}/policies/apps/{app_id}", {"name": "x", "settings": {"trust_user_header": True}})
    caller = Client(logged_gateway.url, issuer.mint(app_id))
    status, _, _ = await caller.chat(headers={"x-sekisho-user": "alice"})
    assert status == 200
    await admin.request("PUT", f"{ADMIN}/policies/apps/{app_id}/users/alice", {"settings": {"enabled": False}})
    status, _, body = await caller.chat(headers={"x-sekisho-user": "alice"})
    assert status == 403 and "user is disabled" in body["error"]["message"]
    status, _, _ = await caller.chat(headers={"x-sekisho-user": "bob"})
    assert status == 200
    await admin.request("PUT", f"{ADMIN}/policies/apps/{app_id}", {"name": "x", "settings": {"enabled": False}})
    status, headers, body = await caller.chat(headers={"x-sekisho-user": "bob"})
    assert status == 403 and "application is disabled" in body["error"]["message"]
    assert (await logged_gateway.log(headers["x-sekisho-request-id"]))["status"] == 403


async def test_precedence_defaults_app_user(admin, issuer, logged_gateway):
    app_id = _app_id()
    await admin.request("PUT", f"{ADMIN}/policies/apps/{app_id}", {"name": "p", "settings": {"trust_user_header": True, "content_logging": "redacted"}})
    await admin.request("PUT", f"{ADMIN}/policies/apps/{app_id}/users/carol", {"settings": {"content_logging": "metadata"}})
    caller = Client(logged_gateway.url, issuer.mint(app_id))
    _, headers, _ = await caller.chat(headers={"x-sekisho-user": "dave"})
    dave = await logged_gateway.log(headers["x-sekisho-request-id"])
    assert dave["content_logging"] == "redacted"  # app overrides the built-in default (full)
    assert dave["prompt"]["messages"][0]["content"] == "[redacted 2 chars]"
    assert dave["prompt"]["messages"][0]["role"] == "user"
    _, headers, _ = await caller.chat(headers={"x-sekisho-user": "carol"})
    carol = await logged_gateway.log(headers["x-sekisho-request-id"])
    assert carol["content_logging"] == "metadata" and carol["prompt"] is None and carol["response"] is None  # user overrides app
    assert carol["usage"]["total_tokens"] > 0  # metadata is still logged


async def test_untrusted_app_cannot_name_users(admin, issuer, logged_gateway):
    app_id = _app_id()
    await admin.request("PUT", f"{ADMIN}/policies/apps/{app_id}", {"name": "u", "settings": {"trust_user_header": False}})
    _, headers, _ = await Client(logged_gateway.url, issuer.mint(app_id)).chat(headers={"x-sekisho-user": "mallory"})
    record = await logged_gateway.log(headers["x-sekisho-request-id"])
    assert record["user_id"] == app_id and record["claimed_user_ignored"] is True


async def test_etag_conflicts(admin):
    app_id = _app_id()
    path = f"{ADMIN}/policies/apps/{app_id}"
    status, headers, first = await admin.request("PUT", path, {"name": "v1"}, headers={"If-None-Match": "*"})
    assert status == 201
    status, _, body = await admin.request("PUT", path, {"name": "again"}, headers={"If-None-Match": "*"})
    assert status == 409 and body["error"]["code"] == "conflict"
    status, _, second = await admin.request("PUT", path, {"name": "v2"}, headers={"If-Match": first["etag"]})
    assert status == 200 and second["name"] == "v2"
    status, _, body = await admin.request("PUT", path, {"name": "stale"}, headers={"If-Match": first["etag"]})
    assert status == 412 and body["error"]["code"] == "precondition_failed"
    status, _, body = await admin.request("DELETE", path, headers={"If-Match": first["etag"]})
    assert status == 412
    status, headers, current = await admin.request("GET", path)
    assert status == 200 and current["name"] == "v2" and headers["ETag"] == second["etag"]
    status, _, _ = await admin.request("DELETE", path, headers={"If-Match": second["etag"]})
    assert status == 204
    status, _, body = await admin.request("GET", path)
    assert status == 404 and body["error"]["code"] == "not_found"


@pytest.mark.parametrize(
    "body, message",
    [
        ({"settings": {"enabled": "maybe"}}, "settings.enabled"),
        ({"settings": {"retention_days": 0}}, "settings.retention_days"),
        ({"settings": {"content_logging": "all"}}, "settings.content_logging"),
        ({"settings": {"colour": "blue"}}, "settings.colour"),
        ({"settings": {"allowed_deployments": [""]}}, "settings.allowed_deployments.0"),
        ([1, 2], "JSON object"),
    ],
)
async def test_invalid_policies_are_refused_with_the_field_named(admin, body, message):
    status, _, answer = await admin.request("PUT", f"{ADMIN}/policies/apps/{_app_id()}", body)
    assert status == 400 and answer["error"]["code"] == "invalid_request"
    assert message in answer["error"]["message"]


async def test_invalid_ids_are_refused(admin):
    status, _, answer = await admin.request("PUT", f"{ADMIN}/policies/apps/bad%20id!", {"name": "x"})
    assert status == 400 and "app id" in answer["error"]["message"]


async def test_defaults_layer(admin, issuer, logged_gateway):
    status, _, _ = await admin.request("PUT", f"{ADMIN}/policies/defaults", {"settings": {"retention_days": 7}})
    assert status in (200, 201)
    try:
        _, headers, _ = await Client(logged_gateway.url, issuer.mint(TEST_APP_ID)).chat()
        assert (await logged_gateway.log(headers["x-sekisho-request-id"]))["ttl"] == 7 * 86400
    finally:
        await admin.request("DELETE", f"{ADMIN}/policies/defaults")


async def test_list_policies(admin):
    app_id = _app_id()
    await admin.request("PUT", f"{ADMIN}/policies/apps/{app_id}", {"name": "listed"})
    await admin.request("PUT", f"{ADMIN}/policies/apps/{app_id}/users/u1", {"settings": {"enabled": True}})
    status, _, listing = await admin.request("GET", f"{ADMIN}/policies?app_id={app_id}")
    assert status == 200 and [d["kind"] for d in listing["data"]] == ["app", "user"]
    assert listing["data"][1]["user_id"] == "u1"


async def test_non_admin_is_forbidden(logged_gateway, token):
    caller = Client(logged_gateway.url, token)
    for method, path in (("GET", f"{ADMIN}/policies"), ("PUT", f"{ADMIN}/policies/defaults"), ("GET", f"{ADMIN}/logs")):
        status, _, body = await caller.request(method, path, {} if method == "PUT" else None)
        assert status == 403 and body["error"]["code"] == "forbidden" and "Sekisho.Admin" in body["error"]["message"]
    status, _, body = await Client(logged_gateway.url, "x.y.z").request("GET", f"{ADMIN}/policies")
    assert status == 401


async def test_admin_filters_logs_by_app_and_user(admin, issuer, logged_gateway):
    app_id = _app_id()
    await admin.request("PUT", f"{ADMIN}/policies/apps/{app_id}", {"name": "logs", "settings": {"trust_user_header": True}})
    caller = Client(logged_gateway.url, issuer.mint(app_id))
    ids = {}
    for user in ("erin", "frank", "erin"):
        _, headers, _ = await caller.chat(headers={"x-sekisho-user": user})
        ids.setdefault(user, []).append(headers["x-sekisho-request-id"])
    for request_id in ids["erin"] + ids["frank"]:
        await logged_gateway.log(request_id)
    status, _, listing = await admin.request("GET", f"{ADMIN}/logs?app_id={app_id}&user_id=erin")
    assert status == 200 and sorted(r["id"] for r in listing["data"]) == sorted(ids["erin"])
    assert all(r["app_name"] == "logs" for r in listing["data"])
    status, _, record = await admin.request("GET", f"{ADMIN}/logs/{ids['frank'][0]}")
    assert status == 200 and record["user_id"] == "frank"
    status, _, _ = await admin.request("GET", f"{ADMIN}/logs?status=abc")
    assert status == 400


async def test_admin_routes_refuse_what_their_document_calls_invalid(gateway, admin_token):
    """What the schema fuzzer found: inputs the OpenAPI document calls invalid are refused with 400
    (not ignored, stored as something else, or answered 412/500), and charts work for every group."""
    url = gateway.url + ADMIN
    app_id = str(uuid.uuid4())
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin_token}"}) as session:
        async def status(method: str, path: str, **kwargs) -> int:
            async with session.request(method, url + path, **kwargs) as response:
                if response.status == 400:
                    assert (await response.json())["error"]["type"] == "invalid_request_error"
                return response.status

        for by in ("app", "user", "deployment", "model", "operation", "day", "cost_centre", "owner"):
            assert await status("GET", f"/reports/chart?by={by}") == 200, by  # operation and the chargeback groups answered 500
        refused = [
            ("GET", "/reports/usage?until="), ("GET", "/reports/usage?since=2026-13-01"), ("GET", "/reports/usage?metric=null"),
            ("GET", "/logs?user_id="), ("GET", "/logs?app_id=bad%0Aid"), ("GET", "/logs?since="), ("GET", "/logs?cursor="),
            ("GET", "/exports/logs?deployment="), ("GET", "/alerts?app_id="), ("GET", "/policies?app_id="),
            ("GET", "/keys/apps/%C2%84"), ("GET", "/reports/usage?format=null"), ("GET", "/logs?cursor=no-place"), ("GET", "/logs?since=0001-01-01T00:00:00%2B05:00"), ("GET", "/logs?cache="),
        ]
        for method, path in refused:
            assert await status(method, path) == 400, path
        body = {"name": "x", "settings": {}}
        assert await status("PUT", f"/policies/apps/{app_id}", json=body, headers={"If-None-Match": "{}"}) == 400
        assert await status("PUT", f"/policies/apps/{app_id}", json=body, headers={"If-Match": ""}) == 412  # no ETag matches an empty list
        # JSON types as the document states them: "5" is not a number, "yes" not a boolean; 5.0 is an integer.
        assert await status("PUT", f"/policies/apps/{app_id}", json={"settings": {"app_limits": {"requests_per_minute": "5"}}}) == 400
        assert await status("PUT", f"/policies/apps/{app_id}", json={"settings": {"trust_user_header": "yes"}}) == 400
        assert await status("PUT", f"/policies/apps/{app_id}", json={"settings": {"app_limits": {"requests_per_minute": 5.5}}}) == 400
        assert await status("PUT", f"/policies/apps/{app_id}", json=body, headers={"If-None-Match": "*"}) == 201
        assert await status("PUT", f"/policies/apps/{app_id}", json={"settings": {"app_limits": {"requests_per_minute": 5.0}}}) == 200
        rule = {"id": "r1", "pattern": "secret"}
        assert await status("PUT", f"/policies/apps/{app_id}", json={"settings": {"guards": {"rules": [rule, rule]}}}) == 409  # ids are unique
        assert await status("PUT", f"/policies/apps/{app_id}", json={"settings": {"guards": {"rules": [{"id": "r2", "pattern": "..."}]}}}) == 400  # a word needs a letter
        assert await status("PUT", f"/policies/apps/{app_id}", json={"settings": {"budget_alerts": {"thresholds_percent": [0]}}}) == 400
        async with session.get(f"{url}/policies/apps/{app_id}") as response:
            assert (await response.json())["settings"]["app_limits"]["requests_per_minute"] == 5
        assert await status("PUT", "/pricing/contract-model", json={"input_per_1m": 1, "batch_discount": False}) == 400  # not stored as 0
        assert await status("PUT", "/pricing/contract-model", json={"input_per_1m": 1, "batch_discount": 0}) == 200
        assert await status("POST", f"/usage/apps/{app_id}/reset", json={"metrics": None}) == 400
        assert await status("POST", f"/usage/apps/{app_id}/reset", json=[1]) == 400
        assert await status("POST", f"/usage/apps/{app_id}/reset") == 200
        backend = {"name": "b", "endpoint": "https://example.openai.azure.com"}
        assert await status("PUT", "/deployments/contract-dep", json={"backends": [{**backend, "v1_routes": 0}]}) == 400
        assert await status("PUT", "/deployments/contract-dep", json={"backends": [{**backend, "priority": "2"}]}) == 400
        assert await status("PUT", "/deployments/contract-dep", json={"backends": [backend, backend]}) == 409  # names are unique
        assert await status("PUT", "/deployments/contract-dep", json={"backends": [backend]}) == 200
        assert await status("DELETE", "/deployments/contract-dep") == 204
        async with session.post(f"{url}/keys/apps/{app_id}", json={"name": "k"}) as response:
            key_id = (await response.json())["id"]
        assert await status("POST", f"/keys/apps/{app_id}/{key_id}/rotate", json=[None]) == 400
        assert await status("POST", f"/keys/apps/{app_id}/{key_id}/rotate", data=b"null", headers={"content-type": "application/json"}) == 400
        assert await status("POST", f"/usage/apps/{app_id}/reset", data=b"null", headers={"content-type": "application/json"}) == 200  # the document allows null
        assert await status("GET", "/reports/usage?app_id=") == 400
        assert await status("POST", f"/keys/apps/{app_id}/{key_id}/rotate", json={"overlap_seconds": 105.0}) == 201
