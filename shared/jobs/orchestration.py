"""The Durable Functions orchestration that runs an async job (see async_jobs.py).

    queue message ──▶ starter (durable client) ──▶ orchestrator ──▶ attempt activity
                                                      │  ▲               │ 429: retry after N s
                                                      ▼  │               ▼
                                                 durable timer ◀─────────┘
                                                      │ attempts or wait used up
                                                      ▼
                                                give-up activity

The orchestrator is a generator and must be deterministic (Durable replays it from its
history): it decides only from its input and from what activities return, and it waits only
on durable timers, never on the clock. Activity retry options cannot honour a Retry-After
that the upstream chooses per response, hence the explicit timer loop.

Why a queue between the HTTP function and the orchestration: the HTTP streaming extension
turns every HTTP function of the app into FastAPI types, while the durable client's HTTP
helpers (`create_check_status_response`) expect `func.HttpRequest`, and a durable client
binding on a streaming HTTP function is not something we can prove here without the Functions
host. So the HTTP function stores the job and enqueues its id; a queue-triggered function with
the durable client binding starts the orchestration (instance id = job id, so a redelivered
message does not start it twice). Status reads come from the job document in the store, under
the gateway's own route, not from the Durable status API.
"""
from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

ORCHESTRATOR = "sekisho_job"
ATTEMPT_ACTIVITY = "sekisho_job_attempt"
GIVE_UP_ACTIVITY = "sekisho_job_give_up"
START_QUEUE = "sekisho-jobs"

MIN_WAIT_SECONDS = 1.0  # never hammer an upstream that gave no hint
ACTIVITY_FAILURE_WAIT_SECONDS = 10.0
GIVE_UP_TRIES = 3  # the attempt activity itself failed (store down, worker recycled)


def encode(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def decode(value: Any) -> Any:
    """Inputs and outputs cross the Durable boundary as JSON text (a dict may arrive decoded)."""
    return json.loads(value) if isinstance(value, (str, bytes)) else value


def start_message(job: dict[str, Any]) -> dict[str, Any]:
    """What the queue carries and the orchestration gets as input: ids and limits only."""
    return {"job_id": job["id"], "app_id": job["app_id"], "max_attempts": job["max_attempts"], "max_wait_seconds": job["max_wait_seconds"]}


def orchestrate_job(context):
    """Attempt; on a retryable failure wait the time the upstream asked for; repeat within the
    job's limits; then give up."""
    job = decode(context.get_input())
    attempt, waited = 0, 0.0
    while True:
        attempt += 1
        try:
            outcome = decode((yield context.call_activity(ATTEMPT_ACTIVITY, encode({**job, "attempt": attempt, "waited_seconds": waited}))))
        except Exception as exc:  # Durable raises an activity's failure here; count it as an attempt
            outcome = {"state": "retry", "retry_after_seconds": ACTIVITY_FAILURE_WAIT_SECONDS,
                       "error": {"status": 503, "code": "job_attempt_failed", "message": str(exc)[:300]}}
        if outcome.get("state") != "retry":
            return outcome
        delay = max(MIN_WAIT_SECONDS, float(outcome.get("retry_after_seconds") or 0))
        if attempt >= job["max_attempts"] or waited + delay > job["max_wait_seconds"]:
            final = {**job, "attempt": attempt, "waited_seconds": waited, "last_error": outcome.get("error")}
            # The give-up step settles the reservation and writes the log: try it a few times.
            for tries in range(GIVE_UP_TRIES):
                try:
                    return decode((yield context.call_activity(GIVE_UP_ACTIVITY, encode(final))))
                except Exception:
                    if tries + 1 == GIVE_UP_TRIES:
                        return {"state": "failed", "error": "the give-up step failed"}
                    yield context.create_timer(context.current_utc_datetime + timedelta(seconds=ACTIVITY_FAILURE_WAIT_SECONDS))
        waited += delay
        context.set_custom_status({"attempt": attempt, "waiting_seconds": delay, "waited_seconds": waited})
        yield context.create_timer(context.current_utc_datetime + timedelta(seconds=delay))
