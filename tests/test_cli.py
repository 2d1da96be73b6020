"""The command line: apps, policies, logs and local tokens, with the same validation as the API."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import aiohttp

from .servers import ROOT


def cli(data_dir, sqlite_path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEKISHO_")}
    env.update({"SEKISHO_STORE": "sqlite", "SEKISHO_SQLITE_PATH": sqlite_path})
    return subprocess.run(
        [sys.executable, "-m", "shared.admin.cli", "--data-dir", str(data_dir), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )


async def test_cli_registers_an_app_and_mints_a_token_the_gateway_accepts(gateway, data_dir, sqlite_path):
    app_id = str(uuid.uuid4())
    created = cli(data_dir, sqlite_path, "apps", "create", app_id, "--name", "CLI app", "--deployments", "gpt-4o-mini", "--trust-user-header")
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["settings"]["allowed_deployments"] == ["gpt-4o-mini"]
    again = cli(data_dir, sqlite_path, "apps", "create", app_id, "--name", "CLI app")
    assert again.returncode == 2 and "exists" in again.stderr
    listed = json.loads(cli(data_dir, sqlite_path, "apps", "list").stdout)
    assert app_id in [d["app_id"] for d in listed]

    token = cli(data_dir, sqlite_path, "token", "mint", "--app-id", app_id).stdout.strip()
    # The policy cache of the running gateway may hold "not registered" for up to its TTL;
    # this app id is new, so the first lookup already sees the CLI's write.
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}", "x-sekisho-user": "cli-user"}) as session:
        url = gateway.url + "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"
        async with session.post(url, json={"messages": [{"role": "user", "content": "hi"}]}) as response:
            assert response.status == 200
            request_id = response.headers["x-sekisho-request-id"]

    for _ in range(100):
        shown = cli(data_dir, sqlite_path, "logs", "get", request_id)
        if shown.returncode == 0:
            break
    record = json.loads(shown.stdout)
    assert record["app_id"] == app_id and record["user_id"] == "cli-user"
    listed_logs = json.loads(cli(data_dir, sqlite_path, "logs", "list", "--app-id", app_id).stdout)
    assert [r["id"] for r in listed_logs] == [request_id]


def test_cli_validates_like_the_api(data_dir, sqlite_path):
    app_id = str(uuid.uuid4())
    bad = cli(data_dir, sqlite_path, "policies", "set", "app", app_id, "--json", '{"settings": {"retention_days": -1}}')
    assert bad.returncode == 2 and "settings.retention_days" in bad.stderr
    good = cli(data_dir, sqlite_path, "policies", "set", "app", app_id, "--json", '{"name": "x", "settings": {"retention_days": 5}}')
    assert good.returncode == 0, good.stderr
    etag = json.loads(good.stdout)["etag"]
    stale = cli(data_dir, sqlite_path, "policies", "set", "app", app_id, "--json", '{"name": "y"}', "--if-match", "not-the-etag")
    assert stale.returncode == 2 and "ETag" in stale.stderr
    assert cli(data_dir, sqlite_path, "policies", "delete", "app", app_id, "--if-match", etag).returncode == 0
    assert cli(data_dir, sqlite_path, "policies", "get", "app", app_id).returncode == 2


def test_cli_mints_admin_and_delegated_v1_tokens(data_dir, sqlite_path, issuer):
    import jwt

    token = cli(data_dir, sqlite_path, "token", "mint", "--app-id", "a", "--user", "u-1", "--role", "Sekisho.Admin", "--v1").stdout.strip()
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["appid"] == "a" and claims["oid"] == "u-1" and claims["roles"] == ["Sekisho.Admin"]
    assert claims["iss"] == f"https://sts.windows.net/{issuer.tenant_id}/" and claims["scp"]


def test_cli_usage_and_pricing(data_dir, sqlite_path):
    app_id = str(uuid.uuid4())
    assert cli(data_dir, sqlite_path, "apps", "create", app_id, "--name", "u").returncode == 0
    shown = cli(data_dir, sqlite_path, "usage", "show", app_id)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["metrics"]["tokens_per_day"]["used"] == 0
    reset = cli(data_dir, sqlite_path, "usage", "reset", app_id, "--metric", "tokens_per_day")
    assert json.loads(reset.stdout) == {"reset": ["tokens_per_day"]}
    assert cli(data_dir, sqlite_path, "usage", "reset", app_id, "--metric", "bogus").returncode == 2
    assert cli(data_dir, sqlite_path, "pricing", "set", "cli-model", "--input", "1", "--output", "2").returncode == 0
    listed = json.loads(cli(data_dir, sqlite_path, "pricing", "list").stdout)
    assert next(p for p in listed if p["model"] == "cli-model")["source"] == "store"
    assert cli(data_dir, sqlite_path, "pricing", "delete", "cli-model").returncode == 0


def test_cli_cache_stats_and_purge(data_dir, sqlite_path):
    app_id = str(uuid.uuid4())
    assert cli(data_dir, sqlite_path, "apps", "create", app_id, "--name", "c").returncode == 0
    stats = cli(data_dir, sqlite_path, "cache", "stats", app_id)
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["hits"] == 0
    assert json.loads(cli(data_dir, sqlite_path, "cache", "purge", app_id).stdout) == {"scope": app_id, "purged": 0}


def test_cli_creates_lists_and_revokes_gateway_keys(tmp_path):
    import json as _json
    import os as _os
    import subprocess as _subprocess
    import sys as _sys
    from pathlib import Path as _Path

    root = _Path(__file__).resolve().parents[1]
    env = {**{k: v for k, v in _os.environ.items() if not k.startswith("SEKISHO_")}, "SEKISHO_GATEWAY_KEY_PEPPER": "cli-pepper",
           "SEKISHO_SQLITE_PATH": str(tmp_path / "cli.db")}

    def cli(*args):
        done = _subprocess.run([_sys.executable, "-m", "shared.admin.cli", "--data-dir", str(tmp_path), *args], cwd=root, env=env,
                               capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    created = _json.loads(cli("keys", "create", "app-1", "--name", "ide plugin", "--deployments", "gpt-4o-mini"))
    assert created["key"].startswith("sekisho-gk-") and created["deployments"] == ["gpt-4o-mini"]
    listed = _json.loads(cli("keys", "list", "app-1"))
    assert [k["id"] for k in listed] == [created["id"]] and "key" not in listed[0] and "hash" not in listed[0]
    assert _json.loads(cli("keys", "revoke", "app-1", created["id"]))["revoked_at"]
    assert created["key"] not in (tmp_path / "cli.db").read_bytes().decode("latin-1")
