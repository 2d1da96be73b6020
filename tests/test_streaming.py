"""Streams are relayed event by event as they arrive, Azure's quirks included."""
from __future__ import annotations

import time

import aiohttp
import orjson

CHAT_URL = "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"


async def _read_events(url: str, body: dict, headers: dict):
    """POST and yield (arrival time, event bytes) for each SSE event."""
    async with aiohttp.ClientSession(headers=headers) as session:
        async with session.post(url, json=body) as response:
            assert response.status == 200, await response.text()
            assert response.headers["content-type"].startswith("text/event-stream")
            buffer = b""
            async for chunk in response.content.iter_any():
                buffer += chunk
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    yield time.perf_counter(), event


async def test_chunks_reach_the_client_before_the_upstream_finishes(gateway, auth):
    body = {
        "messages": [{"role": "user", "content": "count"}],
        "stream": True,
        "x_sim": {"reply": "one two three four five six", "chunk_interval_ms": 150},
    }
    arrivals = [(t, e) async for t, e in _read_events(gateway.url + CHAT_URL, body, auth)]
    content = [t for t, e in arrivals if b'"content":"' in e and b'"content":""' not in e]
    assert len(content) == 6
    # Six chunks 150 ms apart: had the gateway buffered, they would arrive together at the end.
    assert content[-1] - content[0] > 0.6
    gaps = [b - a for a, b in zip(content, content[1:])]
    assert min(gaps) > 0.08


async def test_the_simulator_paces_generation_like_a_model(simulator):
    """Pieces on a fixed schedule, and the usage chunk and [DONE] right after the last one: what
    bench/ measures a stream's end against."""
    body = {"messages": [{"role": "user", "content": "count"}], "stream": True, "stream_options": {"include_usage": True},
            "x_sim": {"reply": "one two three four five six", "chunk_interval_ms": 40}}
    started = time.perf_counter()
    arrivals = [(t, e) async for t, e in _read_events(simulator.url + CHAT_URL, body, {"api-key": simulator.api_key})]
    content = [t for t, e in arrivals if b'"content":"' in e and b'"content":""' not in e]
    finish = next(t for t, e in arrivals if b'"finish_reason":"stop"' in e)
    usage = next(t for t, e in arrivals if b'"usage":{' in e)
    done = arrivals[-1][0]
    assert arrivals[-1][1] == b"data: [DONE]" and len(content) == 6
    assert usage - finish < 0.02 and done - usage < 0.02  # not paced: they trail the last piece at once
    assert 0.2 < done - started < 0.4  # seven paced events, 40 ms apart, on one schedule


async def test_azure_quirks_are_relayed_in_order(gateway, auth):
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "x_sim": {"annotations": True, "reply": "a b"}}
    events = [e async for _, e in _read_events(gateway.url + CHAT_URL, body, auth)]
    assert events[-1] == b"data: [DONE]"
    payloads = [orjson.loads(e[len(b"data: "):]) for e in events[:-1]]
    assert payloads[0]["choices"] == [] and "prompt_filter_results" in payloads[0]
    annotations = [p for p in payloads if p["choices"] and "delta" not in p["choices"][0]]
    assert len(annotations) == 1 and "content_filter_results" in annotations[0]["choices"][0]
    # the usage chunk the gateway asked for is stripped: the client did not ask for it
    assert not any(p["choices"] == [] and p.get("usage") for p in payloads)


async def test_upstream_breaking_mid_stream_ends_with_an_error_event(logged_gateway, auth):
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "x_sim": {"reply": "a b c d e f", "break_after_chunks": 3}}
    request_id = None
    events = []
    async with aiohttp.ClientSession(headers=auth) as session:
        async with session.post(logged_gateway.url + CHAT_URL, json=body) as response:
            request_id = response.headers["x-sekisho-request-id"]
            events = (await response.read()).split(b"\n\n")
    events = [e for e in events if e]
    last = orjson.loads(events[-1][len(b"data: "):])
    assert last["error"]["code"] == "upstream_error"
    record = await logged_gateway.log(request_id)
    assert record["status"] == 502
    assert record["error"]["code"] == "upstream_error"
    assert record["response"]["choices"][0]["text"] == "a"  # what was relayed before the break
