"""The Python language worker as the Functions host sees it, run in this process.

What the host does, in order: `WorkerInitRequest` (the runtime indexes `function_app.py` through
its loader and, the app using HTTP streaming, starts its own web server and answers with its
address in the `HttpUri` capability); `FunctionsMetadataRequest` (the functions with their
bindings, as JSON, which is all the host knows of them); one `FunctionLoadRequest` per function;
then one `InvocationRequest` per call. An HTTP call is two things at once, joined by the
invocation id: the invocation message, carrying the route parameters, and the HTTP request
itself, forwarded to the runtime's web server with the id in `x-ms-invocation-id`; the runtime
pairs them, runs the function, and its web server streams the response back.

The runtime keeps the worker's state in its module (one worker per process, as in Azure), so
there is one `LanguageWorker` per local host process.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .worker_protocol import WorkerRequest, protos

logger = logging.getLogger("sekisho.localhost")

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
    def __init__(self, app_directory: str | os.PathLike, host: str = "127.0.0.1") -> None:
        self.app_directory = str(app_directory)
        self.host = host
        self.http_uri: str | None = None
        self.functions: list[FunctionEntry] = []

    async def start(self) -> None:
        # Imported here: the runtime module holds the worker's state, made once per process.
        from azure_functions_runtime import handle_event

        self._runtime = handle_event
        init = await handle_event.worker_init_request(self._message(worker_init_request=protos.WorkerInitRequest(
            host_version=HOST_VERSION, function_app_directory=self.app_directory, worker_directory=self.app_directory,
        )))
        _check(init, "WorkerInitRequest")
        self.http_uri = init.capabilities.get("HttpUri")
        metadata = await handle_event.functions_metadata_request(self._message(
            functions_metadata_request=protos.FunctionsMetadataRequest(function_app_directory=self.app_directory)))
        _check(metadata, "FunctionsMetadataRequest")
        functions = []
        for entry in metadata.function_metadata_results:
            loaded = await handle_event.function_load_request(self._message(function_load_request=protos.FunctionLoadRequest(
                function_id=entry.function_id, metadata=entry)))
            _check(loaded, f"FunctionLoadRequest for {entry.name}")
            functions.append(FunctionEntry(entry.name, entry.function_id, tuple(json.loads(b) for b in entry.raw_bindings)))
        self.functions = functions
        if self.http_uri:
            await self._until_serving()
        logger.info("worker runtime indexed %d functions; HTTP streaming at %s", len(functions), self.http_uri)

    async def _until_serving(self, timeout: float = 15.0) -> None:
        """The runtime starts its web server as a task; requests are forwarded once it listens."""
        parsed = urlsplit(self.http_uri)
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                _, writer = await asyncio.open_connection(parsed.hostname, parsed.port)
                writer.close()
                break
            except OSError:
                if asyncio.get_running_loop().time() > deadline:
                    raise WorkerError(f"the worker's HTTP server at {self.http_uri} did not start")
                await asyncio.sleep(0.02)
        # The runtime's uvicorn logs each request at INFO, as the worker's own log in Azure; the
        # local host's console keeps to warnings.
        logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)

    def _message(self, **content) -> WorkerRequest:
        return WorkerRequest(protos.StreamingMessage(request_id=str(uuid.uuid4()), **content), self.host)

    async def invoke(self, function: FunctionEntry, inputs: dict[str, Any], trigger_metadata: dict[str, Any] | None = None,
                     invocation_id: str | None = None):
        """One InvocationRequest; `inputs` maps binding names to TypedData (or plain values).
        Returns the InvocationResponse; a failed invocation raises WorkerError."""
        request = protos.InvocationRequest(
            invocation_id=invocation_id or str(uuid.uuid4()), function_id=function.function_id,
            input_data=[protos.ParameterBinding(name=name, data=value if isinstance(value, protos.TypedData) else typed(value))
                        for name, value in inputs.items()],
            trigger_metadata={k: v if isinstance(v, protos.TypedData) else typed(v) for k, v in (trigger_metadata or {}).items()},
        )
        response = await self._runtime.invocation_request(self._message(invocation_request=request))
        _check(response, f"invocation of {function.name}")
        return response

    def http_input(self, method: str, url: str, headers: dict[str, str], route_params: dict[str, str],
                   query: dict[str, str]):
        """The HTTP trigger's binding data when the worker streams HTTP: the request's shape and
        route parameters; the body goes to the worker's web server, not into the message."""
        return protos.TypedData(http=protos.RpcHttp(method=method, url=url, headers=headers, params=route_params, query=query))
