"""Async mode: `Prefer: respond-async` → 202 → a Durable orchestration waits out 429s → poll.

The orchestrator is replayed here by the Durable SDK's own engine over histories in the
extension's shape, and run end to end through the local host, which runs the very functions
registered in function_app.py (queue starter, orchestrator, activities) in-process the same way."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import datetime, timedelta, timezone

import aiohttp
import pytest
from dateutil.parser import isoparse

import function_app
from shared.jobs.orchestration import ATTEMPT_ACTIVITY, GIVE_UP_ACTIVITY, ORCHESTRATOR, decode, encode
from shared.local.host.durable_runtime import (
    ORCHESTRATOR_STARTED, TASK_COMPLETED, TASK_FAILED, TIMER_FIRED, History, history_event,
)
from shared.local.host.functions_host import registered_functions

from .conftest import _gateway_env
from .servers import start_local_host, start_simulator, stop

ADMIN = "/sekisho/admin"
CHAT = "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"
ASYNC = {"Prefer": "respond-async"}


# The orchestrator, replayed by the Durable SDK's engine over histories in the extension's shape --
def run_episode(handle, history: History) -> dict:
    """Replay the orchestrator over its history, calling the registered function itself; its state
    as the extension reads it (the local host invokes it through the worker runtime instead)."""
    return json.loads(handle(history.context()))


class Replay:
    """Drives the registered orchestrator as the Durable extension does: after each step, the
    outcome of what it asked for is appended to its history and the whole history is replayed."""

    def __init__(self, max_attempts=3, max_wait_seconds=60):
        self.handle = next(f.get_user_function() for f in registered_functions(function_app.app) if f.get_function_name() == ORCHESTRATOR)
        job = encode({"job_id": "job-1", "app_id": "app", "max_attempts": max_attempts, "max_wait_seconds": max_wait_seconds})
        self.clock = datetime(2026, 1, 1, tzinfo=timezone.utc)
        self.history = History(ORCHESTRATOR, "job-1", json.dumps(job), at=self.clock.isoformat())
        self.state = run_episode(self.handle, self.history)

    def asked(self) -> list[tuple[int, dict]]:
        """What the last episode asked for that was not scheduled yet, scheduled now."""
        return [self.history.schedule(action) for action in self.history.new_actions(self.state)]

    def _next(self, outcome: dict, seconds: float = 1.0) -> list[tuple[int, dict]]:
        self.history.episode_ended()
        self.clock += timedelta(seconds=seconds)
        self.history.add(ORCHESTRATOR_STARTED, at=self.clock.isoformat())
        self.history.events.append(outcome)
        self.state = run_episode(self.handle, self.history)
        return self.asked()

    def complete(self, event_id: int, result: dict) -> list[tuple[int, dict]]:
        return self._next(history_event(TASK_COMPLETED, self.clock.isoformat(), TaskScheduledId=event_id, Result=json.dumps(encode(result))))

    def fail(self, event_id: int, reason: str) -> list[tuple[int, dict]]:
        return self._next(history_event(TASK_FAILED, self.clock.isoformat(), TaskScheduledId=event_id, Reason=reason, Details=""))

    def fire(self, event_id: int, action: dict) -> list[tuple[int, dict]]:
        wait = (isoparse(action["fireAt"]) - self.clock).total_seconds()
        return self._next(history_event(TIMER_FIRED, self.clock.isoformat(), TimerId=event_id, FireAt=action["fireAt"]), seconds=wait)


def _activity(step: list[tuple[int, dict]], name: str) -> tuple[int, dict]:
    (event_id, action), = step
    assert action["functionName"] == name
    return event_id, decode(json.loads(action["input"]))


def _timer(step: list[tuple[int, dict]], replay: Replay) -> tuple[int, dict, float]:
    (event_id, action), = step
    assert "fireAt" in action
    return event_id, action, (isoparse(action["fireAt"]) - replay.clock).total_seconds()


def test_orchestrator_waits_the_retry_after_the_activity_reports():
    replay = Replay()
    first, job = _activity(replay.asked(), ATTEMPT_ACTIVITY)
    assert job == {"job_id": "job-1", "app_id": "app", "max_attempts": 3, "max_wait_seconds": 60, "attempt": 1, "waited_seconds": 0.0}
    timer, action, wait = _timer(replay.complete(first, {"state": "retry", "retry_after_seconds": 7.5,
                                                         "error": {"status": 429, "code": "upstream_rate_limited"}}), replay)
    assert wait == 7.5  # on the orchestration's replay-safe clock, not the machine's
    assert replay.state["customStatus"] == {"attempt": 1, "waiting_seconds": 7.5, "waited_seconds": 7.5}
    second, job = _activity(replay.fire(timer, action), ATTEMPT_ACTIVITY)
    assert job["attempt"] == 2 and job["waited_seconds"] == 7.5
    assert replay.complete(second, {"state": "succeeded"}) == []
    assert replay.state["isDone"] and decode(replay.state["output"]) == {"state": "succeeded"}


def test_orchestrator_gives_up_after_its_attempts():
    replay = Replay(max_attempts=2)
    first, _ = _activity(replay.asked(), ATTEMPT_ACTIVITY)
    timer, action, _ = _timer(replay.complete(first, {"state": "retry", "retry_after_seconds": 1}), replay)
    second, _ = _activity(replay.fire(timer, action), ATTEMPT_ACTIVITY)
    give_up, final = _activity(replay.complete(second, {"state": "retry", "retry_after_seconds": 1,
                                                        "error": {"status": 429, "code": "upstream_rate_limited"}}), GIVE_UP_ACTIVITY)
    assert final["last_error"]["code"] == "upstream_rate_limited" and final["attempt"] == 2
    replay.complete(give_up, {"state": "failed"})
    assert replay.state["isDone"] and decode(replay.state["output"]) == {"state": "failed"}


def test_orchestrator_gives_up_when_the_wait_would_pass_its_limit():
    replay = Replay(max_attempts=10, max_wait_seconds=30)
    first, _ = _activity(replay.asked(), ATTEMPT_ACTIVITY)
    _, final = _activity(replay.complete(first, {"state": "retry", "retry_after_seconds": 31}), GIVE_UP_ACTIVITY)
    assert final["waited_seconds"] == 0.0


def test_orchestrator_counts_a_failed_activity_as_an_attempt_and_waits_at_least_a_second():
    replay = Replay()
    first, _ = _activity(replay.asked(), ATTEMPT_ACTIVITY)
    timer, action, wait = _timer(replay.fail(first, "store down"), replay)  # the SDK throws the failure into the orchestrator
    assert wait == 10
    second, _ = _activity(replay.fire(timer, action), ATTEMPT_ACTIVITY)
    _, _, wait = _timer(replay.complete(second, {"state": "retry", "retry_after_seconds": 0}), replay)
    assert wait == 1


def test_orchestrator_replays_its_history_without_asking_again():
    """Replaying a history whose steps are all recorded asks for nothing new and gives the same
    state: the orchestrator decides only from its input and what its history says."""
    replay = Replay()
    first, _ = _activity(replay.asked(), ATTEMPT_ACTIVITY)
    timer, action, _ = _timer(replay.complete(first, {"state": "retry", "retry_after_seconds": 3}), replay)
    before = replay.state
    again = run_episode(replay.handle, replay.history)  # the same history, every event played
    assert again == before and replay.history.new_actions(again) == []


# End to end through the local host -------------------------------------------------------------
@pytest.fixture(scope="module")
def jobs_setup(tmp_path_factory, data_dir):
    sim = start_simulator()
    path = str(tmp_path_factory.mktemp("jobs") / "j.db")
    host = start_local_host(_gateway_env(sim, SEKISHO_SQLITE_PATH=path, SEKISHO_POLICY_CACHE_SECONDS="0.2"), data_dir)
    yield host, sim
    stop(host.process)
    stop(sim.process)


async def _call(method, url, token, body=None, headers=None):
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}", **(headers or {})}) as session:
        async with session.request(method, url, json=body) as response:
            return response.status, response.headers, await response.json(content_type=None)


async def _app(host, admin_token, issuer, **settings):
    app_id = str(uuid.uuid4())
    base = {"retry": {"max_attempts": 1}, "async_jobs": {"max_attempts": 4, "max_wait_seconds": 60}}
    status, _, _ = await _call("PUT", f"{host.url}{ADMIN}/policies/apps/{app_id}", admin_token, {"name": "async", "settings": {**base, **settings}})
    assert status == 201
    return app_id, issuer.mint(app_id)


async def _poll(url, token, timeout=20.0):
    deadline = time.monotonic() + timeout
    while True:
        status, headers, body = await _call("GET", url, token)
        if status != 202 or time.monotonic() > deadline:
            return status, headers, body
        await asyncio.sleep(0.1)


async def _log(host, admin_token, request_id, want_status, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        status, _, record = await _call("GET", f"{host.url}{ADMIN}/logs/{request_id}", admin_token)
        if (status == 200 and record["status"] == want_status) or time.monotonic() > deadline:
            return record
        await asyncio.sleep(0.1)


def _chat_body(text="hello"):
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 50}


async def test_respond_async_202_then_the_completion_in_the_normal_shape(jobs_setup, admin_token, issuer):
    host, sim = jobs_setup
    app_id, token = await _app(host, admin_token, issuer)
    status, headers, job = await _call("POST", host.url + CHAT, token, _chat_body(), ASYNC)
    assert status == 202, job
    assert headers["Preference-Applied"] == "respond-async" and headers["Retry-After"]
    assert job["object"] == "sekisho.job" and job["status"] == "queued" and job["id"] == headers["x-sekisho-request-id"]
    assert headers["Location"] == job["status_url"] == f"{host.url}/sekisho/jobs/{job['id']}"
    status, headers, completion = await _poll(job["status_url"], token)
    assert status == 200 and headers["x-sekisho-job-status"] == "succeeded"
    assert completion["object"] == "chat.completion" and completion["choices"][0]["message"]["content"]
    assert float(headers["x-sekisho-cost"]) > 0
    record = await _log(host, admin_token, job["id"], 200)  # one record per logical request, completed
    assert record["status"] == 200 and record["job"]["status"] == "succeeded" and record["app_id"] == app_id
    assert record["usage"]["total_tokens"] == completion["usage"]["total_tokens"] and record["prompt"]["messages"][0]["content"] == "hello"


async def test_job_waits_out_429s_with_the_upstream_retry_after_and_reserves_quota_once(jobs_setup, admin_token, issuer):
    host, sim = jobs_setup
    sim.reset()
    app_id, token = await _app(host, admin_token, issuer, app_limits={"requests_per_minute": 100, "tokens_per_minute": 100000})
    if time.time() % 60 > 45:  # the job takes ~3 s: keep it and the usage read in one minute window
        await asyncio.sleep(61 - time.time() % 60)
    sim.inject(429, count=2, retry_after_ms=1200)
    since = time.time()
    status, _, job = await _call("POST", host.url + CHAT, token, _chat_body(), ASYNC)
    assert status == 202
    waiting = await _call("GET", job["status_url"], token)
    assert waiting[0] == 202 and waiting[2]["status"] in ("queued", "running", "waiting")
    status, _, completion = await _poll(job["status_url"], token)
    assert status == 200
    calls = [r for r in sim.received() if r["t"] >= since]
    assert [c["status"] for c in calls] == [429, 429, 200]
    assert calls[1]["t"] - calls[0]["t"] >= 1.19 and calls[2]["t"] - calls[1]["t"] >= 1.19  # measured at the simulator
    record = await _log(host, admin_token, job["id"], 200)
    assert record["job"]["attempts"] == 3 and record["job"]["waited_seconds"] == pytest.approx(2.4)
    await asyncio.sleep(0.3)  # settlement runs off the answer's path
    _, _, usage = await _call("GET", f"{host.url}{ADMIN}/usage/apps/{app_id}", admin_token)
    assert usage["metrics"]["requests_per_minute"]["used"] == 1  # reserved once for the logical request
    assert usage["metrics"]["tokens_per_minute"]["used"] == completion["usage"]["total_tokens"]  # settled to the real usage


async def test_job_gives_up_as_upstream_rate_limited_and_releases_its_reservation(jobs_setup, admin_token, issuer):
    host, sim = jobs_setup
    sim.reset()
    app_id, token = await _app(host, admin_token, issuer, app_limits={"tokens_per_minute": 100000},
                               async_jobs={"max_attempts": 2, "max_wait_seconds": 60})
    sim.inject(429, count=5, retry_after_ms=300)
    status, _, job = await _call("POST", host.url + CHAT, token, _chat_body(), ASYNC)
    assert status == 202
    status, headers, error = await _poll(job["status_url"], token)
    assert status == 429 and error["error"]["code"] == "upstream_rate_limited" and headers["x-sekisho-job-status"] == "failed"
    assert headers["x-should-retry"] == "false"
    record = await _log(host, admin_token, job["id"], 429)
    assert record["status"] == 429 and record["error"]["code"] == "upstream_rate_limited" and record["job"]["attempts"] == 2
    await asyncio.sleep(0.3)
    _, _, usage = await _call("GET", f"{host.url}{ADMIN}/usage/apps/{app_id}", admin_token)
    assert usage["metrics"]["tokens_per_minute"]["used"] == 0  # released: nothing reached the model
    sim.reset()


async def test_policy_turns_an_exhausted_retry_budget_into_a_job(jobs_setup, admin_token, issuer):
    host, sim = jobs_setup
    sim.reset()
    _, token = await _app(host, admin_token, issuer, async_jobs={"on_budget_exhausted": True, "max_attempts": 3, "max_wait_seconds": 60})
    sim.inject(429, count=1, retry_after_ms=500)
    status, headers, job = await _call("POST", host.url + CHAT, token, _chat_body())  # no Prefer header
    assert status == 202 and "Preference-Applied" not in headers and job["reason"] == "retry_budget"
    status, _, completion = await _poll(job["status_url"], token)
    assert status == 200 and completion["choices"]


async def test_jobs_belong_to_their_app(jobs_setup, admin_token, issuer):
    host, sim = jobs_setup
    _, token = await _app(host, admin_token, issuer)
    _, other = await _app(host, admin_token, issuer)
    status, _, job = await _call("POST", host.url + CHAT, token, _chat_body(), ASYNC)
    assert status == 202
    status, _, body = await _call("GET", job["status_url"], other)
    assert status == 404 and body["error"]["code"] == "not_found"
    status, _, body = await _call("GET", job["status_url"], "not-a-token")
    assert status == 401 and body["error"]["code"] == "invalid_token"


async def test_streams_models_and_disabled_policies_are_answered_synchronously(jobs_setup, admin_token, issuer):
    host, sim = jobs_setup
    _, token = await _app(host, admin_token, issuer)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}", **ASYNC}) as session:
        async with session.post(host.url + CHAT, json={**_chat_body(), "stream": True}) as response:
            assert response.status == 200 and "Preference-Applied" not in response.headers
            assert (await response.read()).endswith(b"data: [DONE]\n\n")
        async with session.get(host.url + "/openai/v1/models") as response:
            assert response.status == 200
    _, token = await _app(host, admin_token, issuer, async_jobs={"enabled": False})
    status, headers, completion = await _call("POST", host.url + CHAT, token, _chat_body(), ASYNC)
    assert status == 200 and completion["object"] == "chat.completion"


async def test_a_request_carrying_data_source_credentials_is_never_stored_as_a_job(jobs_setup, admin_token, issuer):
    """A job document would hold the credentials at rest: such a request is answered synchronously."""
    host, sim = jobs_setup
    _, token = await _app(host, admin_token, issuer)
    body = {**_chat_body(), "data_sources": [{"type": "azure_search", "parameters": {"authentication": {"type": "api_key", "key": "JOB-SECRET-1"}}}]}
    status, headers, completion = await _call("POST", host.url + CHAT, token, body, ASYNC)
    assert status == 200 and "Preference-Applied" not in headers and completion["object"] == "chat.completion"


# The Azure path of the start: azure-storage-queue → the queue-triggered starter -----------------
async def test_queue_launcher_enqueues_what_the_registered_starter_reads(tmp_path):
    """QueueJobLauncher against Azurite (the real SDK and wire protocol); the message it sends is
    decoded as the Functions queue trigger does (base64) and handed to function_app's starter."""
    import base64

    import azure.functions as func
    from azure.storage.queue.aio import QueueClient

    import function_app
    from shared.jobs.launch import QueueJobLauncher
    from shared.jobs.orchestration import ORCHESTRATOR, START_QUEUE
    from shared.local.host.durable_runtime import InstanceStatus
    from shared.settings import Settings

    from .servers import start_azurite_queue

    azurite = start_azurite_queue(tmp_path)
    try:
        queue = QueueClient.from_connection_string(azurite.connection_string, START_QUEUE)
        await queue.create_queue()
        settings = Settings.from_env({"AzureWebJobsStorage": azurite.connection_string}, serving=False)
        launcher = QueueJobLauncher.from_settings(settings)
        job = {"id": "job-42", "app_id": "app-7", "max_attempts": 5, "max_wait_seconds": 600}
        await launcher.launch(job)
        await launcher.close()
        messages = [m async for m in queue.receive_messages()]
        await queue.close()
        assert len(messages) == 1
        body = base64.b64decode(messages[0].content)  # the trigger's default messageEncoding
        assert decode(body) == {"job_id": "job-42", "app_id": "app-7", "max_attempts": 5, "max_wait_seconds": 600}

        class Client:
            def __init__(self, status):
                self.status, self.started = status, []

            async def get_status(self, instance_id):
                return self.status

            async def start_new(self, name, instance_id=None, client_input=None):
                self.started.append((name, instance_id, decode(client_input)))
                return instance_id

        from shared.local.host.functions_host import registered_functions

        (registered,) = [f for f in registered_functions(function_app.app) if f.get_function_name() == "job_starter"]
        starter = registered.get_user_function().client_function  # the user code inside the durable client wrapper
        fresh = Client(InstanceStatus(None))
        await starter(msg=func.QueueMessage(body=body), client=fresh)
        assert fresh.started == [(ORCHESTRATOR, "job-42", decode(body))]
        redelivered = Client(InstanceStatus("Running"))  # the same message again: nothing new starts
        await starter(msg=func.QueueMessage(body=body), client=redelivered)
        assert redelivered.started == []
    finally:
        azurite.process.kill()  # an emulator with throwaway data: no graceful stop needed (it takes ~10 s)
        azurite.process.wait()


