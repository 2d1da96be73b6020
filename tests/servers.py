"""Processes the tests run against: the simulator, the local host, the Cosmos test server."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COSMOS_KEY = "C2y6yDjf5/R+ob0N8A7Cgv30VRDJIWEHLM+4QDU5DE2nQ9nDuVTqobD4b8mGGyPMbIZnqyMsEcaGQy67XIw/Jw=="


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port} after {timeout}s")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Simulator:
    process: subprocess.Popen
    port: int
    api_key: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _call(self, method: str, path: str, payload=None):
        data = json.dumps(payload).encode() if payload is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())

    def inject(self, status: int, count: int = 1, retry_after_ms: int = 1000, deployment: str | None = None) -> None:
        self._call("POST", "/_sim/faults", {"status": status, "count": count, "retry_after_ms": retry_after_ms, "deployment": deployment})

    def reset(self) -> None:
        self._call("POST", "/_sim/reset", {})

    def received(self) -> list[dict]:
        return self._call("GET", "/_sim/stats")["requests"]


def start_simulator(chunk_interval_ms: float = 0, latency_ms: float = 0) -> Simulator:
    port = free_port()
    key = "sim-test-key"
    process = subprocess.Popen(
        [sys.executable, "-m", "shared.local.simulator", "--port", str(port),
         "--chunk-interval-ms", str(chunk_interval_ms), "--latency-ms", str(latency_ms)],
        cwd=ROOT, env={**os.environ, "SEKISHO_SIMULATOR_API_KEY": key},
    )
    wait_for_port(port, process)
    return Simulator(process, port, key)


@dataclass
class LocalHost:
    process: subprocess.Popen
    port: int
    env: dict[str, str]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_local_host(env: dict[str, str], data_dir: str | Path, workers: int = 1) -> LocalHost:
    """The local host on a free port, trusting the local issuer in `data_dir`; no demo app."""
    port = free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("SEKISHO_", "AZURE_OPENAI_"))}
    full_env.update(env)
    process = subprocess.Popen(
        [sys.executable, "-m", "shared.local.host", "--port", str(port), "--quiet", "--no-seed", "--data-dir", str(data_dir), "--workers", str(workers)],
        cwd=ROOT, env=full_env,
    )
    wait_for_port(port, process)
    return LocalHost(process, port, env)


@dataclass
class CosmosServer:
    process: subprocess.Popen
    port: int

    @property
    def endpoint(self) -> str:
        return f"https://127.0.0.1:{self.port}"


def start_cosmos_server() -> CosmosServer:
    binary = ROOT / "node_modules" / ".bin" / "cosmosdb-server"
    if not binary.exists():
        raise RuntimeError("node_modules is missing: run `make test` (it runs `npm ci`)")
    port = free_port()
    process = subprocess.Popen([str(binary), "-p", str(port)], cwd=ROOT, stdout=subprocess.DEVNULL)
    wait_for_port(port, process)
    return CosmosServer(process, port)


# Azurite (Azure Storage emulator, npm) for the async jobs' queue: the real azure-storage-queue SDK.
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="  # Azurite's documented dev key


@dataclass
class AzuriteQueue:
    process: subprocess.Popen
    port: int

    @property
    def connection_string(self) -> str:
        return (f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={AZURITE_KEY};"
                f"QueueEndpoint=http://127.0.0.1:{self.port}/devstoreaccount1;")


def start_azurite_queue(location: str | Path) -> AzuriteQueue:
    binary = ROOT / "node_modules" / ".bin" / "azurite-queue"
    if not binary.exists():
        raise RuntimeError("node_modules is missing: run `make test` (it runs `npm ci`)")
    port = free_port()
    process = subprocess.Popen([str(binary), "--queueHost", "127.0.0.1", "--queuePort", str(port), "--location", str(location),
                                "--silent", "--skipApiVersionCheck", "--loose"], cwd=ROOT, stdout=subprocess.DEVNULL)
    wait_for_port(port, process)
    return AzuriteQueue(process, port)


def post_all(url: str, token: str, body: dict, count: int, headers: dict | None = None) -> list[tuple[int, dict, dict]]:
    """`count` POSTs released together, each from its own thread on its own connection (so that
    they really race, and several server processes each get some). Blocking: call in a thread."""
    import concurrent.futures
    import json
    import threading
    import urllib.error
    import urllib.request

    payload = json.dumps(body).encode()
    barrier = threading.Barrier(count)

    def call() -> tuple[int, dict, dict]:
        request = urllib.request.Request(url, data=payload, method="POST",
                                         headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json", **(headers or {})})
        barrier.wait()
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, dict(response.headers), json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), json.loads(error.read())

    with concurrent.futures.ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(lambda _: call(), range(count)))


async def put_app(url: str, admin_token: str, settings: dict | None = None, name: str = "test app") -> str:
    """Register a new app (a fresh client id) with these policy settings; its id."""
    import uuid

    import aiohttp

    app_id = str(uuid.uuid4())
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin_token}"}) as session:
        async with session.put(f"{url}/sekisho/admin/policies/apps/{app_id}", json={"name": name, "settings": settings or {}}) as response:
            assert response.status == 201, await response.text()
    return app_id
