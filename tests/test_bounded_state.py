"""What a client can name does not grow the gateway's state, and names with control characters
are refused (400) wherever a client gives one: a path segment, `model`, a job id."""
from __future__ import annotations

import asyncio

import aiohttp
import pytest

from shared.upstream.backends import MAX_DEPLOYMENTS_KEPT, BackendPool, Circuit

from .servers import put_app

CHAT = "/chat/completions?api-version=2024-10-21"
BODY = {"messages": [{"role": "user", "content": "hi"}]}


async def _post(session, url, body=BODY):
    async with session.post(url, json=body) as answer:
        return answer.status, await answer.json(content_type=None)


@pytest.mark.parametrize("path, body, param", [
    ("/openai/deployments/gpt%0A4o/chat/completions?api-version=2024-10-21", BODY, "deployment"),
    ("/openai/deployments/gpt%004o/chat/completions?api-version=2024-10-21", BODY, "deployment"),
    ("/openai/v1/chat/completions", {**BODY, "model": "gpt-4o-mini\u0007"}, "model"),
    ("/openai/v1/chat/completions", {**BODY, "model": "gpt\u0085mini"}, "model"),
])
async def test_names_with_control_characters_are_refused(gateway, token, path, body, param):
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
        status, answer = await _post(session, gateway.url + path, body)
    assert status == 400 and answer["error"]["code"] == "invalid_request" and answer["error"]["param"] == param


async def test_object_and_job_ids_with_control_characters_are_refused(gateway, token):
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
        for path, param in (("/openai/files/file-a%0Ab", "file_id"), ("/openai/v1/responses/resp_%1B", "response_id"),
                            ("/sekisho/jobs/job%0A1", "job_id")):
            async with session.get(gateway.url + path) as answer:
                body = await answer.json(content_type=None)
                assert answer.status == 400 and body["error"]["param"] == param, (path, body)


async def test_invented_deployment_names_leave_no_state(gateway, admin_token, issuer):
    app_id = await put_app(gateway.url, admin_token, {"allowed_deployments": ["*"], "retry": {"max_attempts": 1}})
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {issuer.mint(app_id)}"}) as session:
        assert (await _post(session, f"{gateway.url}/openai/deployments/gpt-4o-mini{CHAT}"))[0] == 200
        for start in range(0, 300, 50):
            await asyncio.gather(*(_post(session, f"{gateway.url}/openai/deployments/invented-{n}{CHAT}") for n in range(start, start + 50)))
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin_token}"}) as session:
        async with session.get(f"{gateway.url}/sekisho/admin/deployments") as answer:
            listed = await answer.json()
    names = {entry["deployment"] for entry in listed["health"]}
    assert "gpt-4o-mini" in names  # a deployment the gateway knows keeps its health
    assert not any(name.startswith("invented-") for name in names), names


async def test_without_a_deployment_list_the_state_is_capped():
    class NoCatalogue:
        async def get_deployment(self, name):
            return None

    pool = BackendPool(NoCatalogue(), "http://upstream", "key", Circuit(5, 10), 60)
    for n in range(MAX_DEPLOYMENTS_KEPT * 3):
        await pool.backends(f"name-{n}")
    assert len(pool.status()) == MAX_DEPLOYMENTS_KEPT
    assert {entry["deployment"] for entry in pool.status()} == {f"name-{n}" for n in range(MAX_DEPLOYMENTS_KEPT * 2, MAX_DEPLOYMENTS_KEPT * 3)}
    known = BackendPool(NoCatalogue(), "http://upstream", "key", Circuit(5, 10), 60, known_deployments=("gpt-4o-mini",))
    await known.backends("gpt-4o-mini")
    await known.backends("made-up")
    assert [entry["deployment"] for entry in known.status()] == ["gpt-4o-mini"]