async def test_a_restart_of_the_local_host_resumes_a_waiting_job(tmp_path, data_dir, admin_token, issuer):
    """The orchestration's history is kept in the data folder while it runs, as Durable's task hub
    keeps it: a job waiting on its timer when `make run` stops finishes after the next start."""
    import shutil

    data = tmp_path / "data"  # the issuer's keys, none of the other hosts' state
    shutil.copytree(data_dir, data, ignore=shutil.ignore_patterns("durable*", "*.db*", "log-spool", "*.txt"))
    sim = start_simulator()
    env = _gateway_env(sim, SEKISHO_SQLITE_PATH=str(tmp_path / "restart.db"))
    host = start_local_host(env, data)
    try:
        _, token = await _app(host, admin_token, issuer)
        sim.inject(429, count=1, retry_after_ms=3000)
        status, _, job = await _call("POST", host.url + CHAT, token, _chat_body(), ASYNC)
        assert status == 202
        deadline = time.monotonic() + 10
        while (await _call("GET", job["status_url"], token))[2]["status"] != "waiting" and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert list((data / "durable").glob("*.json")), "the waiting orchestration's history is kept"
        stop(host.process)
        host = start_local_host(env, data)  # another port, the same data folder
        status, headers, completion = await _poll(f"{host.url}/sekisho/jobs/{job['id']}", token, timeout=20)
        assert status == 200 and completion["object"] == "chat.completion" and headers["x-sekisho-job-status"] == "succeeded"
        assert [r["status"] for r in sim.received() if r["path"].endswith("/chat/completions")][-2:] == [429, 200]
        assert not list((data / "durable").glob("*.json"))  # finished: forgotten
    finally:
        stop(host.process)
        stop(sim.process)
