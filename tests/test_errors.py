"""The errors the gateway raises itself: each in the OpenAI shape, each logged."""
from __future__ import annotations

import aiohttp
import openai
import pytest
from openai import AzureOpenAI

from .conftest import MAX_BODY_BYTES, _gateway_env
from .servers import free_port, start_local_host, stop

CHAT_PATH = "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"
_TOKEN: list[str] = []


@pytest.fixture(autouse=True)
def _token(token):
    _TOKEN[:] = [token]


async def _post(url: str, data: bytes | None = None, json=None, headers=None):
    """POST as the test app (its token is added unless `headers` carries an Authorization)."""
    headers = {"Authorization": f"Bearer {_TOKEN[0]}", **(headers or {})}
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=data, json=json, headers=headers) as response:
            return response.status, dict(response.headers), await response.json(content_type=None)


def _assert_error_shape(body: dict, code: str) -> None:
    error = body["error"]
    assert set(error) == {"message", "type", "code", "param"}
    assert error["code"] == code
    assert error["message"]


async def test_bad_json(logged_gateway):
    status, headers, body = await _post(logged_gateway.url + CHAT_PATH, data=b'{"messages": [', headers={"Content-Type": "application/json"})
    assert status == 400
    _assert_error_shape(body, "invalid_request")
    record = await logged_gateway.log(headers["x-sekisho-request-id"])
    assert record["status"] == 400 and record["error"]["code"] == "invalid_request"


@pytest.mark.parametrize(
    "path, body, param",
    [
        (CHAT_PATH, {"model": "x"}, "messages"),
        (CHAT_PATH, {"messages": "hello"}, "messages"),
        (CHAT_PATH, {"messages": []}, "messages"),
        (CHAT_PATH, {"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
        ("/openai/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, "model"),
        ("/openai/deployments/text-embedding-3-small/embeddings?api-version=2024-10-21", {}, "input"),
        ("/openai/responses?api-version=2025-04-01-preview", {"model": "gpt-4o-mini"}, "input"),
    ],
)
async def test_missing_or_wrong_fields(gateway, path, body, param):
    status, _, answer = await _post(gateway.url + path, json=body)
    assert status == 400
    _assert_error_shape(answer, "invalid_request")
    assert answer["error"]["param"] == param


async def test_body_not_an_object(gateway):
    status, _, answer = await _post(gateway.url + CHAT_PATH, json=[1, 2])
    assert status == 400 and answer["error"]["code"] == "invalid_request"


async def test_body_over_the_limit(logged_gateway):
    big = {"messages": [{"role": "user", "content": "x" * (MAX_BODY_BYTES + 10)}]}
    status, headers, answer = await _post(logged_gateway.url + CHAT_PATH, json=big)
    assert status == 413
    _assert_error_shape(answer, "request_too_large")
    record = await logged_gateway.log(headers["x-sekisho-request-id"])
    assert record["status"] == 413


async def test_body_over_the_limit_without_content_length(gateway):
    async def chunks():
        for _ in range(MAX_BODY_BYTES // 1000 + 2):
            yield b"x" * 1000

    status, _, answer = await _post(gateway.url + CHAT_PATH, data=chunks(), headers={"Content-Type": "application/json"})
    assert status == 413 and answer["error"]["code"] == "request_too_large"


async def test_unknown_route(gateway):
    # No function matches: in Azure the Functions host answers 404 itself (no catch-all route,
    # see function_app.py); the local host answers the same status with an OpenAI-shaped body.
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.url + "/openai/deployments/x/images/variations") as response:
            assert response.status == 404
            _assert_error_shape(await response.json(), "not_found")


def test_sdk_raises_its_usual_exceptions(gateway, token):
    client = AzureOpenAI(azure_endpoint=gateway.url, azure_ad_token=token, api_version="2024-10-21", max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="gpt-4o-mini", messages=[])
    assert caught.value.code == "invalid_request"
    with pytest.raises(openai.NotFoundError) as caught:  # upstream error passes through unchanged
        client.chat.completions.create(model="no-such-deployment", messages=[{"role": "user", "content": "x"}])
    assert caught.value.code == "DeploymentNotFound"


async def test_upstream_429_after_the_retry_budget(logged_gateway):
    body = {"messages": [{"role": "user", "content": "x"}], "x_sim": {"fail": 429, "retry_after_ms": 2500}}
    status, headers, answer = await _post(logged_gateway.url + CHAT_PATH, json=body)
    assert status == 429
    assert headers["Retry-After"] == "3" and headers["retry-after-ms"] == "2500"
    assert headers["x-should-retry"] == "false"  # the SDK must not retry what the gateway gave up on
    assert answer["error"]["code"] == "upstream_rate_limited"
    record = await logged_gateway.log(headers["x-sekisho-request-id"])
    assert record["status"] == 429 and record["attempts"] == [{"backend": "default", "status": 429, "ms": record["attempts"][0]["ms"]}]


async def test_upstream_5xx_after_the_retry_budget_is_502(gateway):
    status, headers, answer = await _post(gateway.url + CHAT_PATH, json={"messages": [{"role": "user", "content": "x"}], "x_sim": {"fail": 500}})
    assert status == 502 and answer["error"]["code"] == "upstream_error"
    assert "answered 500" in answer["error"]["message"] and headers["x-sekisho-backend"] == "default"


async def test_upstream_4xx_passes_through(gateway):
    status, _, answer = await _post(gateway.url + "/openai/deployments/nope/chat/completions?api-version=2024-10-21",
                                    json={"messages": [{"role": "user", "content": "x"}]})
    assert status == 404 and answer["error"]["code"] == "DeploymentNotFound"


async def test_upstream_too_slow_is_504(logged_gateway):
    body = {"messages": [{"role": "user", "content": "x"}], "x_sim": {"latency_ms": 4000}}
    status, headers, answer = await _post(logged_gateway.url + CHAT_PATH, json=body)
    assert status == 504
    _assert_error_shape(answer, "upstream_timeout")
    record = await logged_gateway.log(headers["x-sekisho-request-id"])
    assert record["status"] == 504 and record["error"]["code"] == "upstream_timeout"


async def test_upstream_unreachable_is_502(simulator, tmp_path, data_dir):
    dead = free_port()  # nothing listens here
    env = _gateway_env(simulator, AZURE_OPENAI_ENDPOINT=f"http://127.0.0.1:{dead}", SEKISHO_SQLITE_PATH=str(tmp_path / "d.db"),
                       SEKISHO_ALLOW_UNREGISTERED_APPS="true")
    host = start_local_host(env, data_dir)
    try:
        status, _, answer = await _post(host.url + CHAT_PATH, json={"messages": [{"role": "user", "content": "x"}]})
    finally:
        stop(host.process)
    assert status == 502
    _assert_error_shape(answer, "upstream_error")
