"""Budget alerts (shared/quota/alerts.py): one alert per threshold crossed per window, however many
requests and instances see the crossing; a signed webhook retried until accepted, a dead letter
when it never is; the alert event for Azure Monitor; the position against the thresholds."""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

import aiohttp
import pytest
from aiohttp import web

from shared.policy.policies import PolicyError, build_document, effective_policy, builtin_defaults
from shared.quota import alerts
from shared.quota.alerts import AlertWebhook, BudgetAlerts, Position
from shared.records import telemetry
from shared.store.sqlite import SqliteStore


SECRET = "whsec-test-0123456789abcdef"
CHAT = "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"
ADMIN = "/sekisho/admin"


def _position(app_id: str, used: int, limit: int = 1000, user_id: str | None = None, refused: bool = False, metric: str = "tokens_per_day") -> Position:
    subject = f"app:{app_id}" if user_id is None else f"user:{app_id}:{user_id}"
    counter = "tpd:2026-11-30" if metric == "tokens_per_day" else "spend:2026-11"
    return Position(app_id, user_id, subject, metric, counter, used, limit, 3600, refused)


class Receiver:
    """A webhook receiver on loopback: answers `failures` times with 503, then 200; keeps what came."""

    def __init__(self, failures: int = 0, always: int | None = None) -> None:
        self.failures, self.always = failures, always
        self.received: list[tuple[dict, bytes]] = []
        self.attempts = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts += 1
        body = await request.read()
        if self.always is not None:
            return web.Response(status=self.always)
        if self.attempts <= self.failures:
            return web.Response(status=503)
        self.received.append((dict(request.headers), body))
        return web.Response(status=204)

    async def __aenter__(self) -> str:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/hook"

    async def __aexit__(self, *exc) -> None:
        await self._runner.cleanup()


# --- policy ------------------------------------------------------------------------------------
def test_thresholds_default_to_50_80_100_and_are_checked():
    builtin = builtin_defaults("full", 30)
    assert effective_policy("a", builtin, None, None, None).alert_thresholds == (50, 80, 100)
    app = build_document("app", "a", None, {"settings": {"budget_alerts": {"thresholds_percent": [90, 25, 90]}}}, "t")
    assert effective_policy("a", builtin, None, app, None).alert_thresholds == (25, 90)
    off = build_document("app", "a", None, {"settings": {"budget_alerts": {"enabled": False}}}, "t")
    assert effective_policy("a", builtin, None, off, None).alert_thresholds == ()
    for bad in ([0], [101], [], [50.5], list(range(1, 12))):
        with pytest.raises(PolicyError):
            build_document("app", "a", None, {"settings": {"budget_alerts": {"thresholds_percent": bad}}}, "t")


def test_crossing_counts_from_the_limit_and_a_refusal_is_100():
    assert alerts.crossed(499, 1000, (50, 80, 100), False) == []
    assert alerts.crossed(500, 1000, (50, 80, 100), False) == [50]
    assert alerts.crossed(950, 1000, (50, 80, 100), False) == [50, 80]
    assert alerts.crossed(300, 1000, (50, 80, 100), True) == [100]  # refused: the budget bit, wherever it stood


# --- exactly once --------------------------------------------------------------------------------
async def test_one_alert_per_threshold_under_a_200_way_race_across_instances(store):
    """Eight instances (each its own memory) share one store; 200 requests see the same crossing."""
    app_id = f"race-{uuid.uuid4().hex[:8]}"
    sent: list[str] = []
    instances = [BudgetAlerts(store, "USD") for _ in range(8)]
    for instance in instances:
        instance.on_claimed = lambda doc: sent.append(doc["id"])

    async def one(i: int) -> None:
        instances[i % 8].observe(_position(app_id, 850 + i % 7), (50, 80, 100))
        await asyncio.sleep(0)

    await asyncio.gather(*(one(i) for i in range(200)))
    for instance in instances:
        await instance.drain()
    assert sorted(sent) == sorted([alerts.alert_id(_position(app_id, 0), t) for t in (50, 80)])
    stored = await store.list_alerts(app_id)
    assert sorted(a["threshold_percent"] for a in stored) == [50, 80]
    # Seen once, remembered: the same crossing later costs no store call.
    calls = []
    original = store.claim_alert
    store.claim_alert = lambda doc: calls.append(doc) or original(doc)
    instances[0].observe(_position(app_id, 900), (50, 80, 100))
    await instances[0].drain()
    assert calls == []
    # The next threshold is a new alert; so is the same threshold for a user, or in another window.
    instances[1].observe(_position(app_id, 1000), (50, 80, 100))
    instances[2].observe(_position(app_id, 600, user_id="u1"), (50, 80, 100))
    instances[3].observe(_position(app_id, 600, metric="spend_per_month"), (50, 80, 100))
    for instance in instances:
        await instance.drain()
    assert len(sent) == 5
    listed = await store.list_alerts(app_id)
    assert [a["sort_key"] for a in listed] == sorted((a["sort_key"] for a in listed), reverse=True)
    assert {a["scope"] for a in listed} == {"app", "user"}


