"""function_app.py registers the intended functions, and the local host serves exactly those."""
from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import aiohttp
import pytest
from starlette.requests import Request

import function_app
from shared.local.host.functions_host import RouteMatcher, registered_functions, route_table
from shared.local.host.language_worker import entries_of
from shared.routes import MODEL_ROUTES

ROOT = Path(__file__).resolve().parents[1]

EXPECTED = {
    "azure_chat_completions": ("openai/deployments/{deployment}/chat/completions", {"POST"}),
    "azure_completions": ("openai/deployments/{deployment}/completions", {"POST"}),
    "azure_embeddings": ("openai/deployments/{deployment}/embeddings", {"POST"}),
    "azure_responses": ("openai/responses", {"POST"}),
    "v1_chat_completions": ("openai/v1/chat/completions", {"POST"}),
    "v1_embeddings": ("openai/v1/embeddings", {"POST"}),
    "v1_responses": ("openai/v1/responses", {"POST"}),
    "azure_audio_transcriptions": ("openai/deployments/{deployment}/audio/transcriptions", {"POST"}),
    "v1_audio_transcriptions": ("openai/v1/audio/transcriptions", {"POST"}),
    "azure_audio_translations": ("openai/deployments/{deployment}/audio/translations", {"POST"}),
    "v1_audio_translations": ("openai/v1/audio/translations", {"POST"}),
    "azure_audio_speech": ("openai/deployments/{deployment}/audio/speech", {"POST"}),
    "v1_audio_speech": ("openai/v1/audio/speech", {"POST"}),
    "azure_images_generations": ("openai/deployments/{deployment}/images/generations", {"POST"}),
    "v1_images_generations": ("openai/v1/images/generations", {"POST"}),
    "azure_images_edits": ("openai/deployments/{deployment}/images/edits", {"POST"}),
    "v1_images_edits": ("openai/v1/images/edits", {"POST"}),
    "azure_files": ("openai/files", {"POST", "GET"}),
    "v1_files": ("openai/v1/files", {"POST", "GET"}),
    "azure_file": ("openai/files/{file_id}", {"GET", "DELETE"}),
    "v1_file": ("openai/v1/files/{file_id}", {"GET", "DELETE"}),
    "azure_file_content": ("openai/files/{file_id}/content", {"GET"}),
    "v1_file_content": ("openai/v1/files/{file_id}/content", {"GET"}),
    "azure_stored_response": ("openai/responses/{response_id}", {"GET", "DELETE"}),
    "v1_stored_response": ("openai/v1/responses/{response_id}", {"GET", "DELETE"}),
    "azure_stored_response_input_items": ("openai/responses/{response_id}/input_items", {"GET"}),
    "v1_stored_response_input_items": ("openai/v1/responses/{response_id}/input_items", {"GET"}),
    "azure_stored_response_cancel": ("openai/responses/{response_id}/cancel", {"POST"}),
    "v1_stored_response_cancel": ("openai/v1/responses/{response_id}/cancel", {"POST"}),
    "azure_batches": ("openai/batches", {"POST", "GET"}),
    "v1_batches": ("openai/v1/batches", {"POST", "GET"}),
    "azure_batch": ("openai/batches/{batch_id}", {"GET"}),
    "v1_batch": ("openai/v1/batches/{batch_id}", {"GET"}),
    "azure_batch_cancel": ("openai/batches/{batch_id}/cancel", {"POST"}),
    "v1_batch_cancel": ("openai/v1/batches/{batch_id}/cancel", {"POST"}),
    "azure_models": ("openai/models", {"GET"}),
    "v1_models": ("openai/v1/models", {"GET"}),
    "health": ("health", {"GET"}),
    "job_status": ("sekisho/jobs/{job_id}", {"GET"}),
    "admin_page": ("sekisho/admin", {"GET"}),
    "admin_login": ("sekisho/admin/login", {"GET"}),
    "admin_reports": ("sekisho/admin/reports/{report}", {"GET"}),
    "admin_policies": ("sekisho/admin/policies", {"GET"}),
    "admin_policy_defaults": ("sekisho/admin/policies/defaults", {"GET", "PUT", "DELETE"}),
    "admin_policy_app": ("sekisho/admin/policies/apps/{app_id}", {"GET", "PUT", "DELETE"}),
    "admin_policy_user": ("sekisho/admin/policies/apps/{app_id}/users/{user_id}", {"GET", "PUT", "DELETE"}),
    "admin_keys": ("sekisho/admin/keys/apps/{app_id}", {"GET", "POST"}),
    "admin_key": ("sekisho/admin/keys/apps/{app_id}/{key_id}", {"DELETE"}),
    "admin_key_rotate": ("sekisho/admin/keys/apps/{app_id}/{key_id}/rotate", {"POST"}),
    "admin_alerts": ("sekisho/admin/alerts", {"GET"}),
    "admin_logs": ("sekisho/admin/logs", {"GET"}),
    "admin_logs_export": ("sekisho/admin/exports/logs", {"GET"}),
    "admin_log": ("sekisho/admin/logs/{request_id}", {"GET"}),
    "admin_usage_app": ("sekisho/admin/usage/apps/{app_id}", {"GET"}),
    "admin_usage_user": ("sekisho/admin/usage/apps/{app_id}/users/{user_id}", {"GET"}),
    "admin_usage_app_reset": ("sekisho/admin/usage/apps/{app_id}/reset", {"POST"}),
    "admin_usage_user_reset": ("sekisho/admin/usage/apps/{app_id}/users/{user_id}/reset", {"POST"}),
    "admin_pricing": ("sekisho/admin/pricing", {"GET"}),
    "admin_price": ("sekisho/admin/pricing/{model}", {"PUT", "DELETE"}),
    "admin_cache_app": ("sekisho/admin/cache/apps/{app_id}", {"GET"}),
    "admin_cache_purge": ("sekisho/admin/cache/apps/{app_id}/purge", {"POST"}),
    "admin_deployments": ("sekisho/admin/deployments", {"GET"}),
    "admin_deployment": ("sekisho/admin/deployments/{name}", {"GET", "PUT", "DELETE"}),
}


