"""The Python worker process, as Azure runs it on 3.13+: a thin process that connects to the
host, hands every message it receives to the worker runtime library (`azure_functions_runtime`)
and sends back the runtime's answers. The app is imported and run here, in this process, never
in the host's.

    python -m shared.local.host.worker_process --host 127.0.0.1 --port N --app-dir DIR

(The local host starts it; `--host`/`--port` are where the host listens for its worker, as the
Functions host passes them to the workers it starts.) Invocations run concurrently, each as a
task, as the worker runs async functions in its event loop. On SIGTERM the app's gateway, if it
has one, is closed first, so the request log it queued is written before the process ends.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from .worker_protocol import WorkerRequest, frame, protos, read_message, until_listening

logger = logging.getLogger("sekisho.localhost.worker")

# Each request the host sends, the runtime's handler for it, and the field its answer goes in.
_HANDLERS = {
    "worker_init_request": ("worker_init_request", "worker_init_response"),
    "functions_metadata_request": ("functions_metadata_request", "function_metadata_response"),
    "function_load_request": ("function_load_request", "function_load_response"),
    "invocation_request": ("invocation_request", "invocation_response"),
}


async def serve(host: str, port: int) -> None:
    from azure_functions_runtime import handle_event

    reader, writer = await asyncio.open_connection(host, port)
    tasks: set[asyncio.Task] = set()

    async def answer(message) -> None:
        kind = message.WhichOneof("content")
        if kind not in _HANDLERS:
            logger.warning("the worker does not handle %s", kind)
            return
        handler, field = _HANDLERS[kind]
        response = await getattr(handle_event, handler)(WorkerRequest(message, host))
        writer.write(frame(protos.StreamingMessage(request_id=message.request_id, **{field: response})))
        if kind == "worker_init_request" and response.capabilities.get("HttpUri"):
            await _quiet_web_server(response.capabilities["HttpUri"])

    try:
        while (message := await read_message(reader)) is not None:
            if message.WhichOneof("content") == "invocation_request":
                task = asyncio.create_task(answer(message))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            else:  # start-up messages in order: the runtime indexes, then loads
                await answer(message)
    finally:
        for task in list(tasks):
            task.cancel()
        await _close_app()
        writer.close()


async def _quiet_web_server(uri: str) -> None:
    """Once the runtime's web server listens (its uvicorn has set up its loggers by then), keep
    its per-request log lines at warning level, as the local host's console does."""
    await until_listening(uri)
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)


async def _close_app() -> None:
    module = sys.modules.get("function_app")
    gateway = getattr(module, "gateway", None)
    if gateway is not None and hasattr(gateway, "aclose"):
        try:
            await gateway.aclose()
        except Exception:
            logger.exception("closing the app's gateway failed")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The Python worker process of the local Functions host")
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--app-dir", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("azure").setLevel(logging.WARNING)  # the SDKs log every HTTP call at INFO
    sys.path.insert(0, args.app_dir)
    # The event loop Azure runs the app on: the worker's own asyncio loop (not uvloop), in which
    # the HTTP streaming extension serves uvicorn.
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    main_task = loop.create_task(serve(args.host, args.port))
    loop.add_signal_handler(signal.SIGTERM, main_task.cancel)
    loop.add_signal_handler(signal.SIGINT, main_task.cancel)
    try:
        loop.run_until_complete(main_task)
    except asyncio.CancelledError:
        pass
    finally:
        loop.close()
    os._exit(0)  # the runtime's web server task may still be scheduled: the process ends here


if __name__ == "__main__":
    main()
