"""The Python language worker as the Functions host sees it: a process of its own.

What the host does, in order: `WorkerInitRequest` (the runtime indexes `function_app.py` through
its loader and, the app using HTTP streaming, starts its own web server and answers with its
address in the `HttpUri` capability); `FunctionsMetadataRequest` (the functions with their
bindings, as JSON, which is all the host knows of them); one `FunctionLoadRequest` per function;
then one `InvocationRequest` per call. An HTTP call is two things at once, joined by the
invocation id: the invocation message, carrying the route parameters, and the HTTP request
itself, forwarded to the runtime's web server with the id in `x-ms-invocation-id`; the runtime
pairs them, runs the function, and its web server streams the response back.

The worker is a separate process (`worker_process.py`), as in Azure: the app is imported and
runs there, and the messages go to it serialized over a loopback channel (`worker_protocol.py`).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import uuid
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Awaitable

from .worker_protocol import frame, protos, read_message, until_listening

logger = logging.getLogger("sekisho.localhost")

_PROJECT_ROOT = Path(__file__).resolve().parents[3]  # where `shared` is importable from
INVOCATION_ID_HEADER = "x-ms-invocation-id"
HOST_VERSION = "4.1040.0"  # the Functions host generation that runs Python 3.13 with the runtime library


class WorkerError(RuntimeError):
    """The worker answered a host request with a failure status."""


@dataclass(frozen=True)
class FunctionEntry:
    """One function as the host knows it: its name, the id the worker gave it, and its bindings
    (the raw binding JSON of the function metadata)."""

    name: str
    function_id: str | None
    bindings: tuple[dict[str, Any], ...] = field(default=())

    @property
    def trigger(self) -> dict[str, Any]:
        return next((b for b in self.bindings if str(b.get("type", "")).endswith("Trigger")), {})

    def binding(self, binding_type: str) -> dict[str, Any] | None:
        return next((b for b in self.bindings if b.get("type") == binding_type), None)


def entries_of(app) -> list[FunctionEntry]:
    """The host's view of an app's functions without a worker (for tests and tools): the same
    raw bindings the worker sends, from the same indexing."""
    from .functions_host import registered_functions

    return [FunctionEntry(f.get_function_name(), None, tuple(json.loads(b) for b in f.get_raw_bindings()))
            for f in registered_functions(app)]


def _die_with_parent() -> None:
    """In the worker process, before it runs: the kernel ends it when the host process ends."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _check(response, what: str) -> None:
    if response.result.status != protos.StatusResult.Success:
        raise WorkerError(f"{what} failed: {response.result.exception.message}\n{response.result.exception.stack_trace}")


def typed(value: Any) -> Any:
    """A value as the host sends binding data: text as string, bytes as bytes, the rest as JSON."""
    if isinstance(value, bytes):
        return protos.TypedData(bytes=value)
    if isinstance(value, str):
        return protos.TypedData(string=value)
    return protos.TypedData(json=json.dumps(value))


def untyped(data) -> Any:
    """A worker's TypedData as a Python value (JSON decoded)."""
    kind = data.WhichOneof("data")
    if kind is None:
        return None
    value = getattr(data, kind)
    return json.loads(value) if kind == "json" else value


