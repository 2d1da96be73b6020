"""The Durable Functions extension and the job queue, played in-process by the local host.

Azure runs an async job as: queue message → `job_starter` (queue trigger + durable client) →
`sekisho_job` orchestrator → `sekisho_job_attempt` / `sekisho_job_give_up` activities, with
durable timers between attempts. Locally the same functions run, found in the worker's function
metadata by their bindings and invoked through the worker, with the binding data the host and
the Durable extension send:

- the starter, triggered by the local host's queue (functions_host.py), gets the durable client
  binding's JSON (`client_binding`), from which the SDK's client calls the extension's HTTP API
  (`/runtime/webhooks/durabletask/`, answered by `handle_api` on the local host's port) to start
  the instance and read its status;
- the orchestrator gets, in each episode, the instance's whole history in the extension's JSON
  shape (OrchestratorStarted, ExecutionStarted, TaskScheduled, TaskCompleted or TaskFailed,
  TimerCreated, TimerFired, OrchestratorCompleted; events of earlier episodes marked played); the
  SDK's replay engine answers with the actions it wants. The new ones are scheduled (an activity
  invoked, a timer slept), their outcomes appended, and the next episode replays everything;
- an activity gets its input as JSON and answers with its result.

Each instance's history is kept in the local host's data folder while it runs, so a restart
resumes it, as the task hub does in Azure.
"""
from __future__ import annotations

import asyncio
import json
import logging
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Awaitable, Callable
from urllib.parse import quote, unquote

from dateutil.parser import isoparse
from starlette.responses import JSONResponse, Response

from .language_worker import FunctionEntry, untyped
from .worker_protocol import protos

logger = logging.getLogger("sekisho.localhost.durable")
DURABLE_API = "/runtime/webhooks/durabletask/"  # where the extension serves its HTTP API on the host
_MAX_REMEMBERED = 10_000  # instance statuses kept (the job store, not this, is what clients read)

# History event and action types, as the Durable extension numbers them.
EXECUTION_STARTED, TASK_SCHEDULED, TASK_COMPLETED, TASK_FAILED = 0, 4, 5, 6
TIMER_CREATED, TIMER_FIRED, ORCHESTRATOR_STARTED, ORCHESTRATOR_COMPLETED = 10, 11, 12, 13
CALL_ACTIVITY, CREATE_TIMER = 0, 5


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def history_event(event_type: int, at: str | None = None, event_id: int = -1, **fields: Any) -> dict[str, Any]:
    """One history event in the extension's JSON shape (not yet played)."""
    return {"EventType": event_type, "EventId": event_id, "IsPlayed": False, "Timestamp": at or _now(), **fields}


