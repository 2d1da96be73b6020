"""Quota leases (shared/quota/leases.py): the book's rules, and their effect through the gateway
on both stores — fewer store reservations, headers as if every request had reserved, nothing
over the limit, and the unspent share handed back."""
from __future__ import annotations

import asyncio
import time

from shared.quota.leases import LeaseBook
from shared.store import CounterCharge

from .test_quota import _away_from_minute_boundary, _chat, _register, _settled, _usage

WINDOW_END = time.time() + 3600


def charge(amount=1, limit=1000, counter="rpm:w"):
    return CounterCharge("app:a", counter, amount, limit, 7200)


def test_small_limits_and_big_charges_are_not_leased():
    book = LeaseBook(0.02)
    assert book.size(charge(limit=1000)) == 20
    assert book.size(charge(limit=99)) == 0  # 1 unit would not save a call
    assert book.size(charge(amount=15, limit=1000)) == 0  # less than two requests' worth
    assert LeaseBook(0).size(charge()) == 0


def test_first_call_learns_then_tops_up_one_at_a_time_below_half_the_limit():
    book = LeaseBook(0.02)
    c = charge()
    assert book.top_up(c) == 0  # the counter's value is unknown yet
    book.record(c, 1, 0, WINDOW_END, 0.0)
    assert book.top_up(c) == 20
    assert book.top_up(c) == 0  # one top-up in flight per counter, however many requests wait
    book.top_up_done(c)
    book.record(c, 22, 20, WINDOW_END, 0.0)
    assert book.take([c] * 20, 0.1) == [True] * 20
    assert book.take([c], 0.1) == [False]
    assert book.used(c) == 22  # 22 in the store, nothing unspent
    book.record(c, 480, 0, WINDOW_END, 0.2)  # others used the counter meanwhile
    assert book.top_up(c) == 0  # 480 + 1 + 20 would pass half the limit


def test_give_back_and_changed_limit():
    book = LeaseBook(0.02)
    c = charge()
    book.record(c, 1, 0, WINDOW_END, 0.0)
    book.top_up(c)
    book.record(c, 22, 20, WINDOW_END, 0.0)
    covered = book.take([c, charge(counter="tpm:w")], 0.1)
    assert covered == [True, False]
    book.give_back([c, charge(counter="tpm:w")], covered)
    assert book.used(c) == 2
    assert book.take([charge(limit=2000)], 0.1) == [False]  # the policy changed: the old lease is not spent
    assert book.record(charge(limit=2000), 23, 0, WINDOW_END, 0.1) == 20  # and is handed back


def test_sweep_hands_back_idle_leases_and_forgets_ended_windows():
    book = LeaseBook(0.02, idle_seconds=1.0)
    c, ended = charge(), charge(counter="rpm:old")
    for each, end in ((c, WINDOW_END), (ended, 5.0)):
        book.record(each, 1, 0, end, 0.0)
        book.top_up(each)
        book.record(each, 22, 20, end, 0.0)
    book.take([c, ended], 0.5)
    assert book.sweep(1.0) == []  # used 0.5 s ago
    returned = book.sweep(10.0)
    assert [(r.counter, r.amount) for r in returned] == [("rpm:w", -19)]  # rpm:old's window ended: nothing to hand back
    assert book.used(c) == 3 and book.outstanding == 0  # two reserved in the store, one from the lease
    assert book.release_all(10.0) == []


def test_counters_without_a_lease_are_forgotten_after_a_minute():
    book = LeaseBook(0.02)
    for user in range(100):  # limits too small to lease: the book only remembers their values
        book.record(CounterCharge(f"user:a:{user}", "rpm:w", 1, 50, 7200), 1, 0, WINDOW_END, 0.0)
    assert len(book) == 100 and book.outstanding == 0
    assert book.sweep(30.0) == [] and len(book) == 100
    assert book.sweep(61.0) == [] and len(book) == 0


async def test_leased_requests_skip_the_store_and_the_share_comes_back(logged_gateway, admin_token, issuer):
    """rpm 1000: the first request learns the counter, the second reserves 1 + a 20-unit lease,
    the next ten are charged to the lease (the store's counter does not move), and the unspent
    share is handed back a second after the last request."""
    app_id = await _register(logged_gateway, admin_token, {"app_limits": {"requests_per_minute": 1000, "tokens_per_day": 10_000_000}})
    token = issuer.mint(app_id)
    _away_from_minute_boundary()
    remaining = []
    for _ in range(2):
        status, headers, _ = await _chat(logged_gateway, token)
        assert status == 200
        remaining.append(int(headers["x-ratelimit-remaining-requests"]))
    assert (await _usage(logged_gateway, admin_token, app_id))["requests_per_minute"]["used"] == 22
    for _ in range(10):
        status, headers, _ = await _chat(logged_gateway, token)
        assert status == 200
        remaining.append(int(headers["x-ratelimit-remaining-requests"]))
    assert (await _usage(logged_gateway, admin_token, app_id))["requests_per_minute"]["used"] == 22  # no store call
    assert remaining == list(range(999, 987, -1))  # as if each request had reserved in the store
    await _settled(logged_gateway, admin_token, app_id, "requests_per_minute", 12)
    # Token counters settle to the real usage as before: estimate, lease and hand-back net out.
    records = [r for r in await _records(logged_gateway, app_id) if r.get("usage")]
    assert len(records) == 12
    await _settled(logged_gateway, admin_token, app_id, "tokens_per_day", sum(r["usage"]["total_tokens"] for r in records))


async def test_leases_never_admit_more_than_the_limit(logged_gateway, admin_token, issuer):
    """rpm 200 (10-unit leases): 60 sequential requests take leases, then 300 race for the rest."""
    from .servers import post_all

    app_id = await _register(logged_gateway, admin_token, {"app_limits": {"requests_per_minute": 200}, "default_completion_tokens": 5})
    token = issuer.mint(app_id)
    _away_from_minute_boundary()
    for _ in range(60):
        assert (await _chat(logged_gateway, token))[0] == 200
    url = logged_gateway.url + "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"
    results = await asyncio.to_thread(post_all, url, token, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}, 300)
    admitted = 60 + [status for status, _, _ in results].count(200)
    assert 200 - 10 <= admitted <= 200  # at most one instance's lease left unspent, never over
    await _settled(logged_gateway, admin_token, app_id, "requests_per_minute", admitted)


async def _records(logged_gateway, app_id):
    from shared.store import LogQuery

    deadline = time.monotonic() + 10
    while True:
        records = await logged_gateway.store.query_logs(LogQuery(app_id=app_id, limit=1000))
        if len(records) >= 12 or time.monotonic() > deadline:
            return records
        await asyncio.sleep(0.05)
