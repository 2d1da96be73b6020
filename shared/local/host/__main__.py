"""Serve the Functions app locally: `python -m shared.local.host` (what `make run` does).

- Upstream: with no AZURE_OPENAI_ENDPOINT set, the built-in simulator is started; set it (and
  AZURE_OPENAI_API_KEY, or sign in with `az login` for Entra ID) to use a real endpoint.
- Identity: with no SEKISHO_AUTH_TENANT_IDS set, a local issuer (key pair in the data folder)
  stands in for Entra ID; a demo app is registered and a token for it is printed and written to
  <data-dir>/demo-token.txt. Set the SEKISHO_AUTH_* settings to accept real Entra tokens.
- Store: SQLite in the data folder unless SEKISHO_STORE / SEKISHO_SQLITE_PATH say otherwise.
"""
from __future__ import annotations

import argparse
import atexit
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import uvicorn

from ..issuer import LocalIssuer
from .durable_runtime import LocalDurableRuntime
from .functions_host import FunctionsAsgiApp
from .issuer_routes import IssuerRoutes
from .language_worker import LanguageWorker, _die_with_parent
from .timers import LocalTimers

DEMO_DEPLOYMENTS = ("gpt-4o-mini", "text-embedding-3-small", "whisper", "gpt-4o-transcribe", "tts", "dall-e-3", "gpt-image-1")

PROJECT_ROOT = Path(__file__).resolve().parents[3]


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
        sys.executable, "-m", "shared.local.simulator", "--port", str(port),
        "--latency-ms", str(latency_ms), "--chunk-interval-ms", str(chunk_interval_ms),
    ]
    # The key goes by environment, not on the command line where every process list shows it.
    env = {**os.environ, "SEKISHO_SIMULATOR_API_KEY": api_key}
    process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, preexec_fn=_die_with_parent)
    atexit.register(process.terminate)
    _wait_for_port("127.0.0.1", port)
    return process, f"http://127.0.0.1:{port}", api_key


_ISSUER_DIR_ENV = "SEKISHO_LOCAL_ISSUER_DIR"  # set by main() for worker processes
_DATA_DIR_ENV = "SEKISHO_LOCAL_DATA_DIR"
_HOST_URL_ENV = "SEKISHO_LOCAL_HOST_URL"
_APP_DIR_ENV = "SEKISHO_LOCAL_APP_DIR"


def build_asgi_app(app_dir: str | Path = PROJECT_ROOT, data_dir: str | Path | None = None,
                   host_url: str = "http://127.0.0.1:7071") -> FunctionsAsgiApp:
    """The local host for the Functions app in `app_dir`. The app itself runs in a worker
    process of its own, started when the server starts: imported, indexed and invoked by the
    Python worker runtime there, as in Azure; this process plays the Functions host."""
    worker = LanguageWorker(app_dir)
    local = FunctionsAsgiApp(worker)

    def started(functions) -> None:
        local.timers = LocalTimers(functions, worker.invoke)
        if any(f.trigger.get("type") == "orchestrationTrigger" for f in functions):
            # The Durable extension: orchestrations run here, each history kept in the data
            # folder so that a restart resumes it.
            runtime = LocalDurableRuntime(functions, worker.invoke, host_url, Path(data_dir) / "durable" if data_dir else None)
            local.durable = runtime
            local.on_shutdown(runtime.close)
            _resume_once(runtime, data_dir)

    local.on_startup(started)
    return local


def _resume_once(runtime: LocalDurableRuntime, data_dir: str | Path | None) -> None:
    """Resume unfinished orchestrations in one worker only (the first to take the lock)."""
    if not data_dir:
        return
    import fcntl

    lock = open(Path(data_dir) / "durable.lock", "a")  # kept open (and locked) while the worker lives
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        return
    runtime.resume_lock = lock
    resumed = runtime.resume()
    if resumed:
        logging.getLogger("sekisho.localhost").warning("resumed %s unfinished async job orchestration(s)", resumed)


def worker_app():
    """The ASGI app of one worker process (with --workers > 1, each worker builds its own; the
    parent has set the environment: upstream, issuer, store path)."""
    app = build_asgi_app(os.environ.get(_APP_DIR_ENV, str(PROJECT_ROOT)), data_dir=os.environ.get(_DATA_DIR_ENV),
                         host_url=os.environ.get(_HOST_URL_ENV, "http://127.0.0.1:7071"))
    issuer_dir = os.environ.get(_ISSUER_DIR_ENV)
    return IssuerRoutes(app, LocalIssuer(issuer_dir)) if issuer_dir else app


