"""Audio (transcriptions, translations, speech) and images (generations, edits) through the
gateway with the openai SDK: identified, guarded, limited, priced by their units, logged."""
from __future__ import annotations

import time
import uuid

import aiohttp
import openai
import pytest
from openai import AsyncAzureOpenAI, AsyncOpenAI

from shared.quota.pricing import BUILTIN_PRICES, NANOS, units_cost

from .conftest import MAX_BODY_BYTES
from .servers import put_app

ADMIN = "/sekisho/admin"
RULES = [{"id": "codename", "pattern": "Project Falcon"}]
AUDIO = b"RIFF" + bytes(range(256)) * 125  # 32,004 bytes: two seconds at the simulator's 16 kB/s


async def _app(gw, admin_token, settings=None) -> str:
    return await put_app(gw.url, admin_token, settings, "media")


def _clients(gw, issuer, app_id):
    token = issuer.mint(app_id)
    return (AsyncAzureOpenAI(azure_endpoint=gw.url, azure_ad_token=token, api_version="2025-03-01-preview", max_retries=0),
            AsyncOpenAI(base_url=gw.url + "/openai/v1", api_key=token, max_retries=0))


async def test_transcriptions_in_every_format_logged_and_priced_per_minute(logged_gateway, admin_token, issuer):
    azure, v1 = _clients(logged_gateway, issuer, await _app(logged_gateway, admin_token))
    raw = await azure.audio.transcriptions.with_raw_response.create(model="whisper", file=("a.wav", AUDIO, "audio/wav"), prompt="names: Sekisho")
    assert raw.parse().text
    record = await logged_gateway.log(raw.headers["x-sekisho-request-id"])
    assert record["operation"] == "audio.transcriptions" and record["status"] == 200
    assert record["parameters"]["file"] == {"filename": "a.wav", "content_type": "audio/wav", "bytes": len(AUDIO)}  # never the bytes
    assert record["prompt"] == {"prompt": "names: Sekisho"}
    seconds = record["usage"]["units"]["audio_seconds"]
    assert seconds == pytest.approx(2.0, abs=0.01)
    expected = units_cost(BUILTIN_PRICES["whisper"], {"audio_seconds": seconds}) / NANOS
    assert record["cost"]["amount"] == pytest.approx(expected) and float(raw.headers["x-sekisho-cost"]) == pytest.approx(expected)
    for response_format, marker in (("text", ""), ("srt", "-->"), ("vtt", "WEBVTT"), ("verbose_json", None)):
        answer = await v1.audio.transcriptions.create(model="whisper", file=("a.wav", AUDIO, "audio/wav"), response_format=response_format)
        if marker is None:
            assert answer.duration == pytest.approx(2.0, abs=0.01) and answer.segments
        else:
            assert isinstance(answer, str) and marker in answer
    translated = await azure.audio.translations.create(model="whisper", file=("a.wav", AUDIO, "audio/wav"))
    assert translated.text


async def test_token_priced_transcription_and_its_stream(logged_gateway, admin_token, issuer):
    _, v1 = _clients(logged_gateway, issuer, await _app(logged_gateway, admin_token))
    raw = await v1.audio.transcriptions.with_raw_response.create(model="gpt-4o-transcribe", file=("a.wav", AUDIO, "audio/wav"))
    answer = raw.parse()
    record = await logged_gateway.log(raw.headers["x-sekisho-request-id"])
    assert record["usage"]["total_tokens"] == answer.usage.total_tokens > 0 and "units" not in record["usage"] or record["usage"]["total_tokens"]
    text, done = "", None
    async for event in await v1.audio.transcriptions.create(model="gpt-4o-transcribe", file=("a.wav", AUDIO, "audio/wav"), stream=True):
        if event.type == "transcript.text.delta":
            text += event.delta
        elif event.type == "transcript.text.done":
            done = event.text
    assert text == done == answer.text


async def test_speech_is_relayed_as_it_arrives_and_priced_per_character(logged_gateway, admin_token, issuer):
    app_id = await _app(logged_gateway, admin_token)
    text = "The checkpoint on the old highway saw every traveller pass. " * 4
    url = logged_gateway.url + "/openai/deployments/tts/audio/speech?api-version=2025-03-01-preview"
    arrivals, audio = [], b""
    started = time.monotonic()
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {issuer.mint(app_id)}"}) as session:
        async with session.post(url, json={"input": text, "voice": "alloy", "x_sim": {"chunk_interval_ms": 20}}) as response:
            assert response.status == 200 and response.headers["content-type"] == "audio/mpeg"
            request_id = response.headers["x-sekisho-request-id"]
            async for chunk in response.content.iter_any():
                arrivals.append(time.monotonic() - started)
                audio += chunk
    assert audio.startswith(b"ID3") and len(arrivals) > 3 and arrivals[-1] - arrivals[0] > 0.1  # not held whole
    record = await logged_gateway.log(request_id)
    assert record["operation"] == "audio.speech" and record["usage"]["units"] == {"characters": len(text)}
    assert record["cost"]["amount"] == pytest.approx(len(text) / 1e6 * BUILTIN_PRICES["tts"].per_1m_characters)
    _, v1 = _clients(logged_gateway, issuer, app_id)
    spoken = await v1.audio.speech.create(model="tts", voice="alloy", input="hello", response_format="wav")
    assert spoken.content.startswith(b"RIFF")