class LanguageWorker:
    """The host's side of one worker process: starts it, drives its start-up, then sends it one
    InvocationRequest per call and matches each answer to its request."""

    def __init__(self, app_directory: str | os.PathLike, host: str = "127.0.0.1") -> None:
        self.app_directory = str(app_directory)
        self.host = host
        self.http_uri: str | None = None
        self.functions: list[FunctionEntry] = []
        self.process: asyncio.subprocess.Process | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[str, asyncio.Future] = {}
        self._reading: asyncio.Task | None = None
        self._stopping = False

    async def start(self, timeout: float = 60.0) -> None:
        connected: asyncio.Future = asyncio.get_running_loop().create_future()

        def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if not connected.done():
                connected.set_result((reader, writer))
            else:
                writer.close()  # one worker per channel

        server = await asyncio.start_server(on_connect, self.host, 0)
        port = server.sockets[0].getsockname()[1]
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "shared.local.host.worker_process", "--host", self.host, "--port", str(port),
            "--app-dir", self.app_directory, cwd=_PROJECT_ROOT, preexec_fn=_die_with_parent,
        )
        try:
            reader, self._writer = await asyncio.wait_for(asyncio.shield(connected), timeout)
        except TimeoutError:
            raise WorkerError(f"the worker process did not connect within {timeout:.0f} s") from None
        finally:
            server.close()
        self._reading = asyncio.get_running_loop().create_task(self._read(reader), name="worker-channel")
        init = await self._request("worker_init_response", worker_init_request=protos.WorkerInitRequest(
            host_version=HOST_VERSION, function_app_directory=self.app_directory, worker_directory=self.app_directory,
        ))
        _check(init, "WorkerInitRequest")
        self.http_uri = init.capabilities.get("HttpUri")
        metadata = await self._request("function_metadata_response", functions_metadata_request=protos.FunctionsMetadataRequest(
            function_app_directory=self.app_directory))
        _check(metadata, "FunctionsMetadataRequest")
        functions = []
        for entry in metadata.function_metadata_results:
            loaded = await self._request("function_load_response", function_load_request=protos.FunctionLoadRequest(
                function_id=entry.function_id, metadata=entry))
            _check(loaded, f"FunctionLoadRequest for {entry.name}")
            functions.append(FunctionEntry(entry.name, entry.function_id, tuple(json.loads(b) for b in entry.raw_bindings)))
        self.functions = functions
        if self.http_uri and not await until_listening(self.http_uri):
            raise WorkerError(f"the worker's HTTP server at {self.http_uri} did not start")
        logger.info("worker process %d indexed %d functions; HTTP streaming at %s", self.process.pid, len(functions), self.http_uri)

    async def stop(self, timeout: float = 15.0) -> None:
        """End the worker process: SIGTERM (it finishes its requests and closes the app), then kill."""
        if self.process is None or self.process.returncode is not None:
            return
        self._stopping = True
        self.process.terminate()
        try:
            await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
        if self._reading is not None:
            self._reading.cancel()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while (message := await read_message(reader)) is not None:
            waiting = self._pending.pop(message.request_id, None)
            if waiting is not None and not waiting.done():
                waiting.set_result(message)
        failure = WorkerError("the worker process ended")
        for waiting in self._pending.values():
            if not waiting.done():
                waiting.set_exception(failure)
        self._pending.clear()
        if not self._stopping:
            logger.error("the worker process ended; the local host cannot serve its functions until it is restarted")

    def _send(self, request_id: str, **content) -> asyncio.Future:
        """Send one message now; the future is the worker's answer to it."""
        if self._writer is None or self._reading is None or self._reading.done():
            raise WorkerError("the worker process is not running")
        waiting = self._pending[request_id] = asyncio.get_running_loop().create_future()
        self._writer.write(frame(protos.StreamingMessage(request_id=request_id, **content)))
        return waiting

    async def _answer(self, request_id: str, waiting: asyncio.Future, answer_field: str):
        try:
            answer = await waiting
        finally:
            self._pending.pop(request_id, None)
        return getattr(answer, answer_field)

    async def _request(self, answer_field: str, request_id: str | None = None, **content):
        """Send one message and wait for the worker's answer to it."""
        request_id = request_id or str(uuid.uuid4())
        return await self._answer(request_id, self._send(request_id, **content), answer_field)

    def send_invocation(self, function: FunctionEntry, inputs: dict[str, Any], trigger_metadata: dict[str, Any] | None = None,
                        invocation_id: str | None = None) -> Awaitable:
        """Send one InvocationRequest now (before the call's HTTP request is forwarded, as the host
        does: the worker can unpack it while the request is on its way); `inputs` maps binding
        names to TypedData (or plain values). Await the result for the InvocationResponse; a
        failed invocation raises WorkerError."""
        request = protos.InvocationRequest(
            invocation_id=invocation_id or str(uuid.uuid4()), function_id=function.function_id,
            input_data=[protos.ParameterBinding(name=name, data=value if isinstance(value, protos.TypedData) else typed(value))
                        for name, value in inputs.items()],
            trigger_metadata={k: v if isinstance(v, protos.TypedData) else typed(v) for k, v in (trigger_metadata or {}).items()},
        )
        waiting = self._send(request.invocation_id, invocation_request=request)
        return self._invocation_answer(function, request.invocation_id, waiting)

    async def _invocation_answer(self, function: FunctionEntry, invocation_id: str, waiting: asyncio.Future):
        response = await self._answer(invocation_id, waiting, "invocation_response")
        _check(response, f"invocation of {function.name}")
        return response

    async def invoke(self, function: FunctionEntry, inputs: dict[str, Any], trigger_metadata: dict[str, Any] | None = None,
                     invocation_id: str | None = None):
        """One InvocationRequest, sent and answered; see send_invocation."""
        return await self.send_invocation(function, inputs, trigger_metadata, invocation_id)

    def http_input(self, method: str, url: str, headers: dict[str, str], route_params: dict[str, str],
                   query: dict[str, str]):
        """The HTTP trigger's binding data when the worker streams HTTP: the request's shape and
        route parameters; the body goes to the worker's web server, not into the message."""
        return protos.TypedData(http=protos.RpcHttp(method=method, url=url, headers=headers, params=route_params, query=query))
