"""Admin views: usage roll-ups (both stores), telemetry events, the workbook, reports, the admin
page's sign-in. The page in a real browser is in test_admin_page_browser.py."""
from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from zoneinfo import ZoneInfo

import aiohttp

from shared.records import telemetry
from shared.records.rollups import ROLLUP_COUNTERS, group, rollup_deltas
from shared.store import LogQuery

ROOT = Path(__file__).resolve().parents[1]
ADMIN = "/sekisho/admin"
CHAT = "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"
EMBED = "/openai/deployments/text-embedding-3-small/embeddings?api-version=2024-10-21"
WORKBOOK = ROOT / "infra" / "workbook" / "sekisho-usage.workbook.json"


async def _call(session, method, url, token=None, body=None, headers=None):
    headers = {**({"Authorization": f"Bearer {token}"} if token else {}), **(headers or {})}
    async with session.request(method, url, json=body, headers=headers, allow_redirects=False) as response:
        return response.status, response.headers, await response.read()


async def _register(session, url, admin_token, **settings) -> str:
    app_id = str(uuid.uuid4())
    base = {"trust_user_header": True, "retry": {"max_attempts": 1}}
    status, _, body = await _call(session, "PUT", f"{url}{ADMIN}/policies/apps/{app_id}", admin_token, {"name": "Views", "settings": {**base, **settings}})
    assert status == 201, body
    return app_id


async def _traffic(url, token) -> int:
    """A mix: users, a stream, embeddings, a cache hit, an upstream failure, a guard block."""
    sent = 0
    async with aiohttp.ClientSession() as session:
        for user in ("u1", "u1", "u2"):
            status, _, _ = await _call(session, "POST", url + CHAT, token, {"messages": [{"role": "user", "content": "hi"}]}, {"x-sekisho-user": user})
            assert status == 200
            sent += 1
        status, _, _ = await _call(session, "POST", url + CHAT, token, {"messages": [{"role": "user", "content": "stream"}], "stream": True}, {"x-sekisho-user": "u2"})
        sent += 1
        status, _, _ = await _call(session, "POST", url + EMBED, token, {"input": "vector please"}, {"x-sekisho-user": "u1"})
        assert status == 200
        sent += 1
        cached = {"messages": [{"role": "user", "content": "same"}], "temperature": 0}
        for _ in range(2):
            status, headers, _ = await _call(session, "POST", url + CHAT, token, cached, {"x-sekisho-user": "u1"})
            sent += 1
        assert headers["x-sekisho-cache"] == "HIT"
        status, _, _ = await _call(session, "POST", url + CHAT, token, {"messages": [{"role": "user", "content": "x"}], "x_sim": {"fail": 500}}, {"x-sekisho-user": "u2"})
        assert status == 502
        sent += 1
        status, _, _ = await _call(session, "POST", url + CHAT, token, {"messages": [{"role": "user", "content": "tell me the secret plan"}]}, {"x-sekisho-user": "u2"})
        assert status == 400
        sent += 1
    return sent


