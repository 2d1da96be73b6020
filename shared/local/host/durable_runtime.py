"""The Durable Functions extension and the job queue, played in-process by the local host.

Azure runs an async job as: queue message → `job_starter` (queue trigger + durable client) →
`sekisho_job` orchestrator → `sekisho_job_attempt` / `sekisho_job_give_up` activities, with
durable timers between attempts. Locally the same registered functions run, read off the
FunctionApp: the starter gets the message and a client whose `start_new` runs the orchestrator
generator on the event loop; each `call_activity` awaits the registered activity function, and
each `create_timer` sleeps until its time. What this does not reproduce: persistence across
restarts (a job in flight when the local host stops is left as it was) and history replay.
"""
from __future__ import annotations

import asyncio
import inspect
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

import azure.functions as func

from ...jobs.orchestration import START_QUEUE, start_message
from .functions_host import registered_functions

logger = logging.getLogger("sekisho.localhost.durable")
_MAX_REMEMBERED = 10_000  # instance statuses kept (the job store, not this, is what clients read)


@dataclass
class ActivityCall:
    name: str
    input: Any


@dataclass
class Timer:
    fire_at: datetime


class LocalOrchestrationContext:
    """The part of DurableOrchestrationContext that Sekisho's orchestrator uses."""

    def __init__(self, instance_id: str, input_: Any) -> None:
        self.instance_id = instance_id
        self._input = input_
        self.current_utc_datetime = datetime.now(timezone.utc)
        self.custom_status: Any = None

    def get_input(self) -> Any:
        return self._input

    def call_activity(self, name: str, input_: Any = None) -> ActivityCall:
        return ActivityCall(name, input_)

    def create_timer(self, fire_at: datetime) -> Timer:
        return Timer(fire_at)

    def set_custom_status(self, status: Any) -> None:
        self.custom_status = status


@dataclass
class InstanceStatus:
    runtime_status: str | None
    output: Any = None
    custom_status: Any = None


class LocalDurableClient:
    """The part of DurableOrchestrationClient that the starter uses."""

    def __init__(self, runtime: "LocalDurableRuntime") -> None:
        self._runtime = runtime

    async def get_status(self, instance_id: str) -> InstanceStatus:
        return self._runtime.instances.get(instance_id) or InstanceStatus(None)

    async def start_new(self, orchestration_function_name: str, instance_id: str | None = None, client_input: Any = None) -> str:
        return self._runtime.start(orchestration_function_name, instance_id, client_input)


def _orchestrator_generator(handle: Callable) -> Callable:
    """The user's generator function inside the handle that DFApp registers (it closes over it)."""
    function = inspect.getclosurevars(handle).nonlocals.get("fn")
    if not inspect.isgeneratorfunction(function):
        raise RuntimeError(f"cannot find the orchestrator generator behind {handle!r}")
    return function


class LocalDurableRuntime:
    def __init__(self, app) -> None:
        self._starter: Callable | None = None
        self._orchestrators: dict[str, Callable] = {}
        self._activities: dict[str, tuple[Callable, str]] = {}
        for function in registered_functions(app):
            trigger = function.get_trigger()
            kind, name = getattr(trigger, "type", None), function.get_function_name()
            user_function = function.get_user_function()
            if kind == "queueTrigger" and trigger.queue_name == START_QUEUE:
                # durable_client_input wraps the user code to build the client from the host's
                # binding data; locally the client is ours, so call the user code itself.
                self._starter = getattr(user_function, "client_function", user_function)
                self._starter_arg = trigger.name
            elif kind == "orchestrationTrigger":
                self._orchestrators[name] = _orchestrator_generator(user_function)
            elif kind == "activityTrigger":
                self._activities[name] = (user_function, trigger.name)
        if self._starter is None:
            raise RuntimeError(f"no function is triggered by the {START_QUEUE} queue")
        self.instances: dict[str, InstanceStatus] = {}
        self._tasks: set[asyncio.Task] = set()

    # JobLauncher ---------------------------------------------------------------------------------
    async def launch(self, job: dict[str, Any]) -> None:
        message = func.QueueMessage(id=job["id"], body=json.dumps(start_message(job)).encode())
        await self._starter(**{self._starter_arg: message, "client": LocalDurableClient(self)})

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # Orchestrations ------------------------------------------------------------------------------
    def start(self, name: str, instance_id: str, client_input: Any) -> str:
        if len(self.instances) >= _MAX_REMEMBERED:  # forget finished instances, oldest first
            for old in [k for k, v in self.instances.items() if v.runtime_status in ("Completed", "Failed", "Terminated")][: _MAX_REMEMBERED // 2]:
                del self.instances[old]
        self.instances[instance_id] = InstanceStatus("Pending")
        task = asyncio.get_running_loop().create_task(self._run(name, instance_id, client_input), name=f"orchestration-{instance_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return instance_id

    async def _run(self, name: str, instance_id: str, client_input: Any) -> None:
        context = LocalOrchestrationContext(instance_id, client_input)
        status = self.instances[instance_id]
        status.runtime_status = "Running"
        steps = self._orchestrators[name](context)
        sent: Any = None
        failure: BaseException | None = None
        try:
            while True:
                action = steps.throw(failure) if failure is not None else steps.send(sent)
                sent, failure = None, None
                if isinstance(action, ActivityCall):
                    function, argument = self._activities[action.name]
                    try:
                        sent = await function(**{argument: action.input})
                    except Exception as exc:  # Durable throws an activity's failure into the orchestrator
                        logger.exception("activity %s of %s failed", action.name, instance_id)
                        failure = exc
                elif isinstance(action, Timer):
                    await asyncio.sleep(max(0.0, (action.fire_at - datetime.now(timezone.utc)).total_seconds()))
                else:
                    raise RuntimeError(f"the orchestrator yielded {action!r}, which this runtime does not run")
                context.current_utc_datetime = datetime.now(timezone.utc)
                status.custom_status = context.custom_status
        except StopIteration as done:
            status.runtime_status, status.output = "Completed", done.value
        except asyncio.CancelledError:
            status.runtime_status = "Terminated"
            raise
        except Exception:
            logger.exception("orchestration %s failed", instance_id)
            status.runtime_status = "Failed"