def _registered():
    out = {}
    for function in registered_functions(function_app.app):
        spec = json.loads(function.get_function_json())
        trigger = next(b for b in spec["bindings"] if b["direction"] == "IN")
        out[function.get_function_name()] = (trigger, spec["bindings"], function.get_user_function())
    return out


# Async jobs: the queue-triggered starter (durable client), the orchestrator and its activities.
DURABLE_EXPECTED = {
    "job_starter": {"queueTrigger", "durableClient"},
    "sekisho_job": {"orchestrationTrigger"},
    "sekisho_job_attempt": {"activityTrigger"},
    "sekisho_job_give_up": {"activityTrigger"},
    "reconcile_deferred_work": {"timerTrigger"},
}


def test_durable_functions_are_registered():
    registered = _registered()
    durable = {name: {b["type"] for b in bindings} for name, (_, bindings, _) in registered.items() if name not in EXPECTED}
    assert durable == DURABLE_EXPECTED
    queue = next(b for b in registered["job_starter"][1] if b["type"] == "queueTrigger")
    assert queue["queueName"] == "sekisho-jobs" and queue["connection"] == "AzureWebJobsStorage"
    # The activity names the orchestrator calls are the registered function names.
    from shared.jobs.orchestration import ATTEMPT_ACTIVITY, GIVE_UP_ACTIVITY, ORCHESTRATOR

    assert {ORCHESTRATOR, ATTEMPT_ACTIVITY, GIVE_UP_ACTIVITY} <= set(registered)
    timer = registered["reconcile_deferred_work"][0]
    assert timer["schedule"] == "0 */5 * * * *" and timer["runOnStartup"] is False


def test_the_local_host_runs_timer_functions_on_their_schedule():
    from datetime import datetime, timezone

    from shared.local.host.timers import LocalTimers, next_time, parse_schedule

    timers = LocalTimers(entries_of(function_app.app), invoke=None)
    assert set(timers.functions) == {"reconcile_deferred_work"}
    every_five = parse_schedule("0 */5 * * * *")
    at = datetime(2026, 11, 29, 10, 3, 7, tzinfo=timezone.utc)
    assert next_time(every_five, at) == datetime(2026, 11, 29, 10, 5, 0, tzinfo=timezone.utc)
    assert next_time(every_five, datetime(2026, 11, 29, 10, 5, 0, tzinfo=timezone.utc)) == datetime(2026, 11, 29, 10, 10, 0, tzinfo=timezone.utc)
    weekdays_at_nine = parse_schedule("30 0 9 * * 1-5")  # Monday to Friday; 2026-11-29 is a Sunday
    assert next_time(weekdays_at_nine, at) == datetime(2026, 11, 30, 9, 0, 30, tzinfo=timezone.utc)
    for wrong in ("*/5 * * * *", "0 61 * * * *", "0 */0 * * * *"):
        with pytest.raises(ValueError):
            parse_schedule(wrong)


def test_registered_functions_routes_and_methods():
    registered = {name: value for name, value in _registered().items() if value[0]["type"] == "httpTrigger"}
    assert set(registered) == set(EXPECTED)
    for name, (route, methods) in EXPECTED.items():
        trigger, bindings, handler = registered[name]
        assert trigger["type"] == "httpTrigger" and trigger["route"] == route
        assert set(trigger["methods"]) == methods
        assert trigger["authLevel"] == "ANONYMOUS"  # the gateway authenticates callers itself
        assert {"direction": "OUT", "type": "http", "name": "$return"} in bindings
        assert inspect.iscoroutinefunction(handler)
        # HTTP streaming is app-wide: every handler takes Starlette's Request (shared/http_streaming.py).
        (parameter,) = inspect.signature(handler).parameters.values()
        assert parameter.name == trigger["name"] == "req"
        assert parameter.annotation is Request