async def test_images_priced_per_image_or_by_tokens(logged_gateway, admin_token, issuer):
    azure, v1 = _clients(logged_gateway, issuer, await _app(logged_gateway, admin_token))
    raw = await azure.images.with_raw_response.generate(model="dall-e-3", prompt="a gate on an old highway", size="1024x1792", quality="hd")
    images = raw.parse()
    assert images.data[0].url and images.data[0].revised_prompt
    record = await logged_gateway.log(raw.headers["x-sekisho-request-id"])
    assert record["usage"]["units"] == {"images:1024x1792/hd": 1} and record["cost"]["amount"] == pytest.approx(0.12)
    raw = await v1.images.with_raw_response.generate(model="gpt-image-1", prompt="a gate", n=2)
    tokens = raw.parse().usage
    record = await logged_gateway.log(raw.headers["x-sekisho-request-id"])
    price = BUILTIN_PRICES["gpt-image-1"]
    assert record["usage"]["total_tokens"] == tokens.total_tokens
    assert record["cost"]["amount"] == pytest.approx((tokens.input_tokens * price.input_per_1m + tokens.output_tokens * price.output_per_1m) / 1e6)
    edited = await v1.images.edit(model="gpt-image-1", image=("gate.png", b"\x89PNG\r\n\x1a\n" + b"0" * 64, "image/png"), prompt="make it blue")
    assert edited.data[0].b64_json


async def test_guards_read_prompts_and_transcripts(logged_gateway, admin_token, issuer):
    azure, v1 = _clients(logged_gateway, issuer, await _app(logged_gateway, admin_token, {"guards": {"rules": RULES, "output_action": "redact"}}))
    for call in (
        lambda: azure.images.generate(model="dall-e-3", prompt="draw Project Falcon"),
        lambda: v1.audio.speech.create(model="tts", voice="alloy", input="say Project Falcon"),
        lambda: v1.audio.transcriptions.create(model="whisper", file=("a.wav", AUDIO, "audio/wav"), prompt="Project Falcon"),
        lambda: v1.images.edit(model="gpt-image-1", image=("g.png", b"\x89PNG0000", "image/png"), prompt="Project Falcon"),
    ):
        with pytest.raises(openai.BadRequestError) as caught:
            await call()
        assert caught.value.code == "content_filter"
    spoken = {"extra_body": {"x_sim": {"reply": "we discussed Project Falcon today"}}}
    whole = await v1.audio.transcriptions.create(model="whisper", file=("a.wav", AUDIO, "audio/wav"), **spoken)
    assert whole.text == "we discussed [redacted] today"
    text = await v1.audio.transcriptions.create(model="whisper", file=("a.wav", AUDIO, "audio/wav"), response_format="text", **spoken)
    assert "[redacted]" in text and "Falcon" not in text
    streamed = ""
    async for event in await v1.audio.transcriptions.create(model="gpt-4o-transcribe", file=("a.wav", AUDIO, "audio/wav"), stream=True,
                                                           extra_body={"x_sim": {"reply": "we discussed Project Falcon today", "chunks": 9}}):
        if event.type == "transcript.text.delta":
            streamed += event.delta
    assert streamed == "we discussed [redacted] today"
    revised = await azure.images.generate(model="dall-e-3", prompt="a gate", extra_body={"x_sim": {"revised_prompt": "A gate for Project Falcon"}})
    assert revised.data[0].revised_prompt == "A gate for [redacted]"


async def test_uploads_over_the_limit_are_refused_with_413(gateway, token):
    client = AsyncOpenAI(base_url=gateway.url + "/openai/v1", api_key=token, max_retries=0)
    # The test gateways keep the default upload limit (25 MiB): far more than the JSON body limit.
    assert MAX_BODY_BYTES < 100_000
    answer = await client.audio.transcriptions.create(model="whisper", file=("big.wav", b"0" * 200_000, "audio/wav"))
    assert answer.text  # over the JSON limit, well under the upload limit


async def test_the_upload_limit_is_a_setting(simulator, data_dir, tmp_path, issuer):
    from .conftest import _gateway_env
    from .servers import start_local_host, stop

    host = start_local_host({**_gateway_env(simulator), "SEKISHO_SQLITE_PATH": str(tmp_path / "u.db"), "SEKISHO_MAX_UPLOAD_BYTES": "50000",
                             "SEKISHO_ALLOW_UNREGISTERED_APPS": "true"}, data_dir)
    try:
        client = AsyncOpenAI(base_url=host.url + "/openai/v1", api_key=issuer.mint(str(uuid.uuid4())), max_retries=0)
        with pytest.raises(openai.APIStatusError) as caught:
            await client.audio.transcriptions.create(model="whisper", file=("big.wav", b"0" * 60_000, "audio/wav"))
        assert caught.value.status_code == 413 and "SEKISHO_MAX_UPLOAD_BYTES" in caught.value.message
        assert (await client.audio.transcriptions.create(model="whisper", file=("ok.wav", AUDIO, "audio/wav"))).text
    finally:
        stop(host.process)


async def test_a_multipart_operation_refuses_a_json_body_clearly(gateway, token):
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
        async with session.post(gateway.url + "/openai/v1/audio/transcriptions", json={"model": "whisper"}) as response:
            body = await response.json()
    assert response.status == 400 and "multipart/form-data" in body["error"]["message"]