async def test_a_failed_claim_is_tried_again_on_the_next_sighting(tmp_path):
    store = SqliteStore(str(tmp_path / "a.db"))
    await store.open()
    try:
        instance = BudgetAlerts(store, "USD")
        original = store.claim_alert

        async def down(doc):
            from shared.store import StoreUnavailable
            raise StoreUnavailable("down")

        store.claim_alert = down
        instance.observe(_position("app", 600), (50,))
        await instance.drain()
        assert await store.list_alerts("app") == []
        store.claim_alert = original
        instance.observe(_position("app", 610), (50,))
        await instance.drain()
        assert len(await store.list_alerts("app")) == 1
    finally:
        await store.close()


# --- the webhook -----------------------------------------------------------------------------------
async def test_the_webhook_is_signed_and_retried_until_accepted(store):
    async with Receiver(failures=2) as url:
        webhook = AlertWebhook(url, SECRET, attempts=5, first_delay=0.01, max_delay=0.05)
        instance = BudgetAlerts(store, "USD", webhook)
        app_id = f"hook-{uuid.uuid4().hex[:8]}"
        instance.observe(_position(app_id, 8 * 10**9, metric="spend_per_month", limit=10 * 10**9), (80,))
        await instance.drain()
        await instance.close()
    [doc] = await store.list_alerts(app_id)
    assert doc["delivery"]["status"] == "delivered" and doc["delivery"]["attempts"] == 3
    assert doc["unit"] == "USD" and doc["limit"] == 10.0 and doc["used"] == 8.0 and doc["position_percent"] == 80.0


class _MemoryAlerts:
    """Just enough of a store for a BudgetAlerts in a unit test."""

    def __init__(self) -> None:
        self.docs: dict[str, dict] = {}

    async def claim_alert(self, doc):
        if doc["id"] in self.docs:
            return False
        self.docs[doc["id"]] = dict(doc)
        return True

    async def update_alert(self, doc):
        self.docs[doc["id"]] = dict(doc)


async def test_webhook_headers_body_and_signature():
    receiver = Receiver()
    async with receiver as url:
        store = _MemoryAlerts()
        instance = BudgetAlerts(store, "USD", AlertWebhook(url, SECRET, attempts=1))
        instance.observe(_position("sig", 1000, user_id="alice@contoso.com"), (100,))
        await instance.drain()
        await instance.close()
    [(headers, body)] = receiver.received
    payload = json.loads(body)
    assert payload["type"] == "sekisho.budget_alert"
    assert payload["alert"]["app_id"] == "sig" and payload["alert"]["user_id"] == "alice@contoso.com"
    assert payload["alert"]["threshold_percent"] == 100 and payload["alert"]["reason"] == "reached"
    assert headers[alerts.ALERT_ID_HEADER] == payload["alert"]["id"]
    signed = headers[alerts.SIGNATURE_HEADER]
    assert alerts.verify(SECRET.encode(), signed, body)
    assert not alerts.verify(b"another-secret-0123456789", signed, body)
    assert not alerts.verify(SECRET.encode(), signed, body.replace(b"sig", b"gis"))
    assert not alerts.verify(SECRET.encode(), signed, body, now=time.time() + 3600)  # an old message replayed
    assert not alerts.verify(SECRET.encode(), "garbage", body)


