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
        # Optional fields the gateway reads must have their documented type, streamed or not.
        (CHAT_PATH, {"messages": [{"role": "user", "content": "x"}], "user": {"id": "x"}}, "user"),
        (CHAT_PATH, {"messages": [{"role": "user", "content": "x"}], "stream_options": "usage"}, "stream_options"),
        (CHAT_PATH, {"messages": [{"role": "user", "content": "x"}], "n": 2.5}, "n"),
        (CHAT_PATH, {"messages": [{"role": "user", "content": "x"}], "n": 129}, "n"),
        (CHAT_PATH, {"messages": [{"role": "user", "content": "x"}], "user": "u" * 129}, "user"),
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


@pytest.mark.parametrize("items, param", [([[1, 2]], "input[0]"), ([{"role": "user", "content": "x"}, "x"], "input[1]")])
async def test_azure_refusing_a_field_it_owns_passes_through_marked_as_relayed(gateway, items, param):
    """The gateway reads `input` only as text; Azure refuses items that are not input items (the
    simulator as Azure does, where it used to answer 500). The client gets Azure's 400, and
    x-sekisho-backend says it was relayed, not the gateway's own refusal."""
    status, headers, answer = await _post(gateway.url + "/openai/v1/responses", json={"model": "gpt-4o-mini", "input": items})
    assert status == 400 and headers["x-sekisho-backend"] == "default"
    assert answer["error"]["code"] == "invalid_type" and answer["error"]["param"] == param


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


async def test_a_whole_number_written_with_a_decimal_point_is_a_whole_number(gateway):
    """JSON (and the document's JSON Schema) does not tell 2 from 2.0: the gateway refuses neither,
    and the quota estimate counts n: 2.0 as two answers (tests/test_quota.py checks the arithmetic).
    Azure itself wants an integer: its 400 is relayed (x-sekisho-backend set), as the simulator does."""
    body = {"messages": [{"role": "user", "content": "x"}], "n": 2.0, "max_tokens": 16}
    status, headers, answer = await _post(gateway.url + CHAT_PATH, json=body)
    assert status == 400 and headers["x-sekisho-backend"] == "default"
    assert answer["error"]["code"] == "invalid_type" and answer["error"]["param"] == "n"


@pytest.mark.parametrize("query", ["limit=0", "limit=1001", "limit=ten", "limit=-1"])
@pytest.mark.parametrize("listing", ["/openai/v1/files", "/openai/batches?api-version=2024-10-21"])
async def test_list_page_sizes_outside_the_document_are_refused(gateway, listing, query):
    url = gateway.url + listing + ("&" if "?" in listing else "?") + query
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {_TOKEN[0]}"}) as session:
        async with session.get(url) as response:
            assert response.status == 400
            answer = await response.json()
    _assert_error_shape(answer, "invalid_request")
    assert answer["error"]["param"] == "limit"


@pytest.mark.parametrize("header, value", [("x-sekisho-cache-ttl", "soon"), ("x-sekisho-cache-ttl", "0"), ("x-sekisho-cache", "sometimes")])
async def test_malformed_cache_headers_are_refused_even_when_nothing_would_be_cached(gateway, header, value):
    """temperature unset: not cacheable, so the headers would not have mattered; still refused."""
    status, _, answer = await _post(gateway.url + CHAT_PATH, json={"messages": [{"role": "user", "content": "x"}]}, headers={header: value})
    assert status == 400
    _assert_error_shape(answer, "invalid_request")
    assert answer["error"]["param"] == header


async def test_a_user_named_longer_than_a_user_id_is_refused_not_cut(gateway):
    """Cut to 128 characters, two users sharing their first 128 would share one user's limits."""
    body = {"messages": [{"role": "user", "content": "x"}]}
    status, _, answer = await _post(gateway.url + CHAT_PATH, json=body, headers={"x-sekisho-user": "u" * 129})
    assert status == 400 and answer["error"]["param"] == "x-sekisho-user"
    status, _, answer = await _post(gateway.url + CHAT_PATH, json=body, headers={"x-sekisho-user": "u" * 128})
    assert status == 200, answer
