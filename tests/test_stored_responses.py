"""Stored responses belong to the app that made them: retrieve, delete, input items and cancel
for the owner only, previous_response_id checked before anything reaches the upstream, the
injected system prompt never shown back."""
from __future__ import annotations


import openai
import pytest
from openai import AsyncAzureOpenAI, AsyncOpenAI

from .servers import put_app

ADMIN = "/sekisho/admin"
SYSTEM_PROMPT = "You are the internal travel desk; the discount table is confidential and never shown."


async def _app(gw, admin_token, settings=None) -> str:
    return await put_app(gw.url, admin_token, settings, "stored")


def _v1(gw, issuer, app_id) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=gw.url + "/openai/v1", api_key=issuer.mint(app_id), max_retries=0)


async def test_the_owner_retrieves_lists_input_and_deletes_its_response(logged_gateway, admin_token, issuer):
    client = _v1(logged_gateway, issuer, await _app(logged_gateway, admin_token))
    created = await client.responses.create(model="gpt-4o-mini", input="remember the checkpoint")
    fetched = await client.responses.retrieve(created.id)
    assert fetched.id == created.id and fetched.output_text == created.output_text
    items = await client.responses.input_items.list(created.id)
    assert items.data and items.data[0].content[0].text == "remember the checkpoint"
    follow = await client.responses.create(model="gpt-4o-mini", input="and then?", previous_response_id=created.id)
    assert follow.output_text
    await client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(created.id)
    azure = AsyncAzureOpenAI(azure_endpoint=logged_gateway.url, azure_ad_token=issuer.mint((await _app(logged_gateway, admin_token))),
                             api_version="2025-04-01-preview", max_retries=0)
    own = await azure.responses.create(model="gpt-4o-mini", input="azure style")
    assert (await azure.responses.retrieve(own.id)).id == own.id


async def test_another_apps_response_is_404_everywhere(logged_gateway, admin_token, issuer):
    owner = _v1(logged_gateway, issuer, await _app(logged_gateway, admin_token))
    intruder = _v1(logged_gateway, issuer, await _app(logged_gateway, admin_token))
    created = await owner.responses.create(model="gpt-4o-mini", input="private conversation")
    for attempt in (lambda: intruder.responses.retrieve(created.id),
                    lambda: intruder.responses.delete(created.id),
                    lambda: intruder.responses.input_items.list(created.id),
                    lambda: intruder.responses.cancel(created.id)):
        with pytest.raises(openai.NotFoundError) as caught:
            await attempt()
        assert caught.value.code == "not_found" and "for this application" in caught.value.message
    with pytest.raises(openai.NotFoundError) as caught:
        await intruder.responses.create(model="gpt-4o-mini", input="continue theirs", previous_response_id=created.id)
    assert caught.value.response.request.url.path.endswith("/responses")
    record = await logged_gateway.log(caught.value.response.headers["x-sekisho-request-id"])
    assert record["status"] == 404 and record["backend"] is None  # refused before anything reached the upstream
    assert (await owner.responses.retrieve(created.id)).id == created.id  # still there for its owner


async def test_a_stored_response_never_shows_the_injected_system_prompt(logged_gateway, admin_token, issuer):
    client = _v1(logged_gateway, issuer, await _app(logged_gateway, admin_token, {"system_prompt": {"text": SYSTEM_PROMPT}}))
    created = await client.responses.create(model="gpt-4o-mini", input="hi", instructions="Be brief.")
    raw = await client.responses.with_raw_response.retrieve(created.id)
    assert raw.parse().instructions == "Be brief." and b"discount table" not in raw.content
    bare = await client.responses.create(model="gpt-4o-mini", input="hi")
    assert (await client.responses.retrieve(bare.id)).instructions is None


async def test_responses_not_stored_are_not_recorded(logged_gateway, admin_token, issuer):
    client = _v1(logged_gateway, issuer, await _app(logged_gateway, admin_token))
    created = await client.responses.create(model="gpt-4o-mini", input="ephemeral", store=False)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(created.id)