async def test_an_alert_never_accepted_becomes_a_dead_letter(store):
    receiver = Receiver(always=500)
    async with receiver as url:
        instance = BudgetAlerts(store, "USD", AlertWebhook(url, SECRET, attempts=4, first_delay=0.01, max_delay=0.02))
        app_id = f"dead-{uuid.uuid4().hex[:8]}"
        instance.observe(_position(app_id, 500), (50,))
        await instance.drain()
        await instance.close()
    assert receiver.attempts == 4
    [doc] = await store.list_alerts(app_id)
    assert doc["delivery"] == {"status": "dead_letter", "attempts": 4, "last_error": "the receiver answered 500"}


async def test_an_unreachable_receiver_and_a_shutdown_mid_back_off_leave_dead_letters(tmp_path):
    store = _MemoryAlerts()
    instance = BudgetAlerts(store, "USD", AlertWebhook("http://127.0.0.1:9/hook", SECRET, attempts=50, first_delay=5, max_delay=5))
    instance.observe(_position("gone", 500), (50,))
    await asyncio.sleep(0.3)
    started = time.monotonic()
    await instance.close(grace_seconds=0.2)
    assert time.monotonic() - started < 3
    [doc] = store.docs.values()
    assert doc["delivery"]["status"] == "dead_letter" and "stopped" in doc["delivery"]["last_error"]


# --- telemetry ---------------------------------------------------------------------------------------
def test_the_alert_event_carries_the_declared_fields_and_no_more():
    captured: list[logging.LogRecord] = []

    class Capture(logging.Handler):
        def emit(self, record):
            captured.append(record)

    handler = Capture()
    telemetry.logger.addHandler(handler)
    try:
        doc = alerts.alert_document(_position("tele", 800, user_id="u"), 80, "USD", webhook=False)
        telemetry.emit_alert(doc)
    finally:
        telemetry.logger.removeHandler(handler)
    [record] = captured
    assert record.getMessage() == telemetry.ALERT_EVENT_NAME
    standard = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}  # set by formatters
    attributes = {k for k in vars(record) if k not in standard and not k.startswith("_")}
    assert attributes <= set(telemetry.ALERT_EVENT_FIELDS)
    assert {"alert_id", "app_id", "user_id", "metric", "threshold_percent", "position_percent", "window"} <= attributes


# --- through the gateway ------------------------------------------------------------------------------
async def _admin_get(url: str, admin_token: str, path: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin_token}"}) as session:
        async with session.get(url + path) as response:
            return response.status, await response.json()


async def test_a_budget_raises_each_alert_once_as_requests_use_it(logged_gateway, admin_token, issuer, data_dir):
    """Sequential requests use up a daily token budget: 50 %, 80 % and 100 % (the refusal) are each
    raised once, for the app; the usage view shows where it stands; alerts are listed for admins."""
    from openai import AsyncAzureOpenAI, RateLimitError

    from .servers import put_app

    url = logged_gateway.host.url
    app_id = await put_app(url, admin_token, {"app_limits": {"tokens_per_day": 400}})
    client = AsyncAzureOpenAI(azure_endpoint=url, api_key="unused", api_version="2024-10-21", max_retries=0,
                              default_headers={"Authorization": f"Bearer {issuer.mint(app_id)}"})
    refused = False
    for _ in range(60):
        try:
            await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=30)
        except RateLimitError:
            refused = True
            break
    await client.close()
    assert refused
    for _ in range(100):
        status, body = await _admin_get(url, admin_token, f"{ADMIN}/alerts?app_id={app_id}")
        if len(body["data"]) == 3:
            break
        await asyncio.sleep(0.05)
    assert status == 200
    raised = body["data"]
    assert [a["threshold_percent"] for a in raised] == [100, 80, 50]  # newest first
    assert {a["scope"] for a in raised} == {"app"} and {a["metric"] for a in raised} == {"tokens_per_day"}
    assert all(a["delivery"] == {"status": "off", "attempts": 0} for a in raised)  # no webhook configured here
    assert raised[2]["position_percent"] >= 50 and raised[1]["position_percent"] >= 80
    status, usage = await _admin_get(url, admin_token, f"{ADMIN}/usage/apps/{app_id}")
    position = usage["metrics"]["tokens_per_day"]["alerts"]
    assert position["thresholds_percent"] == [50, 80, 100] and position["raised_percent"] == [50, 80, 100]
    assert "alerts" not in usage["metrics"]["tokens_per_minute"]  # only the budgets that refuse for a day or a month
    if logged_gateway.kind == "sqlite":  # the CLI reads the same store
        from .test_cli import cli

        listed = cli(data_dir, logged_gateway.host.env["SEKISHO_SQLITE_PATH"], "alerts", "list", "--app-id", app_id, "--status", "off")
        assert listed.returncode == 0, listed.stderr
        assert [a["threshold_percent"] for a in json.loads(listed.stdout)] == [100, 80, 50]
    # Bad filters are refused with the usual error shape.
    for query in ("status=lost", "limit=0", "limit=abc", "app_id=bad%0Aid"):
        status, error = await _admin_get(url, admin_token, f"{ADMIN}/alerts?{query}")
        assert status == 400 and error["error"]["code"], query


