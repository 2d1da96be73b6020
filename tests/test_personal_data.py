"""Personal data: found by format and check digit (Japanese formats first), masked in the log and
kept out of the cache (mask_in_log), or replaced by placeholders before the model and restored
for the client, in whole answers and streams (mask_upstream). Through the openai SDK against the
local host, on both stores."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai import AsyncAzureOpenAI

from shared.guards.personal_data import DETECTORS, Placeholders, RestoringChannel, find, mask_text

from .servers import put_app

KINDS = tuple(DETECTORS)
MY_NUMBER = "123456789018"  # a valid check digit
NOT_MY_NUMBER = "123456789012"  # the same digits with a wrong check digit: an order number
CORPORATE = "5835678256246"
CARD = "4111 1111 1111 1111"
EMAIL = "hanako.sato@example.co.jp"


@pytest.mark.parametrize("text, expected", [
    (f"マイナンバーは{MY_NUMBER}です", [("my_number", MY_NUMBER)]),
    ("マイナンバーは1234 5678 9018です", [("my_number", "1234 5678 9018")]),
    ("全角で１２３４－５６７８－９０１８", [("my_number", "１２３４－５６７８－９０１８")]),
    (f"注文番号 {NOT_MY_NUMBER}", []),
    (f"法人番号 {CORPORATE}、登録番号 T{CORPORATE}", [("corporate_number", CORPORATE), ("corporate_number", "T" + CORPORATE)]),
    ("法人番号 5835678256247", []),
    (f"card {CARD}", [("payment_card", CARD)]),
    ("card 4111111111111112", []),  # fails Luhn: not a card (and a 16-digit run is no My Number)
    ("電話 03-1234-5678 / 090-1234-5678 / +81 90 1234 5678", [("phone_jp", "03-1234-5678"), ("phone_jp", "090-1234-5678"), ("phone_jp", "+81 90 1234 5678")]),
    ("〒100-0001 千代田区", [("postal_code_jp", "〒100-0001")]),
    (f"連絡先 {EMAIL}", [("email", EMAIL)]),
    ("2026-11-30 に 3 件, version 1.2.3, id 20261130", []),
])
def test_what_is_found(text, expected):
    assert [(f.kind, text[f.start:f.end]) for f in find(text, KINDS)] == expected


@settings(max_examples=200, deadline=None)
@given(st.from_regex(r"[0-9]{11}", fullmatch=True))
def test_exactly_the_my_numbers_with_a_valid_check_digit_are_found(digits):
    from stdnum.jp import in_

    for last in "0123456789":
        number = digits + last
        assert bool(find(f"番号 {number} です", ("my_number",))) == in_.is_valid(number)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([MY_NUMBER, EMAIL, "090-1234-5678", "plain text ", "[", "]", "[MY_", "NUMBER_1]"]), max_size=12),
       st.integers(min_value=1, max_value=7))
def test_placeholders_come_back_whatever_the_chunks(parts, size):
    """Masked, cut into chunks of any size, restored: the client gets exactly the original."""
    original = " ".join(parts)
    placeholders = Placeholders()
    masked = placeholders.mask(original, KINDS)
    for value in placeholders.values.values():
        assert value not in masked
    channel = RestoringChannel(placeholders)
    restored = "".join(channel.feed(masked[i:i + size]) for i in range(0, len(masked), size)) + channel.flush()
    assert restored == original


def _client(gw, issuer, app_id) -> AsyncAzureOpenAI:
    return AsyncAzureOpenAI(azure_endpoint=gw.url, azure_ad_token=issuer.mint(app_id), api_version="2024-10-21", max_retries=0)


@pytest.fixture
async def private_app(logged_gateway, admin_token, issuer):
    async def make(mode, **extra):
        app_id = await put_app(logged_gateway.url, admin_token, {"allowed_deployments": ["*"], "personal_data": {"mode": mode}, **extra})
        return _client(logged_gateway, issuer, app_id)
    return make


PROMPT = f"私のマイナンバーは{MY_NUMBER}、メールは{EMAIL}です。注文番号は{NOT_MY_NUMBER}。"


async def test_mask_upstream_whole_answer(private_app, logged_gateway):
    client = await private_app("mask_upstream")
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": PROMPT}], extra_body={"x_sim": {"echo": True}})
    answer = raw.parse()
    # The model echoed what it received (placeholders); the client gets its own values back.
    assert answer.choices[0].message.content == PROMPT
    record = await logged_gateway.log(raw.headers["x-sekisho-request-id"])
    stored = json.dumps(record, ensure_ascii=False)
    assert MY_NUMBER not in stored and EMAIL not in stored
    assert "[MY_NUMBER_1]" in stored and "[EMAIL_2]" in stored
    assert NOT_MY_NUMBER in stored  # an order number is not personal data
    assert record["personal_data"] == {"mode": "mask_upstream", "found": {"my_number": 1, "email": 1}}


async def test_mask_upstream_stream_restores_placeholders_split_across_chunks(private_app):
    client = await private_app("mask_upstream")
    for chunks in (3, 17, 60):
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": PROMPT}], stream=True,
            extra_body={"x_sim": {"echo": True, "chunks": chunks}})
        text = ""
        async for chunk in stream:
            for choice in chunk.choices:
                text += choice.delta.content or ""
        assert text == PROMPT, chunks


async def test_mask_upstream_responses_stream(private_app):
    client = await private_app("mask_upstream")
    stream = await client.responses.create(model="gpt-4o-mini", input=PROMPT, stream=True,
                                           extra_body={"x_sim": {"echo": True, "chunks": 25}})
    deltas, done = "", None
    async for event in stream:
        if event.type == "response.output_text.delta":
            deltas += event.delta
        if event.type == "response.completed":
            done = event.response.output_text
    assert deltas == PROMPT and done == PROMPT


async def test_mask_upstream_shares_the_cache_across_values(private_app, logged_gateway):
    """Two requests that differ only in their personal data are the same request upstream: the
    second is answered from the cache, with its own values restored."""
    client = await private_app("mask_upstream", cache={"enabled": True})
    other = "987654321018"
    from stdnum.jp import in_
    other = other[:11] + in_.calc_check_digit(other[:11])
    first = await client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": f"番号 {MY_NUMBER}"}], temperature=0, extra_body={"x_sim": {"echo": True}})
    second = await client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": f"番号 {other}"}], temperature=0, extra_body={"x_sim": {"echo": True}})
    assert first.headers["x-sekisho-cache"] == "MISS" and second.headers["x-sekisho-cache"] == "HIT"
    assert first.parse().choices[0].message.content == f"番号 {MY_NUMBER}"
    assert second.parse().choices[0].message.content == f"番号 {other}"


async def test_mask_in_log_the_model_gets_the_values_the_log_and_cache_do_not(private_app, logged_gateway):
    client = await private_app("mask_in_log", cache={"enabled": True})
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": PROMPT}], temperature=0, extra_body={"x_sim": {"echo": True}})
    assert raw.parse().choices[0].message.content == PROMPT  # the model saw the values
    assert raw.headers["x-sekisho-cache"] == "BYPASS"  # a request with personal data is not cached
    record = await logged_gateway.log(raw.headers["x-sekisho-request-id"])
    stored = json.dumps(record, ensure_ascii=False)
    assert MY_NUMBER not in stored and EMAIL not in stored
    assert "[MY_NUMBER]" in stored and "[EMAIL]" in stored and NOT_MY_NUMBER in stored
    assert record["personal_data"] == {"mode": "mask_in_log", "found": {"my_number": 1, "email": 1}}
    # An answer that brings personal data the request did not have is not cached either.
    reply = f"担当者のメールは {EMAIL} です"
    for expected in ("MISS", "MISS"):
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "担当者は？"}], temperature=0, extra_body={"x_sim": {"reply": reply}})
        assert raw.headers["x-sekisho-cache"] == expected and raw.parse().choices[0].message.content == reply
    record = await logged_gateway.log(raw.headers["x-sekisho-request-id"])
    assert EMAIL not in json.dumps(record, ensure_ascii=False)


async def test_off_by_default(logged_gateway, admin_token, issuer):
    app_id = await put_app(logged_gateway.url, admin_token, {"allowed_deployments": ["*"]})
    client = _client(logged_gateway, issuer, app_id)
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": PROMPT}], extra_body={"x_sim": {"echo": True}})
    record = await logged_gateway.log(raw.headers["x-sekisho-request-id"])
    assert MY_NUMBER in json.dumps(record, ensure_ascii=False)  # content logging "full" keeps what was sent


def test_mask_text_names_the_kind():
    assert mask_text(f"{MY_NUMBER} / {EMAIL}", KINDS) == "[MY_NUMBER] / [EMAIL]"


async def test_unknown_kinds_are_refused(logged_gateway, admin_token):
    import aiohttp

    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin_token}"}) as session:
        async with session.put(f"{logged_gateway.url}/sekisho/admin/policies/apps/pd-kinds",
                               json={"settings": {"personal_data": {"mode": "mask_upstream", "kinds": ["shoe_size"]}}}) as answer:
            assert answer.status == 400 and "shoe_size" in (await answer.json())["error"]["message"]
