"""Shared fixtures: one simulator, one Cosmos test server, local hosts on both stores, tokens."""
from __future__ import annotations

import asyncio
import concurrent.futures
import time
import uuid

import pytest

from shared.admin.api import PolicyService
from shared.local.issuer import LocalIssuer
from shared.store.cosmos import CosmosStore
from shared.store.sqlite import SqliteStore

from .servers import COSMOS_KEY, start_cosmos_server, start_local_host, start_simulator, stop

# Short timeouts so that the timeout tests are quick; streams in the tests pause less than this.
UPSTREAM_READ_TIMEOUT = "1.5"
MAX_BODY_BYTES = 65536
TEST_APP_ID = "0f5c4a1e-7d2b-4c61-9a57-3b1e2f4d5a60"  # registered, any deployment, trusted to name users, no retries
ADMIN_APP_ID = "a0a0a0a0-1111-4222-8333-944445555666"  # not registered for models; holds the admin role


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def issuer(data_dir) -> LocalIssuer:
    return LocalIssuer(data_dir)


@pytest.fixture(scope="session")
def token(issuer) -> str:
    return issuer.mint(TEST_APP_ID, lifetime_seconds=4 * 3600)


@pytest.fixture(scope="session")
def admin_token(issuer) -> str:
    return issuer.mint(ADMIN_APP_ID, roles=["Sekisho.Admin"], lifetime_seconds=4 * 3600)


@pytest.fixture(scope="session")
def auth(token) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


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
        "SEKISHO_CONTENT_SAFETY_ENDPOINT": simulator.url,  # the simulator serves Content Safety too
        "SEKISHO_CONTENT_SAFETY_API_KEY": simulator.api_key,
        "SEKISHO_UPSTREAM_READ_TIMEOUT_SECONDS": UPSTREAM_READ_TIMEOUT,
        "SEKISHO_MAX_BODY_BYTES": str(MAX_BODY_BYTES),
        "SEKISHO_LOG_FLUSH_INTERVAL_MS": "20",
        "SEKISHO_DEPLOYMENTS": "gpt-4o-mini,text-embedding-3-small",
        # Tests inject failures on purpose: keep the shared gateways' circuit closed (its own test
        # uses a gateway of its own).
        "SEKISHO_CIRCUIT_FAILURES": "1000",
        "SEKISHO_GATEWAY_KEY_PEPPER": "test-pepper-for-gateway-keys",
        **extra,
    }


def run_async(coroutine):
    """Run a coroutine to completion from sync code, even when an event loop is running here
    (session fixtures are often first requested from inside an async test)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


async def _seed(store) -> None:
    await store.open()
    try:
        # No gateway retries for the test app: error tests see each upstream answer at once.
        data = {"name": "Test app", "settings": {"allowed_deployments": ["*"], "trust_user_header": True, "retry": {"max_attempts": 1}}}
        await PolicyService(store).put("app", TEST_APP_ID, None, data, actor="tests")
    finally:
        await store.close()


@pytest.fixture(scope="session")
def sqlite_path(tmp_path_factory):
    return str(tmp_path_factory.mktemp("sqlite") / "sekisho.db")


@pytest.fixture(scope="session")
def cosmos_database():
    return "sekisho_" + uuid.uuid4().hex[:8]


@pytest.fixture(scope="session")
def gateway(simulator, sqlite_path, data_dir, issuer):
    run_async(_seed(SqliteStore(sqlite_path)))
    host = start_local_host(_gateway_env(simulator, SEKISHO_STORE="sqlite", SEKISHO_SQLITE_PATH=sqlite_path), data_dir)
    yield host
    stop(host.process)


@pytest.fixture(scope="session")
def cosmos_gateway(simulator, cosmos_server, cosmos_database, data_dir, issuer):
    run_async(_seed(CosmosStore(cosmos_server.endpoint, COSMOS_KEY, cosmos_database, verify_tls=False)))
    env = _gateway_env(
        simulator,
        SEKISHO_STORE="cosmos",
        SEKISHO_COSMOS_ENDPOINT=cosmos_server.endpoint,
        SEKISHO_COSMOS_KEY=COSMOS_KEY,
        SEKISHO_COSMOS_DATABASE=cosmos_database,
        SEKISHO_COSMOS_VERIFY_TLS="false",
    )
    host = start_local_host(env, data_dir)
    yield host
    stop(host.process)


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
async def store(request, tmp_path):
    """An empty store of each adapter (the storage contract and every store-level test)."""
    if request.param == "sqlite":
        adapter = SqliteStore(str(tmp_path / "contract.db"))
    else:
        server = request.getfixturevalue("cosmos_server")
        adapter = CosmosStore(server.endpoint, COSMOS_KEY, "contract_" + uuid.uuid4().hex[:8], verify_tls=False)
    await adapter.open()
    yield adapter
    await adapter.close()


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
