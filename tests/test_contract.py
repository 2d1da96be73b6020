"""The contract under a schema fuzzer: Schemathesis runs docs/openapi.json's admin routes against a
throwaway gateway with every check — no 5xx, every status, field and content type documented,
schema-valid requests accepted, schema-invalid ones refused, stateful links followed.

Bounded and derandomized (`--generation-deterministic`, a fixed number of examples per route), so a
run is reproducible and takes under a minute. Every check is on except where tests/schemathesis.toml
says why: undeclared methods (the Functions host answers them before the app), and acceptance of
generated policies (regex guard rules have rules JSON Schema cannot state).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import aiohttp

from .conftest import _gateway_env
from .servers import start_local_host, stop

ROOT = Path(__file__).resolve().parents[1]


async def test_admin_routes_hold_to_the_openapi_document(simulator, tmp_path_factory, data_dir, admin_token):
    store = tmp_path_factory.mktemp("contract") / "throwaway.db"
    host = start_local_host(_gateway_env(simulator, SEKISHO_SQLITE_PATH=str(store)), data_dir)
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin_token}"}) as session:
            async with session.put(f"{host.url}/sekisho/admin/policies/apps/0", json={"name": "contract"}) as response:
                assert response.status == 201  # an app for the generated ids to find
        run = subprocess.run(
            [str(Path(sys.executable).parent / "schemathesis"), "--config-file", str(ROOT / "tests" / "schemathesis.toml"),
             "run", str(ROOT / "docs" / "openapi.json"), "--url", host.url, "--header", f"Authorization: Bearer {admin_token}",
             "--include-tag", "admin", "--exclude-path-regex", "login|/sekisho/admin$",
             "--max-examples", "20", "--generation-deterministic", "--workers", "1", "--no-color"],
            cwd=ROOT, capture_output=True, text=True, timeout=600,
        )
    finally:
        stop(host.process)
    assert run.returncode == 0, run.stdout[-12000:] + run.stderr[-2000:]