def demo_app_id(issuer: LocalIssuer) -> str:
    import uuid

    return str(uuid.uuid5(uuid.UUID(issuer.tenant_id), "sekisho-demo-app"))


async def seed_demo_app(app_id: str) -> None:
    """Register the demo app if it is missing (never overwrites an admin's changes)."""
    from ...admin.api import PolicyService
    from ...settings import Settings
    from ...store import AlreadyExists, open_store

    store = await open_store(Settings.from_env(serving=False))
    try:
        data = {"name": "Demo app", "settings": {"allowed_deployments": list(DEMO_DEPLOYMENTS), "trust_user_header": True}}
        await PolicyService(store).put("app", app_id, None, data, actor="localhost:seed", create_only=True)
    except AlreadyExists:
        pass
    finally:
        await store.close()


def banner(port: int, upstream: str, token_file: Path | None) -> str:
    base = f"http://127.0.0.1:{port}"
    if token_file is None:
        auth = "Send an Entra ID access token for the gateway's app registration as SEKISHO_TOKEN."
    else:
        auth = f"A token for the demo app is in {token_file} (valid 12 h; `python -m shared.admin.cli token mint --help` for more)."
    return f"""
Sekisho is serving on {base}  (upstream: {upstream})
{auth}

  export SEKISHO_TOKEN=$(cat {token_file or '<token file>'})
  curl -s '{base}/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21' \\
       -H "Authorization: Bearer $SEKISHO_TOKEN" -H 'Content-Type: application/json' \\
       -d '{{"messages": [{{"role": "user", "content": "Hello"}}]}}'

  import os
  from openai import AzureOpenAI
  client = AzureOpenAI(azure_endpoint="{base}", azure_ad_token=os.environ["SEKISHO_TOKEN"], api_version="2024-10-21")
  print(client.chat.completions.create(model="gpt-4o-mini",
        messages=[{{"role": "user", "content": "Hello"}}]).choices[0].message.content)

Press Ctrl+C to stop.
"""