async def test_the_alerts_list_is_for_admins_only(gateway, token):
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
        async with session.get(gateway.url + f"{ADMIN}/alerts") as response:
            assert response.status == 403


class ThreadReceiver:
    """A webhook receiver in a thread of its own (the gateway's worker processes call it while the
    test's event loop waits on other things)."""

    def __init__(self) -> None:
        import http.server
        import threading

        self.received: list[tuple[dict, bytes]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["content-length"]))
                outer.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture(scope="module")
def two_workers_with_webhook(simulator, tmp_path_factory, data_dir):
    from .conftest import _gateway_env
    from .servers import start_local_host, stop

    receiver = ThreadReceiver()
    path = str(tmp_path_factory.mktemp("alerts") / "shared.db")
    host = start_local_host(_gateway_env(simulator, SEKISHO_SQLITE_PATH=path, SEKISHO_ALERT_WEBHOOK_URL=receiver.url,
                                         SEKISHO_ALERT_WEBHOOK_SECRET=SECRET), data_dir, workers=2)
    yield host, receiver
    stop(host.process)
    receiver.close()


async def test_one_alert_per_threshold_across_two_worker_processes(two_workers_with_webhook, admin_token, issuer):
    """200 requests released together across two processes use up a daily budget: the webhook
    hears of each threshold exactly once, signed."""
    from .servers import post_all, put_app

    host, receiver = two_workers_with_webhook
    app_id = await put_app(host.url, admin_token, {"app_limits": {"tokens_per_day": 3000}})
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
    results = await asyncio.to_thread(post_all, host.url + CHAT, issuer.mint(app_id), body, 200)
    statuses = [status for status, _, _ in results]
    assert statuses.count(429) > 0 and statuses.count(200) > 0
    for _ in range(100):
        mine = [(headers, payload) for headers, payload in receiver.received if json.loads(payload)["alert"]["app_id"] == app_id]
        if len(mine) >= 3:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)  # a duplicate would have arrived by now
    mine = [(headers, payload) for headers, payload in receiver.received if json.loads(payload)["alert"]["app_id"] == app_id]
    assert sorted(json.loads(payload)["alert"]["threshold_percent"] for _, payload in mine) == [50, 80, 100]
    assert all(alerts.verify(SECRET.encode(), headers[alerts.SIGNATURE_HEADER], payload) for headers, payload in mine)
    status, listed = await _admin_get(host.url, admin_token, f"{ADMIN}/alerts?app_id={app_id}&status=delivered")
    assert status == 200 and len(listed["data"]) == 3


