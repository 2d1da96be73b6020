"""The real openai SDK against the local host over HTTP, both client styles, all operations."""
from __future__ import annotations

import base64
import struct

import pytest
from openai import AzureOpenAI, OpenAI

API_VERSION = "2024-10-21"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What does Sekisho do?"}]


@pytest.fixture
def azure(gateway, token):
    return AzureOpenAI(azure_endpoint=gateway.url, azure_ad_token=token, api_version=API_VERSION, max_retries=0)


@pytest.fixture
def v1(gateway, token):
    # The OpenAI client sends its api_key as the bearer token: that is where the Entra token goes.
    return OpenAI(base_url=f"{gateway.url}/openai/v1", api_key=token, max_retries=0)


def test_azure_chat(azure):
    raw = azure.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES, temperature=0)
    completion = raw.parse()
    assert raw.headers["x-sekisho-request-id"]
    assert raw.headers["apim-request-id"]  # upstream headers come back
    assert completion.object == "chat.completion"
    assert completion.model.startswith("gpt-4o-mini")
    assert completion.choices[0].message.content
    assert completion.choices[0].finish_reason == "stop"
    usage = completion.usage
    assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_azure_chat_stream_without_usage_strips_the_usage_chunk(azure):
    whole = azure.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, temperature=0)
    chunks = list(azure.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, temperature=0, stream=True))
    # The gateway asked upstream for include_usage; the client did not, so it sees no usage chunk.
    assert all(chunk.usage is None for chunk in chunks)
    assert all(chunk.choices for chunk in chunks[1:])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].delta)
    assert text == whole.choices[0].message.content  # the simulator is deterministic
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_azure_chat_stream_with_usage_keeps_it(azure):
    whole = azure.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, temperature=0)
    chunks = list(
        azure.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1]
    assert usage_chunks[0].choices == []
    assert usage_chunks[0].usage.total_tokens == whole.usage.total_tokens


def test_azure_prompt_filter_chunk_is_relayed(azure):
    chunks = list(azure.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True))
    first = chunks[0]
    assert first.choices == []
    assert first.model_extra["prompt_filter_results"][0]["prompt_index"] == 0


def test_azure_completions(azure):
    completion = azure.completions.create(model="gpt-4o-mini", prompt="Once upon a time", max_tokens=5)
    assert completion.object == "text_completion"
    assert completion.choices[0].text
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 5


def test_azure_completions_stream(azure):
    chunks = list(azure.completions.create(model="gpt-4o-mini", prompt="Once upon a time", max_tokens=5, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices)
    assert all(c.usage is None for c in chunks)


def test_azure_embeddings_base64_and_floats(azure):
    # The SDK asks for base64 by default and decodes it itself.
    result = azure.embeddings.create(model="text-embedding-3-small", input=["東京", "Tokyo"], dimensions=64)
    assert [d.index for d in result.data] == [0, 1]
    assert all(len(d.embedding) == 64 for d in result.data)
    floats = azure.embeddings.create(model="text-embedding-3-small", input="東京", dimensions=64, encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(result.data[0].embedding, abs=1e-6)
    assert result.usage.prompt_tokens > 0


def test_azure_responses(azure):
    response = azure.responses.create(model="gpt-4o-mini", input="Say hello", instructions="Be brief.")
    assert response.status == "completed"
    assert response.output_text
    assert response.usage.input_tokens > 0 and response.usage.output_tokens > 0


def test_azure_responses_stream(azure):
    events = list(azure.responses.create(model="gpt-4o-mini", input="Say hello", stream=True))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    completed = [e for e in events if e.type == "response.completed"]
    assert len(completed) == 1
    assert completed[0].response.output_text == deltas


def test_v1_chat(v1):
    completion = v1.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert completion.choices[0].message.content
    chunks = list(v1.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == completion.choices[0].message.content


def test_v1_embeddings(v1):
    result = v1.embeddings.create(model="text-embedding-3-small", input="hello")
    assert len(result.data[0].embedding) == 1536


def test_v1_responses(v1):
    response = v1.responses.create(model="gpt-4o-mini", input=[{"role": "user", "content": "Hi"}])
    assert response.output_text


def test_unknown_body_fields_reach_the_upstream(azure):
    # `x_sim.reply` is not an OpenAI field: the simulator only sees it if the gateway forwards it.
    completion = azure.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, extra_body={"x_sim": {"reply": "forwarded intact ✓"}}
    )
    assert completion.choices[0].message.content == "forwarded intact ✓"


def test_base64_decoding_matches_the_simulator():
    # Guard for the test above: the simulator's base64 is little-endian float32, as Azure's.
    from shared.local.simulator.generator import embedding, encode_base64

    vector = embedding("x", 4)
    decoded = struct.unpack("<4f", base64.b64decode(encode_base64(vector)))
    assert decoded == pytest.approx(vector, abs=1e-6)