def test_every_model_route_is_registered():
    assert {r.function_name for r in MODEL_ROUTES} <= set(_registered())


def test_local_host_serves_exactly_the_registered_functions():
    local = RouteMatcher(route_table(entries_of(function_app.app)))
    served = {f.name: (f.route, set(f.methods)) for f in local.functions}
    assert served == EXPECTED


def test_routes_obey_the_functions_host_rules():
    routes = [f.route for f in RouteMatcher(route_table(entries_of(function_app.app))).functions]
    for route in routes:
        # The host refuses routes starting with these (its own APIs) when indexing.
        assert not route.lower().startswith(("admin", "runtime")), route
        assert "{*" not in route, "catch-all routes can shadow others: the host takes the first match"
    # The host takes the first registered match, not the most specific: no two routes may overlap.
    samples = {r: "/" + re.sub(r"\{(\w+)\}", r"x\1", r) for r in routes}
    local = RouteMatcher(route_table(entries_of(function_app.app)))
    for route, path in samples.items():
        matching = [f.route for f in local.functions if f.pattern.fullmatch(path.strip("/"))]
        assert matching == [route], f"{path} is matched by {matching}"


@pytest.mark.parametrize(
    "method, path, expected",
    [
        ("POST", "/openai/deployments/d/chat/completions", "azure_chat_completions"),
        ("POST", "/openai/deployments/d/completions", "azure_completions"),
        ("POST", "/openai/v1/chat/completions", "v1_chat_completions"),
        ("GET", "/openai/v1/chat/completions", None),
        ("GET", "/health", "health"),
        ("DELETE", "/anything/else", None),
    ],
)
def test_local_host_matching(method, path, expected):
    function, _ = RouteMatcher(route_table(entries_of(function_app.app))).match(method, path)
    assert (function.name if function else None) == expected


async def test_each_model_route_reaches_its_function_over_http(gateway, auth):
    # An empty JSON object is refused by validation (400): the route reached the gateway.
    async with aiohttp.ClientSession(headers=auth) as session:
        for route in MODEL_ROUTES:
            if "GET" in route.methods:
                continue
            path = "/" + route.template.replace("{deployment}", "gpt-4o-mini").replace("{response_id}", "resp_nobodys")
            async with session.post(gateway.url + path, json={}) as response:
                if route.operation.owned:  # about an object: nobody's id is 404 before any body is read
                    assert response.status == 404, path
                    assert (await response.json())["error"]["code"] == "not_found"
                    continue
                assert response.status == 400, path
                assert (await response.json())["error"]["code"] == "invalid_request"
        async with session.get(gateway.url + "/health") as response:
            assert response.status == 200 and (await response.json())["status"] == "ok"


def test_host_json():
    host = json.loads((ROOT / "host.json").read_text())
    assert host["version"] == "2.0"
    assert host["extensions"]["http"]["routePrefix"] == ""
    assert host["extensionBundle"]["id"] == "Microsoft.Azure.Functions.ExtensionBundle"
    assert host["functionTimeout"] >= "00:10:00"


def test_requirements_are_pinned():
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            assert "==" in line, f"unpinned requirement: {line}"
    names = {line.split("==")[0] for line in (ROOT / "requirements.txt").read_text().splitlines() if "==" in line}
    assert {"azure-functions", "azure-functions-durable", "azure-cosmos", "azure-identity", "azure-keyvault-secrets",
            "openai", "tenacity", "azurefunctions-extensions-base", "uvicorn"} <= names
    # One web extension only (the runtime refuses two): the app's own, shared/http_streaming.py.
    assert "azurefunctions-extensions-http-fastapi" not in names and "fastapi" not in names


def test_the_local_host_indexes_through_the_python_worker_runtimes_loader():
    """What the local host serves is what the runtime's loader (azure-functions-runtime, which
    Azure loads from requirements.txt on Python 3.13) indexes, bindings as the host receives them."""
    assert registered_functions(function_app.app) is function_app.app._sekisho_indexed_functions
    # A fresh interpreter: the loader imports the module itself and finds the one FunctionApp.
    import subprocess
    import sys

    script = ("import json; from azure_functions_runtime.loader import index_function_app; "
              "print(json.dumps({f.get_function_name(): json.loads(f.get_function_json()) for f in index_function_app('function_app.py')}))")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    indexed = json.loads(done.stdout.strip().splitlines()[-1])
    ours = {f.get_function_name(): json.loads(f.get_function_json()) for f in registered_functions(function_app.app)}
    assert indexed == ours
