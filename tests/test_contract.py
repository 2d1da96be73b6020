"""The contract under a schema fuzzer: Schemathesis runs docs/openapi.json against a throwaway
gateway with every check — no 5xx, every status, field, header and content type documented,
schema-valid requests accepted, schema-invalid ones refused, stateful links followed — once for the
admin routes with an admin token, once for the app routes (the Azure OpenAI surface, files,
batches, jobs, models, health) with an app token, in front of the built-in simulator.

Bounded and derandomized (`--generation-deterministic`, a fixed number of examples per route), so a
run is reproducible. Every check is on except where tests/schemathesis.toml says why: undeclared
methods (the Functions host answers them before the app), acceptance of generated policies (regex
guard rules have rules JSON Schema cannot state), and for the app routes acceptance is the
gateway's own (tests/contract_checks.py: Azure OpenAI's refusals of the fields it owns pass through).
"""
from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import aiohttp
import pytest

from .conftest import TEST_APP_ID, _gateway_env
from .servers import COSMOS_KEY, start_local_host, stop

ROOT = Path(__file__).resolve().parents[1]


def _schemathesis(host_url: str, token: str, *selection: str, examples: int, workers: int = 1) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(Path(sys.executable).parent / "schemathesis"), "--config-file", str(ROOT / "tests" / "schemathesis.toml"),
         "run", str(ROOT / "docs" / "openapi.json"), "--url", host_url, "--header", f"Authorization: Bearer {token}",
         *selection, "--max-examples", str(examples), "--generation-deterministic", "--workers", str(workers), "--no-color"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
        env={**os.environ, "SCHEMATHESIS_HOOKS": str(ROOT / "tests" / "contract_checks.py")},
    )


async def _put_app(host_url: str, admin_token: str, app_id: str, body: dict) -> None:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin_token}"}) as session:
        async with session.put(f"{host_url}/sekisho/admin/policies/apps/{app_id}", json=body) as response:
            assert response.status == 201, await response.text()


def _throwaway_store(kind: str, request, tmp_path_factory) -> dict[str, str]:
    if kind == "sqlite":
        return {"SEKISHO_STORE": "sqlite", "SEKISHO_SQLITE_PATH": str(tmp_path_factory.mktemp("contract") / "throwaway.db")}
    cosmos = request.getfixturevalue("cosmos_server")
    return {"SEKISHO_STORE": "cosmos", "SEKISHO_COSMOS_ENDPOINT": cosmos.endpoint, "SEKISHO_COSMOS_KEY": COSMOS_KEY,
            "SEKISHO_COSMOS_DATABASE": "contract_" + uuid.uuid4().hex[:8], "SEKISHO_COSMOS_VERIFY_TLS": "false"}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("store", ["sqlite", "cosmos"])  # the admin routes read and write every kind of record
async def test_admin_routes_hold_to_the_openapi_document(store, request, simulator, tmp_path_factory, data_dir, admin_token):
    host = start_local_host(_gateway_env(simulator, **_throwaway_store(store, request, tmp_path_factory)), data_dir)
    try:
        await _put_app(host.url, admin_token, "0", {"name": "contract"})  # an app for the generated ids to find
        run = _schemathesis(host.url, admin_token, "--include-tag", "admin",
                                  "--exclude-path-regex", "login|/sekisho/admin$", examples=20)
    finally:
        stop(host.process)
    assert run.returncode == 0, run.stdout[-12000:] + run.stderr[-2000:]


@pytest.mark.timeout(600)
async def test_app_routes_hold_to_the_openapi_document(request, simulator, tmp_path_factory, data_dir, admin_token, token):
    host = start_local_host(_gateway_env(simulator, **_throwaway_store("sqlite", request, tmp_path_factory)), data_dir)
    try:
        # Every deployment allowed, so that generated requests reach the simulator (half of the
        # deployment names are drawn from the ones it serves: tests/schemathesis.toml).
        await _put_app(host.url, admin_token, TEST_APP_ID, {"name": "contract", "settings": {"allowed_deployments": ["*"]}})
        # Four workers: most of the run waits, not works (an id the app does not own is looked up
        # again for a second, in case another instance recorded it a moment ago: 404 after that).
        run = _schemathesis(host.url, token, "--exclude-tag", "admin", examples=10, workers=4)
    finally:
        stop(host.process)
    assert run.returncode == 0, run.stdout[-12000:] + run.stderr[-2000:]