class History:
    """One orchestration instance's history, in the shape the extension sends to the worker."""

    def __init__(self, name: str, instance_id: str, encoded_input: str, at: str | None = None) -> None:
        self.instance_id = instance_id
        self.encoded_input = encoded_input  # the orchestration's input, JSON-encoded (as the durable client sends it)
        self.events: list[dict[str, Any]] = []
        self.scheduled = 0  # tasks and timers scheduled so far: the next one's EventId
        self.add(ORCHESTRATOR_STARTED, at=at)
        self.add(EXECUTION_STARTED, Name=name, Input=encoded_input, Version="", at=at)

    def add(self, event_type: int, at: str | None = None, event_id: int = -1, **fields: Any) -> dict[str, Any]:
        event = history_event(event_type, at, event_id, **fields)
        self.events.append(event)
        return event

    def context(self) -> str:
        """The orchestration trigger's payload for the next episode."""
        return json.dumps({"history": self.events, "instanceId": self.instance_id, "isReplaying": False,
                           "parentInstanceId": None, "input": self.encoded_input, "upperSchemaVersion": 0})

    def episode_ended(self) -> None:
        """What the extension records when an episode ends: its events are played from now on."""
        self.add(ORCHESTRATOR_COMPLETED)
        for event in self.events:
            event["IsPlayed"] = True

    def schedule(self, action: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        event_id = self.scheduled
        self.scheduled += 1
        if action["actionType"] == CALL_ACTIVITY:
            self.add(TASK_SCHEDULED, event_id=event_id, Name=action["functionName"], Input=action.get("input"))
        elif action["actionType"] == CREATE_TIMER:
            self.add(TIMER_CREATED, event_id=event_id, FireAt=action["fireAt"])
        else:
            raise RuntimeError(f"the orchestrator asked for action type {action['actionType']}, which this runtime does not run")
        return event_id, action

    def awaiting(self) -> list[tuple[int, dict[str, Any]]]:
        """Tasks and timers the last episode scheduled whose outcome is not in the history yet (all
        of them right after the episode; after a restart, those it was still waiting on)."""
        if not self.events or self.events[-1]["EventType"] != ORCHESTRATOR_COMPLETED:
            return []
        ended = {e.get("TaskScheduledId") for e in self.events if e["EventType"] in (TASK_COMPLETED, TASK_FAILED)}
        ended |= {e.get("TimerId") for e in self.events if e["EventType"] == TIMER_FIRED}
        waiting = []
        for event in self.events:
            if event["EventType"] == TASK_SCHEDULED and event["EventId"] not in ended:
                waiting.append((event["EventId"], {"actionType": CALL_ACTIVITY, "functionName": event["Name"], "input": event.get("Input")}))
            elif event["EventType"] == TIMER_CREATED and event["EventId"] not in ended:
                waiting.append((event["EventId"], {"actionType": CREATE_TIMER, "fireAt": event["FireAt"]}))
        return waiting

    def to_document(self, name: str) -> dict[str, Any]:
        return {"name": name, "instance_id": self.instance_id, "input": self.encoded_input, "events": self.events, "scheduled": self.scheduled}

    @classmethod
    def from_document(cls, doc: dict[str, Any]) -> "History":
        history = cls.__new__(cls)
        history.instance_id, history.encoded_input = doc["instance_id"], doc["input"]
        history.events, history.scheduled = doc["events"], doc["scheduled"]
        return history

    def new_actions(self, state: dict[str, Any]) -> list[dict[str, Any]]:
        """Actions the episode returned beyond those already scheduled (schema V1 returns them all)."""
        actions = [action for group in state.get("actions") or [] for action in group]
        return actions[self.scheduled :]


@dataclass
class InstanceStatus:
    runtime_status: str | None
    output: Any = None
    custom_status: Any = None


class LocalDurableRuntime:
    """`history_dir`: where each running instance's history is kept (a JSON file per instance,
    written after every step), so that a restart of the local host resumes it, as the task hub
    does in Azure: tasks it was waiting on run again (at least once, as in Durable), timers fire
    when due."""

    def __init__(self, entries: list[FunctionEntry], invoke: Callable[..., Awaitable[Any]], host_url: str,
                 history_dir: str | Path | None = None) -> None:
        self._invoke = invoke  # the worker's: (entry, inputs, trigger_metadata) -> InvocationResponse
        self._history_dir = Path(history_dir) if history_dir else None
        self.resume_lock: Any = None  # with several local workers: the lock that makes this one the resumer
        self._orchestrators: dict[str, FunctionEntry] = {}
        self._activities: dict[str, FunctionEntry] = {}
        for entry in entries:
            trigger = entry.trigger
            kind = trigger.get("type")
            if kind == "orchestrationTrigger":
                self._orchestrators[entry.name] = entry
            elif kind == "activityTrigger":
                self._activities[entry.name] = entry
        # What the extension gives a durable client binding: where its HTTP API is.
        self.client_binding = json.dumps({
            "taskHubName": "SekishoLocal", "creationUrls": {}, "managementUrls": {},
            "rpcBaseUrl": f"{host_url.rstrip('/')}{DURABLE_API}", "baseUrl": f"{host_url.rstrip('/')}{DURABLE_API}",
            "requiredQueryStringParameters": "", "httpBaseUrl": "",
        })
        self.instances: dict[str, InstanceStatus] = {}
        self._tasks: set[asyncio.Task] = set()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # The extension's HTTP API, as far as the SDK's client uses it here -------------------------
    async def handle_api(self, method: str, path: str, body: bytes) -> Response:
        """`POST orchestrators/{name}/{id}` starts an instance; `GET instances/{id}` reads one."""
        parts = [unquote(p) for p in path.split("?", 1)[0].strip("/").split("/")]
        if method == "POST" and len(parts) == 3 and parts[0] == "orchestrators":
            name, instance_id = parts[1], parts[2]
            if name not in self._orchestrators:
                return JSONResponse({"ExceptionMessage": f"The function '{name}' doesn't exist."}, status_code=400)
            # The SDK's client posts its serialized input as a JSON string: that text is the input
            # (another client's JSON value is the input itself).
            posted = json.loads(body) if body else None
            self.start(name, instance_id, posted if isinstance(posted, str) else json.dumps(posted))
            return JSONResponse({"id": instance_id}, status_code=202)
        if method == "GET" and len(parts) == 2 and parts[0] == "instances":
            status = self.instances.get(parts[1])
            if status is None:
                return Response(status_code=404)
            shape = {"instanceId": parts[1], "runtimeStatus": status.runtime_status, "customStatus": status.custom_status,
                     "output": status.output}
            return JSONResponse(shape, status_code=200 if status.runtime_status in ("Completed",) else 202)
        return Response(status_code=404)

    # Orchestrations ------------------------------------------------------------------------------
    def start(self, name: str, instance_id: str, encoded_input: str) -> str:
        if instance_id in self.instances and self.instances[instance_id].runtime_status in ("Pending", "Running"):
            return instance_id  # already running: one orchestration per instance id
        self._begin(name, History(name, instance_id, encoded_input))
        return instance_id

    def resume(self) -> int:
        """Carry on with the instances a previous run of the local host left unfinished."""
        resumed = 0
        for path in sorted(self._history_dir.glob("*.json")) if self._history_dir and self._history_dir.exists() else ():
            try:
                doc = json.loads(path.read_text(encoding="utf-8"))
                history = History.from_document(doc)
            except (OSError, ValueError, KeyError):
                logger.exception("cannot resume the orchestration in %s", path)
                continue
            if doc["name"] in self._orchestrators and history.instance_id not in self.instances:
                self._begin(doc["name"], history)
                resumed += 1
        return resumed

    def _begin(self, name: str, history: History) -> None:
        if len(self.instances) >= _MAX_REMEMBERED:  # forget finished instances, oldest first
            for old in [k for k, v in self.instances.items() if v.runtime_status in ("Completed", "Failed", "Terminated")][: _MAX_REMEMBERED // 2]:
                del self.instances[old]
        self.instances[history.instance_id] = InstanceStatus("Pending")
        self._save(name, history)
        task = asyncio.get_running_loop().create_task(self._run(name, history), name=f"orchestration-{history.instance_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _path(self, instance_id: str) -> Path | None:
        return self._history_dir / f"{quote(instance_id, safe='')}.json" if self._history_dir else None

    def _save(self, name: str, history: History) -> None:
        path = self._path(history.instance_id)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".tmp")
            partial.write_text(json.dumps(history.to_document(name)), encoding="utf-8")
            partial.replace(path)  # whole or not at all

    def _forget(self, instance_id: str) -> None:
        path = self._path(instance_id)
        if path is not None:
            path.unlink(missing_ok=True)

    async def _run(self, name: str, history: History) -> None:
        instance_id = history.instance_id
        status = self.instances[instance_id]
        status.runtime_status = "Running"
        orchestrator = self._orchestrators[name]
        context = orchestrator.trigger["name"]
        try:
            while True:
                waiting = history.awaiting()
                if waiting:  # the last episode's tasks, scheduled and not yet done (after a restart too)
                    outcomes = [await self._complete(instance_id, event_id, action) for event_id, action in waiting]
                    history.add(ORCHESTRATOR_STARTED)
                    history.events.extend(outcomes)
                    self._save(name, history)
                answer = await self._invoke(orchestrator, {context: history.context()})
                state = untyped(answer.return_value)
                state = json.loads(state) if isinstance(state, str) else state
                status.custom_status = state.get("customStatus")
                if state.get("isDone"):
                    status.runtime_status, status.output = "Completed", state.get("output")
                    self._forget(instance_id)
                    return
                if state.get("error"):
                    logger.error("orchestration %s failed: %s", instance_id, state["error"])
                    status.runtime_status = "Failed"
                    self._forget(instance_id)
                    return
                if not [history.schedule(action) for action in history.new_actions(state)]:
                    raise RuntimeError(f"orchestration {instance_id} waits on nothing this runtime can complete")
                history.episode_ended()
                self._save(name, history)
        except asyncio.CancelledError:
            status.runtime_status = "Terminated"  # the history stays: the next start resumes it
            raise
        except Exception:
            logger.exception("orchestration %s failed", instance_id)
            status.runtime_status = "Failed"
            self._forget(instance_id)

    async def _complete(self, instance_id: str, event_id: int, action: dict[str, Any]) -> dict[str, Any]:
        """Run a scheduled activity, or wait out a timer; the history event that says how it ended."""
        if action["actionType"] == CREATE_TIMER:
            fire_at = isoparse(action["fireAt"])
            await asyncio.sleep(max(0.0, (fire_at - datetime.now(timezone.utc)).total_seconds()))
            return history_event(TIMER_FIRED, TimerId=event_id, FireAt=action["fireAt"])
        activity = self._activities[action["functionName"]]
        try:
            # The activity's input goes as the JSON the orchestrator encoded; its result is stored encoded.
            answer = await self._invoke(activity, {activity.trigger["name"]: protos.TypedData(json=action["input"]) if action.get("input") is not None else protos.TypedData()})
            result = untyped(answer.return_value)
        except Exception as exc:
            logger.exception("activity %s of %s failed", action["functionName"], instance_id)
            return history_event(TASK_FAILED, TaskScheduledId=event_id, Reason=str(exc), Details=traceback.format_exc())
        return history_event(TASK_COMPLETED, TaskScheduledId=event_id, Result=json.dumps(result))