def _dump_tasks_on_sigusr1() -> None:
    """`kill -USR1 <pid>` prints every pending asyncio task's stack: for diagnosing a stuck request."""
    import asyncio
    import signal

    def dump(signum, frame) -> None:
        loop = asyncio._get_running_loop()
        print(f"=== {len(asyncio.all_tasks(loop)) if loop else 0} tasks", file=sys.stderr, flush=True)
        for task in asyncio.all_tasks(loop) if loop else ():
            task.print_stack(file=sys.stderr)

    signal.signal(signal.SIGUSR1, dump)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve Sekisho's functions locally")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("SEKISHO_LOCAL_PORT", "7071")))
    parser.add_argument("--simulator-port", type=int, default=int(os.environ.get("SEKISHO_SIMULATOR_PORT", "7072")),
                        help="port of the built-in simulator (default SEKISHO_SIMULATOR_PORT or 7072)")
    parser.add_argument("--simulator-latency-ms", type=float, default=40.0)
    parser.add_argument("--simulator-chunk-interval-ms", type=float, default=15.0)
    parser.add_argument("--data-dir", default=".data", help="SQLite database and local issuer keys")
    parser.add_argument("--no-seed", action="store_true", help="do not register the demo app")
    parser.add_argument("--app-dir", default=str(PROJECT_ROOT),
                        help="folder of the Functions app to serve (function_app.py, host.json); default: Sekisho itself")
    parser.add_argument("--quiet", action="store_true", help="do not print the how-to banner")
    parser.add_argument("--workers", type=int, default=int(os.environ.get("SEKISHO_LOCAL_WORKERS", "1")),
                        help="worker processes (they share the SQLite store; quotas and the cache stay correct across them)")
    args = parser.parse_args(argv)
    _dump_tasks_on_sigusr1()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("azure").setLevel(logging.WARNING)  # the SDKs log every HTTP call at INFO
    os.chdir(PROJECT_ROOT)

    data_dir = Path(args.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    os.environ[_DATA_DIR_ENV] = str(data_dir)
    os.environ[_HOST_URL_ENV] = f"http://127.0.0.1:{args.port}"
    os.environ[_APP_DIR_ENV] = str(Path(args.app_dir).resolve())
    os.environ.setdefault("SEKISHO_PUBLIC_BASE_URL", f"http://127.0.0.1:{args.port}")  # Azure: https://<WEBSITE_HOSTNAME>
    # The app's job launcher puts its messages on the local host's queue (Azure: Storage queues).
    os.environ["SEKISHO_LOCAL_QUEUE_URL"] = f"http://127.0.0.1:{args.port}/admin/queues"
    os.environ.setdefault("SEKISHO_SQLITE_PATH", str(data_dir / "sekisho.db"))
    os.environ.setdefault("SEKISHO_LOG_SPOOL_DIR", str(data_dir / "log-spool"))
    upstream = os.environ.get("AZURE_OPENAI_ENDPOINT", "")
    if not upstream:
        _, endpoint, key = start_simulator(args.simulator_port, args.simulator_latency_ms, args.simulator_chunk_interval_ms)
        os.environ["AZURE_OPENAI_ENDPOINT"] = endpoint
        os.environ["AZURE_OPENAI_API_KEY"] = key
        if not os.environ.get("SEKISHO_CONTENT_SAFETY_ENDPOINT"):  # the simulator serves Content Safety too
            os.environ["SEKISHO_CONTENT_SAFETY_ENDPOINT"], os.environ["SEKISHO_CONTENT_SAFETY_API_KEY"] = endpoint, key
        os.environ.setdefault("SEKISHO_DEPLOYMENTS", ",".join(DEMO_DEPLOYMENTS))
        upstream = f"built-in simulator at {endpoint}"

    if not os.environ.get("SEKISHO_GATEWAY_KEY_PEPPER"):
        # Gateway keys work locally: a pepper of this data folder's own, kept beside the issuer's keys.
        pepper_file = data_dir / "gateway-key-pepper"
        if not pepper_file.exists():
            data_dir.mkdir(parents=True, exist_ok=True)
            pepper_file.write_text(secrets.token_urlsafe(32))
            os.chmod(pepper_file, 0o600)
        os.environ["SEKISHO_GATEWAY_KEY_PEPPER"] = pepper_file.read_text().strip()
    token_file = None
    if not os.environ.get("SEKISHO_AUTH_TENANT_IDS"):
        issuer = LocalIssuer(data_dir)
        os.environ.update(issuer.gateway_settings(f"http://127.0.0.1:{args.port}"))
        os.environ[_ISSUER_DIR_ENV] = str(data_dir)
        if not args.no_seed:
            import asyncio

            app_id = demo_app_id(issuer)
            asyncio.run(seed_demo_app(app_id))
            token_file = data_dir / "demo-token.txt"
            token_file.write_text(issuer.mint(app_id, lifetime_seconds=12 * 3600))
            os.chmod(token_file, 0o600)
    if not args.quiet:
        print(banner(args.port, upstream, token_file), flush=True)
    # The event loop Azure runs the app on: the Python worker's own asyncio loop, in which the HTTP
    # streaming extension serves uvicorn (httptools, as installed). Not uvloop: it is faster here,
    # but Azure does not run it, and under overload it left some connections unread for up to a
    # second while others were served (p99 at c=64 ~6 × p50; asyncio's loop: ~1.5 ×).
    options = dict(host=args.host, port=args.port, loop="asyncio", http="httptools", lifespan="on",
                   access_log=False, log_level="warning", timeout_graceful_shutdown=10)
    if args.workers > 1:
        _serve_workers(args.workers, options)
    else:
        uvicorn.Server(uvicorn.Config(worker_app(), **options)).run()


def _serve_workers(count: int, options: dict) -> None:
    """Worker processes, each importing function_app and building its own gateway, as Functions
    instances do. Each listens on the port with a socket of its own (SO_REUSEPORT), so that the
    kernel spreads new connections over them as a load balancer spreads requests over instances:
    on one shared socket, whichever worker's event loop wakes first accepts a whole burst."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    from .workers import serve_worker  # importable by name: a spawned process cannot find this __main__'s functions

    workers = [context.Process(target=serve_worker, args=(options,), name=f"sekisho-worker-{n}") for n in range(count)]
    for worker in workers:
        worker.start()

    def stop_workers(signum, frame) -> None:
        for worker in workers:
            if worker.is_alive():
                os.kill(worker.pid, signal.SIGTERM)  # each finishes its requests and shuts down

    signal.signal(signal.SIGTERM, stop_workers)
    signal.signal(signal.SIGINT, stop_workers)
    for worker in workers:
        worker.join()


if __name__ == "__main__":
    main()
