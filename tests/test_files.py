"""Files belong to the app that uploaded them: listed (paginated, filtered), read and deleted by
that app alone; another app's file id is 404 wherever it is named, before the upstream."""
from __future__ import annotations


import openai
import pytest
from openai import AsyncAzureOpenAI, AsyncOpenAI

from .servers import put_app

ADMIN = "/sekisho/admin"


async def _app(gw, admin_token) -> str:
    return await put_app(gw.url, admin_token, {}, "files")


def _v1(gw, issuer, app_id) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=gw.url + "/openai/v1", api_key=issuer.mint(app_id), max_retries=0)


async def test_upload_read_list_and_delete_own_files(logged_gateway, admin_token, issuer):
    client = _v1(logged_gateway, issuer, await _app(logged_gateway, admin_token))
    uploaded = [await client.files.create(file=(f"notes-{i}.txt", f"note {i}".encode(), "text/plain"), purpose="assistants") for i in range(3)]
    data = await client.files.create(file=("data.jsonl", b'{"a": 1}\n', "application/jsonl"), purpose="user_data")
    assert (await client.files.retrieve(uploaded[0].id)).filename == "notes-0.txt"
    assert (await client.files.content(uploaded[1].id)).content == b"note 1"
    listed = [f.id for f in (await client.files.list()).data]
    assert listed == [data.id, *(f.id for f in reversed(uploaded))]  # newest first, only this app's
    page = await client.files.list(limit=2)
    assert [f.id for f in page.data] == listed[:2] and page.has_more
    rest = await client.files.list(limit=10, after=page.data[-1].id)
    assert [f.id for f in rest.data] == listed[2:] and not rest.has_more
    assert [f.id for f in (await client.files.list(purpose="user_data")).data] == [data.id]
    await client.files.delete(uploaded[0].id)
    with pytest.raises(openai.NotFoundError):
        await client.files.retrieve(uploaded[0].id)
    assert uploaded[0].id not in [f.id for f in (await client.files.list()).data]
    azure = AsyncAzureOpenAI(azure_endpoint=logged_gateway.url, azure_ad_token=issuer.mint(await _app(logged_gateway, admin_token)),
                             api_version="2025-04-01-preview", max_retries=0)
    own = await azure.files.create(file=("a.txt", b"azure", "text/plain"), purpose="assistants")
    assert (await azure.files.retrieve(own.id)).id == own.id


async def test_another_apps_file_is_404_wherever_it_is_named(logged_gateway, admin_token, issuer):
    owner = _v1(logged_gateway, issuer, await _app(logged_gateway, admin_token))
    intruder = _v1(logged_gateway, issuer, await _app(logged_gateway, admin_token))
    secret = await owner.files.create(file=("secret.txt", b"quarterly numbers", "text/plain"), purpose="assistants")
    assert (await intruder.files.list()).data == []
    for attempt in (lambda: intruder.files.retrieve(secret.id), lambda: intruder.files.content(secret.id),
                    lambda: intruder.files.delete(secret.id)):
        with pytest.raises(openai.NotFoundError):
            await attempt()
    with pytest.raises(openai.NotFoundError) as caught:
        await intruder.responses.create(model="gpt-4o-mini", input=[{"role": "user", "content": [
            {"type": "input_text", "text": "summarise"}, {"type": "input_file", "file_id": secret.id}]}])
    record = await logged_gateway.log(caught.value.response.headers["x-sekisho-request-id"])
    assert record["status"] == 404 and record["backend"] is None
    with pytest.raises(openai.NotFoundError):
        await intruder.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": [
            {"type": "text", "text": "summarise"}, {"type": "file", "file": {"file_id": secret.id}}]}])
    assert (await owner.files.content(secret.id)).content == b"quarterly numbers"

