"""Shared fixtures: one simulator, one Cosmos test server, and local hosts on both stores."""
from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from shared.store.cosmos import CosmosStore
from shared.store.sqlite import SqliteStore

from .servers import COSMOS_KEY, start_cosmos_server, start_local_host, start_simulator, stop

# Short timeouts so that the timeout tests are quick; streams in the tests pause less than this.
UPSTREAM_READ_TIMEOUT = "1.5"
MAX_BODY_BYTES = 65536


@pytest.fixture(scope="session")
def simulator():
    sim = start_simulator()
    yield sim
    stop(sim.process)


@pytest.fixture(scope="session")
def cosmos_server():
    server = start_cosmos_server()
    yield server
    stop(server.process)


def _gateway_env(simulator, **extra) -> dict[str, str]:
    return {
        "AZURE_OPENAI_ENDPOINT": simulator.url,
        "AZURE_OPENAI_API_KEY": simulator.api_key,
        "SEKISHO_UPSTREAM_READ_TIMEOUT_SECONDS": UPSTREAM_READ_TIMEOUT,
        "SEKISHO_MAX_BODY_BYTES": str(MAX_BODY_BYTES),
        "SEKISHO_LOG_FLUSH_INTERVAL_MS": "20",
        **extra,
    }


@pytest.fixture(scope="session")
def sqlite_path(tmp_path_factory):
    return str(tmp_path_factory.mktemp("sqlite") / "sekisho.db")


@pytest.fixture(scope="session")
def cosmos_database():
    return "sekisho_" + uuid.uuid4().hex[:8]


@pytest.fixture(scope="session")
def gateway(simulator, sqlite_path):
    host = start_local_host(_gateway_env(simulator, SEKISHO_STORE="sqlite", SEKISHO_SQLITE_PATH=sqlite_path))
    yield host
    stop(host.process)


@pytest.fixture(scope="session")
def cosmos_gateway(simulator, cosmos_server, cosmos_database):
    env = _gateway_env(
        simulator,
        SEKISHO_STORE="cosmos",
        SEKISHO_COSMOS_ENDPOINT=cosmos_server.endpoint,
        SEKISHO_COSMOS_KEY=COSMOS_KEY,
        SEKISHO_COSMOS_DATABASE=cosmos_database,
        SEKISHO_COSMOS_VERIFY_TLS="false",
    )
    host = start_local_host(env)
    yield host
    stop(host.process)


def open_store_for(kind: str, sqlite_path: str, cosmos_server=None, database: str | None = None):
    if kind == "sqlite":
        return SqliteStore(sqlite_path)
    return CosmosStore(cosmos_server.endpoint, COSMOS_KEY, database, verify_tls=False)


class LoggedGateway:
    """A local host plus a reader of the store it logs to."""

    def __init__(self, kind: str, host, store) -> None:
        self.kind = kind
        self.host = host
        self.store = store

    @property
    def url(self) -> str:
        return self.host.url

    async def log(self, request_id: str, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            record = await self.store.get_log(request_id)
            if record is not None:
                return record
            await asyncio.sleep(0.05)
        raise AssertionError(f"no log record for request {request_id} in the {self.kind} store after {timeout}s")


@pytest.fixture(params=["sqlite", "cosmos"])
async def logged_gateway(request, sqlite_path, cosmos_database):
    """The gateway on each store adapter, with a reader of its request log."""
    if request.param == "sqlite":
        host = request.getfixturevalue("gateway")
        store = SqliteStore(sqlite_path)
    else:
        host = request.getfixturevalue("cosmos_gateway")
        server = request.getfixturevalue("cosmos_server")
        store = CosmosStore(server.endpoint, COSMOS_KEY, cosmos_database, verify_tls=False)
    await store.open()
    try:
        yield LoggedGateway(request.param, host, store)
    finally:
        await store.close()