# --- Azure Monitor ---------------------------------------------------------------------------------------
def test_the_alert_rules_read_the_events_and_fields_the_gateway_emits():
    import re
    from pathlib import Path

    bicep = (Path(__file__).resolve().parents[1] / "infra" / "modules" / "monitoring.bicep").read_text()
    queries = re.findall(r"query: '''(.*?)'''", bicep, re.S)
    assert len(queries) == 2
    events = {telemetry.ALERT_EVENT_NAME: set(telemetry.ALERT_EVENT_FIELDS), telemetry.EVENT_NAME: set(telemetry.USAGE_EVENT_FIELDS)}
    for query in queries:
        [event] = re.findall(r'message == "([\w.]+)"', query)
        assert event in events, event
        used = set(re.findall(r"customDimensions\.(\w+)", query))
        assert used and used <= events[event], used - events[event]
        # Every dimension the rule splits by is a column the query projects.
        projected = set(re.findall(r"\| project (.*)", query)[0].replace(" ", "").split(","))
        block = bicep[bicep.index(query):].split("autoMitigate")[0]
        dimensions = set(re.findall(r"name: '(\w+)'\n\s+operator: 'Include'", block))
        assert dimensions and dimensions <= projected, dimensions - projected
    assert "error_code" in queries[1] and '"insufficient_quota"' in queries[1]
    # Both rules notify the action group; the group and rules exist only when someone receives them.
    assert bicep.count("actionGroup.id") >= 3
    assert "var deployAlerts = !empty(alertEmails) || !empty(alertWebhookUri)" in bicep


# --- alerts an instance left behind ------------------------------------------------------------------------
def _stale(app_id: str, threshold: int, status: str, minutes_ago: float) -> dict:
    doc = alerts.alert_document(_position(app_id, 1000), threshold, "USD", webhook=True)
    crossed = time.time() - minutes_ago * 60
    doc["crossed_at"] = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(crossed))
    doc["delivery"] = {"status": status, "attempts": 0}
    return doc


async def test_alerts_left_pending_by_a_stopped_instance_are_sent_again(store):
    app_id = f"left-{uuid.uuid4().hex[:8]}"
    abandoned, fresh, done = _stale(app_id, 50, "pending", 60), _stale(app_id, 80, "pending", 1), _stale(app_id, 100, "delivered", 60)
    for doc in (abandoned, fresh, done):
        assert await store.claim_alert(doc)
    receiver = Receiver()
    async with receiver as url:
        instance = BudgetAlerts(store, "USD", AlertWebhook(url, SECRET, attempts=3, first_delay=0.01))
        assert await instance.redeliver_abandoned() == 1  # the fresh one may still be backing off in its instance
        await instance.close()
    [(headers, body)] = receiver.received
    assert json.loads(body)["alert"]["id"] == abandoned["id"] and alerts.verify(SECRET.encode(), headers[alerts.SIGNATURE_HEADER], body)
    by_id = {a["id"]: a for a in await store.list_alerts(app_id)}
    assert by_id[abandoned["id"]]["delivery"]["status"] == "delivered" and by_id[abandoned["id"]]["delivery"]["redelivered"]
    assert by_id[fresh["id"]]["delivery"]["status"] == "pending"
    # A receiver that still refuses: a dead letter now, not an endless retry.
    lost = _stale(app_id, 90, "pending", 60)
    assert await store.claim_alert(lost)
    async with Receiver(always=503) as url:
        instance = BudgetAlerts(store, "USD", AlertWebhook(url, SECRET, attempts=3, first_delay=0.01))
        assert await instance.redeliver_abandoned() == 1
        await instance.close()
    assert {a["id"]: a for a in await store.list_alerts(app_id)}[lost["id"]]["delivery"]["status"] == "dead_letter"


async def test_the_reconciling_timer_sends_abandoned_alerts(two_workers_with_webhook):
    host, receiver = two_workers_with_webhook
    app_id = f"timer-{uuid.uuid4().hex[:8]}"
    store = SqliteStore(host.env["SEKISHO_SQLITE_PATH"])
    await store.open()
    try:
        doc = _stale(app_id, 50, "pending", 60)
        assert await store.claim_alert(doc)
        async with aiohttp.ClientSession() as session:  # what the Functions host's admin API does: run the timer now
            async with session.post(host.url + "/admin/functions/reconcile_deferred_work", json={"input": ""}) as response:
                assert response.status == 202
        for _ in range(200):
            [stored] = await store.list_alerts(app_id)
            if stored["delivery"]["status"] != "pending":
                break
            await asyncio.sleep(0.05)
    finally:
        await store.close()
    assert stored["delivery"]["status"] == "delivered"
    assert [json.loads(body)["alert"]["id"] for _, body in receiver.received if json.loads(body)["alert"]["app_id"] == app_id] == [doc["id"]]