async def _rollups_total(store, app_id: str, want: int, timeout: float = 10.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        rows = await store.query_rollups(app_id)
        if sum(r["requests"] for r in rows) >= want or time.monotonic() > deadline:
            return rows
        await asyncio.sleep(0.1)


async def test_rollups_equal_a_recount_from_the_logs(logged_gateway, admin_token, issuer):
    async with aiohttp.ClientSession() as session:
        app_id = await _register(session, logged_gateway.url, admin_token, cache={"enabled": True},
                                 guards={"rules": [{"id": "secret", "pattern": "secret plan", "applies_to": "input"}]})
    sent = await _traffic(logged_gateway.url, issuer.mint(app_id))
    rows = await _rollups_total(logged_gateway.store, app_id, sent)
    records = await logged_gateway.store.query_logs(LogQuery(app_id=app_id, limit=1000))
    assert len(records) == sent
    recount = group([{**vars(d), **d.counts} for d in rollup_deltas(records, ZoneInfo("UTC"))], "user")
    stored = group(rows, "user")
    assert [{k: r[k] for k in ("user_id", *ROLLUP_COUNTERS)} for r in stored] == [{k: r[k] for k in ("user_id", *ROLLUP_COUNTERS)} for r in recount]
    by_user = {r["user_id"]: r for r in stored}
    assert by_user["u1"]["requests"] == 5 and by_user["u1"]["cache_hits"] == 1
    assert by_user["u2"]["errors"] == 2 and by_user["u2"]["blocked"] == 1
    assert sum(r["total_tokens"] for r in stored) == sum(r["usage"]["total_tokens"] for r in records) > 0
    assert {r["model"] for r in rows} >= {"gpt-4o-mini-2024-07-18", "text-embedding-3-small"}

    # The reports API and the CSV export read the same roll-ups.
    async with aiohttp.ClientSession() as session:
        status, _, body = await _call(session, "GET", f"{logged_gateway.url}{ADMIN}/reports/usage?by=user&app_id={app_id}", admin_token)
        assert status == 200
        assert {r["user_id"]: r["requests"] for r in json.loads(body)["data"]} == {"u1": 5, "u2": 4}
        status, headers, body = await _call(session, "GET", f"{logged_gateway.url}{ADMIN}/reports/usage?by=deployment&app_id={app_id}&format=csv", admin_token)
        assert status == 200 and headers["Content-Type"].startswith("text/csv")
        table = list(csv.DictReader(io.StringIO(body.decode())))
        assert {r["deployment"] for r in table} == {"gpt-4o-mini", "text-embedding-3-small"}
        assert sum(int(r["requests"]) for r in table) == sent
        status, _, body = await _call(session, "GET", f"{logged_gateway.url}{ADMIN}/reports/usage?by=operation&app_id={app_id}", admin_token)
        by_operation = {r["operation"]: r["requests"] for r in json.loads(body)["data"]}
        expected = {}
        for record in records:
            expected[record["operation"]] = expected.get(record["operation"], 0) + 1
        assert status == 200 and by_operation == expected and {"chat.completions", "embeddings"} <= set(by_operation)
        status, headers, body = await _call(session, "GET", f"{logged_gateway.url}{ADMIN}/reports/chart?by=day&metric=cost&app_id={app_id}", admin_token)
        assert status == 200 and headers["Content-Type"].startswith("image/svg+xml") and body.count(b'class="bar"') == 1
        status, _, body = await _call(session, "GET", f"{logged_gateway.url}{ADMIN}/reports/usage?by=weekday", admin_token)
        assert status == 400 and json.loads(body)["error"]["param"] == "by"


async def test_telemetry_event_holds_usage_and_no_content(gateway, admin_token, token):
    from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
    from opentelemetry.sdk._logs.export import InMemoryLogExporter, SimpleLogRecordProcessor

    async with aiohttp.ClientSession() as session:
        status, headers, _ = await _call(session, "POST", gateway.url + CHAT, token,
                                         {"messages": [{"role": "user", "content": "confidential prompt text"}]}, {"x-sekisho-user": "t1"})
        assert status == 200
        request_id = headers["x-sekisho-request-id"]
        for _ in range(50):
            status, _, body = await _call(session, "GET", f"{gateway.url}{ADMIN}/logs/{request_id}", admin_token)
            if status == 200:
                break
            await asyncio.sleep(0.05)
    record = json.loads(body)
    exporter = InMemoryLogExporter()
    provider = LoggerProvider()
    provider.add_log_record_processor(SimpleLogRecordProcessor(exporter))
    handler = LoggingHandler(logger_provider=provider)
    telemetry.logger.addHandler(handler)
    try:
        telemetry.emit(record)
        telemetry.emit({**record, "status": 202, "job": {"status": "queued"}})  # a submitted job: not an event
    finally:
        telemetry.logger.removeHandler(handler)
    (exported,) = exporter.get_finished_logs()
    attributes = dict(exported.log_record.attributes)
    assert exported.log_record.body == "sekisho.request"
    assert set(attributes) - {"code.file.path", "code.function.name", "code.line.number", "code.filepath", "code.function", "code.lineno"} <= set(telemetry.USAGE_EVENT_FIELDS)
    assert attributes["request_id"] == request_id and attributes["user_id"] == "t1" and attributes["status"] == 200
    assert attributes["total_tokens"] == record["usage"]["total_tokens"] > 0 and attributes["cost"] == record["cost"]["amount"] > 0
    assert attributes["deployment"] == "gpt-4o-mini" and attributes["cache_status"] == "BYPASS" and attributes["guard_action"] == "none"
    assert "confidential" not in json.dumps(attributes)
    # The same request in OpenTelemetry's GenAI semantic conventions.
    assert attributes["gen_ai.operation.name"] == "chat" and attributes["gen_ai.provider.name"] == "azure.ai.openai"
    assert attributes["gen_ai.request.model"] == "gpt-4o-mini" and attributes["gen_ai.response.model"] == record["model"]
    assert attributes["gen_ai.usage.input_tokens"] == record["usage"]["prompt_tokens"] > 0
    assert attributes["gen_ai.usage.output_tokens"] == record["usage"]["completion_tokens"] > 0
    assert "error.type" not in attributes


def test_gen_ai_metrics_histograms():
    """gen_ai.client.token.usage (by gen_ai.token.type) and gen_ai.client.operation.duration, read
    with an in-memory metric reader."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader]).get_meter("test")
    base = {"operation": "chat.completions", "deployment": "gpt-4o-mini", "model": "gpt-4o-mini-2024-07-18", "latency_ms": 250.0}
    telemetry.record_metrics({**base, "status": 200, "usage": {"prompt_tokens": 12, "completion_tokens": 30}}, meter)
    telemetry.record_metrics({**base, "status": 429, "error": {"code": "rate_limited"}, "usage": {}}, meter)
    metrics = {m.name: m for rm in reader.get_metrics_data().resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
    tokens = {dict(p.attributes)["gen_ai.token.type"]: p for p in metrics["gen_ai.client.token.usage"].data.data_points}
    assert metrics["gen_ai.client.token.usage"].unit == "{token}" and tokens["input"].sum == 12 and tokens["output"].sum == 30
    assert dict(tokens["input"].attributes)["gen_ai.request.model"] == "gpt-4o-mini"
    durations = {dict(p.attributes).get("error.type"): p for p in metrics["gen_ai.client.operation.duration"].data.data_points}
    assert metrics["gen_ai.client.operation.duration"].unit == "s" and durations[None].sum == 0.25 and durations["rate_limited"].count == 1


def test_workbook_queries_name_only_emitted_fields():
    workbook = json.loads(WORKBOOK.read_text())
    assert workbook["version"] == "Notebook/1.0"
    queries = [item["content"]["query"] for item in workbook["items"] if item["type"] == 3]
    assert len(queries) >= 8
    parameters = {p["name"] for item in workbook["items"] if item["type"] == 9 for p in item["content"]["parameters"]}
    assert parameters == {"TimeRange", "App", "Deployment"}
    used = set()
    for query in queries:
        assert 'message == "sekisho.request"' in query and "traces" in query
        used |= set(re.findall(r"customDimensions\.(\w+)", query))
        used |= set(re.findall(r'customDimensions\["([\w.]+)"\]', query))
        for parameter in re.findall(r"\{(\w+)(?::\w+)?\}", query):
            assert parameter in parameters, parameter
    assert used <= set(telemetry.USAGE_EVENT_FIELDS), used - set(telemetry.USAGE_EVENT_FIELDS)
    # What the issue asks the workbook to show is all there.
    assert {"app_id", "user_id", "deployment", "cost", "total_tokens", "status", "error_code", "cache_status", "saved_cost",
            "latency_ms", "request_id", "retries", "operation", "settles_kind", "settles_id"} <= used
    assert any(query.rstrip().endswith("by operation\n| order by cost desc") for query in queries)  # usage and cost per operation
    assert {"gen_ai.operation.name", "gen_ai.request.model", "gen_ai.response.model", "gen_ai.usage.input_tokens",
            "gen_ai.usage.output_tokens", "error.type"} <= used  # the GenAI conventions' names, as the event carries them


async def test_admin_page_sign_in_by_one_time_link(gateway, sqlite_path, token, data_dir):
    env = {**os.environ, "SEKISHO_SQLITE_PATH": sqlite_path}
    link = subprocess.run([sys.executable, "-m", "shared.admin.cli", "--data-dir", str(data_dir), "admin-login", "--url", gateway.url],
                          cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert link.startswith(f"{gateway.url}/sekisho/admin/login?code=")
    async with aiohttp.ClientSession() as session:
        status, _, body = await _call(session, "GET", f"{gateway.url}{ADMIN}")
        assert status == 401 and b"admin-login" in body  # not signed in: how to
        status, _, _ = await _call(session, "GET", f"{gateway.url}{ADMIN}", token)
        assert status == 403  # signed in, but not an admin
        status, headers, _ = await _call(session, "GET", link)
        assert status == 303 and headers["Location"] == "/sekisho/admin"
        cookie = headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/sekisho/admin" in cookie
        session_id = cookie.split(";")[0].split("=", 1)[1]
        status, _, _ = await _call(session, "GET", link)
        assert status == 401  # a code works once
        jar = {"Cookie": f"sekisho_admin={session_id}"}
        status, headers, body = await _call(session, "GET", f"{gateway.url}{ADMIN}", headers=jar)
        assert status == 200 and b"<title>Sekisho admin</title>" in body and "frame-ancestors 'none'" in headers["Content-Security-Policy"]
        status, _, _ = await _call(session, "GET", f"{gateway.url}{ADMIN}/logs?limit=1", headers=jar)
        assert status == 200
        status, _, body = await _call(session, "PUT", f"{gateway.url}{ADMIN}/pricing/x", body={"input_per_1m": 1, "output_per_1m": 1}, headers=jar)
        assert status == 403  # a page session only reads
        status, _, _ = await _call(session, "GET", f"{gateway.url}{ADMIN}/logs?limit=1", headers={"Cookie": "sekisho_admin=forged"})
        assert status == 401


def test_cli_report_prints_and_exports_csv(gateway, sqlite_path, data_dir, tmp_path):
    env = {**os.environ, "SEKISHO_SQLITE_PATH": sqlite_path}
    table = subprocess.run([sys.executable, "-m", "shared.admin.cli", "report", "--by", "app"], cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
    assert table.splitlines()[0].split()[:3] == ["app_id", "requests", "errors"]
    out = tmp_path / "chargeback.csv"
    subprocess.run([sys.executable, "-m", "shared.admin.cli", "report", "--by", "day", "--csv", str(out)], cwd=ROOT, env=env, check=True)
    rows = list(csv.DictReader(out.open()))
    assert rows and set(rows[0]) >= {"day", "requests", "prompt_tokens", "completion_tokens", "cost"}
    assert all(re.fullmatch(r"\d{4}-\d{2}-\d{2}", r["day"]) for r in rows)
