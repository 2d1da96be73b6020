"""Serve the Functions app locally: `python -m shared.localhost` (what `make run` does).

With no AZURE_OPENAI_ENDPOINT set, the built-in simulator is started as the upstream; set it
(and AZURE_OPENAI_API_KEY, or sign in with `az login` for Entra ID) to use a real endpoint.
"""
from __future__ import annotations

import argparse
import atexit
import importlib
import logging
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import uvicorn

from .functions_host import FunctionsAsgiApp

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _wait_for_port(host: str, port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing is listening on {host}:{port} after {timeout:.0f}s")


def start_simulator(port: int, latency_ms: float, chunk_interval_ms: float) -> tuple[subprocess.Popen, str, str]:
    api_key = secrets.token_urlsafe(24)
    command = [
        sys.executable, "-m", "shared.simulator", "--port", str(port), "--api-key", api_key,
        "--latency-ms", str(latency_ms), "--chunk-interval-ms", str(chunk_interval_ms),
    ]
    process = subprocess.Popen(command, cwd=PROJECT_ROOT)
    atexit.register(process.terminate)
    _wait_for_port("127.0.0.1", port)
    return process, f"http://127.0.0.1:{port}", api_key


def load_function_app(module_name: str = "function_app"):
    if str(PROJECT_ROOT) not in sys.path:
        sys.path.insert(0, str(PROJECT_ROOT))
    return importlib.import_module(module_name)


def build_asgi_app(module_name: str = "function_app") -> FunctionsAsgiApp:
    module = load_function_app(module_name)
    hooks = [module.gateway.aclose] if hasattr(module, "gateway") else []
    return FunctionsAsgiApp(module.app, on_shutdown=hooks)


def banner(port: int, upstream: str) -> str:
    base = f"http://127.0.0.1:{port}"
    return f"""
Sekisho is serving on {base}  (upstream: {upstream})

  curl -s {base}/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21 \\
       -H 'Content-Type: application/json' \\
       -d '{{"messages": [{{"role": "user", "content": "Hello"}}]}}'

  from openai import AzureOpenAI
  client = AzureOpenAI(azure_endpoint="{base}", api_key="unused", api_version="2024-10-21")
  print(client.chat.completions.create(model="gpt-4o-mini",
        messages=[{{"role": "user", "content": "Hello"}}]).choices[0].message.content)

Press Ctrl+C to stop.
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve Sekisho's functions locally")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("SEKISHO_LOCAL_PORT", "7071")))
    parser.add_argument("--simulator-port", type=int, default=7072)
    parser.add_argument("--simulator-latency-ms", type=float, default=40.0)
    parser.add_argument("--simulator-chunk-interval-ms", type=float, default=15.0)
    parser.add_argument("--quiet", action="store_true", help="do not print the how-to banner")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("azure").setLevel(logging.WARNING)  # the SDKs log every HTTP call at INFO
    os.chdir(PROJECT_ROOT)

    upstream = os.environ.get("AZURE_OPENAI_ENDPOINT", "")
    if not upstream:
        _, endpoint, key = start_simulator(args.simulator_port, args.simulator_latency_ms, args.simulator_chunk_interval_ms)
        os.environ["AZURE_OPENAI_ENDPOINT"] = endpoint
        os.environ["AZURE_OPENAI_API_KEY"] = key
        upstream = f"built-in simulator at {endpoint}"

    app = build_asgi_app()
    if not args.quiet:
        print(banner(args.port, upstream), flush=True)
    config = uvicorn.Config(
        app, host=args.host, port=args.port, loop="uvloop", http="httptools", lifespan="on",
        access_log=False, log_level="warning", timeout_graceful_shutdown=10,
    )
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
