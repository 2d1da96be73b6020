"""The admin page in a real browser: headless Chromium (Debian's `chromium`) driven by Playwright.

Sign in with the CLI's one-time link, see the charts (their scale readable for sub-cent costs) and
the usage table, a user's view with their budget's alert thresholds, the alerts raised, filter the
request log, open a request as a conversation (roles, tool calls, the guard's decision inline,
the raw JSON one click away). Screenshots: test-artifacts/admin-page.png, and
docs/admin-conversation.png (the conversation view, kept in the docs).

CI (.ci/run) installs chromium and sets SEKISHO_REQUIRE_BROWSER=1, so there a missing browser
fails the test; on a developer machine without chromium it is skipped with the reason.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import aiohttp
import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHAT = "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("SEKISHO_REQUIRE_BROWSER") == "1":
        pytest.fail("chromium is not installed (apt-get install chromium)")
    pytest.skip("chromium is not installed (apt-get install chromium); CI installs it")


async def test_admin_page_in_chromium(gateway, sqlite_path, data_dir, admin_token, issuer):
    from playwright.async_api import async_playwright, expect

    executable = _chromium()
    app_id, user = str(uuid.uuid4()), "browser-user-" + uuid.uuid4().hex[:6]
    spender = "spender-" + uuid.uuid4().hex[:6]
    settings = {"trust_user_header": True, "user_limits": {"tokens_per_day": 300},
                "guards": {"rules": [{"id": "codename", "pattern": "falcon", "applies_to": "output"}], "output_action": "redact"}}
    async with aiohttp.ClientSession() as session:
        async with session.put(f"{gateway.url}/sekisho/admin/policies/apps/{app_id}", headers={"Authorization": f"Bearer {admin_token}"},
                               json={"name": "Browser app", "settings": settings}) as response:
            assert response.status == 201
        token = issuer.mint(app_id)
        conversation = [
            {"role": "system", "content": "You answer about flights."},
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "lookup_flight", "arguments": '{"code": "NH7"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "NH7 leaves at 10:05"},
        ]
        bodies = [{"messages": [{"role": "user", "content": "first question"}], "max_tokens": 20},
                  {"messages": conversation + [{"role": "user", "content": "second question"}], "max_tokens": 20,
                   "x_sim": {"reply": "It leaves at 10:05 on the Falcon route."}}]
        for body in bodies:
            async with session.post(gateway.url + CHAT, headers={"Authorization": f"Bearer {token}", "x-sekisho-user": user}, json=body) as response:
                assert response.status == 200
        # Another user spends their daily budget: each threshold is raised once for them.
        for _ in range(40):
            async with session.post(gateway.url + CHAT, headers={"Authorization": f"Bearer {token}", "x-sekisho-user": spender},
                                    json={"messages": [{"role": "user", "content": "spend"}], "max_tokens": 20}) as response:
                if response.status == 429:
                    break
        assert response.status == 429
    env = {**os.environ, "SEKISHO_SQLITE_PATH": sqlite_path}
    link = subprocess.run([sys.executable, "-m", "shared.admin.cli", "--data-dir", str(data_dir), "admin-login", "--url", gateway.url],
                          cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout.strip()

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            page = await browser.new_page(viewport={"width": 1500, "height": 1800})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            # Waits use locators and expect(), which poll without evaluating strings: the page's CSP
            # (no 'unsafe-eval') refuses page.wait_for_function's string predicates once they poll.
            await page.goto(link)  # redeems the code, sets the session cookie, lands on the page
            assert page.url == f"{gateway.url}/sekisho/admin"
            await page.fill("#app", app_id)
            await page.click("#apply")
            # The usage table (from the roll-ups) shows the app, and only it once filtered.
            await page.locator("#usage-table tbody tr", has_text=app_id).wait_for()
            await expect(page.locator("#usage-table tbody tr")).to_have_count(1)
            assert app_id in await page.locator("#usage-table tbody tr").first.inner_text()
            # The chart is a server-side SVG that loaded.
            await expect(page.locator("#chart-cost")).to_have_js_property("complete", True)
            await expect(page.locator("#chart-cost")).to_have_js_property("naturalWidth", 720)
            # Quota use for the chosen app.
            await page.locator("#quota-body table").wait_for()
            # The per-user view: the spender's limits, with the thresholds marked and all three raised.
            await page.fill("#user", spender)
            await page.click("#apply")
            await page.locator("#user-view table").first.wait_for()
            await expect(page.locator("#user-view .meter i.raised")).to_have_count(3)
            assert "50 % ✔, 80 % ✔, 100 % ✔" in await page.locator("#user-view").inner_text()
            assert await page.locator("#user-view table").nth(1).locator("tbody tr").count() == 3  # their alerts
            await page.locator("#alerts-body tbody tr").nth(2).wait_for()
            assert spender in await page.locator("#alerts-body").inner_text()
            await page.fill("#user", "")
            # Filter the log by user, open a request.
            await page.fill("#log-filters input[name=user_id]", user)
            await page.click("#log-filters button[type=submit]")
            await expect(page.locator("#log-table tbody tr")).to_have_count(2)
            assert not await page.locator("#log-more").is_visible()
            # Paging: a page of one, then the older request appended by the button.
            await page.evaluate("logPage = 1")
            await page.click("#log-filters button[type=submit]")
            await expect(page.locator("#log-table tbody tr")).to_have_count(1)
            await expect(page.locator("#log-more")).to_be_visible()
            await page.click("#log-more")
            await expect(page.locator("#log-table tbody tr")).to_have_count(2)
            await expect(page.locator("#log-more")).to_be_hidden()
            await page.locator("#log-table tbody tr").first.click()
            await page.locator("#detail").wait_for(state="visible")
            assert "gpt-4o-mini" in await page.locator("#detail-summary").inner_text()
            # The conversation: every turn with its role, the tool call and its result, the answer
            # as the model wrote it, and the guard's redaction where it happened.
            turns = page.locator("#detail-conversation .turn")
            roles = [await turns.nth(i).locator(".role").inner_text() for i in range(await turns.count())]
            assert [r.lower() for r in roles] == ["system", "user", "assistant", "tool", "user", "assistant"]
            text = await page.locator("#detail-conversation").inner_text()
            assert 'calls lookup_flight({"code": "NH7"})' in text and "result of call_1" in text
            assert "Falcon route" in text and "finish_reason: stop" in text
            assert "guard (output): redact by rule codename" in text
            # The raw JSON is one click away.
            assert not await page.locator("#detail-prompt").is_visible()
            await page.click("#detail-raw summary")
            assert "second question" in await page.locator("#detail-prompt").inner_text()
            ARTIFACTS.mkdir(exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / "admin-page.png"), full_page=True)
            await page.locator("#detail-conversation").screenshot(path=str(ROOT / "docs" / "admin-conversation.png"))
            # The cost chart's scale, for costs of fractions of a cent: five distinct labels, none
            # rounded to 0 but the origin.
            chart = f"{gateway.url}/sekisho/admin/reports/chart?app_id={app_id}&by=day&metric=cost"
            await page.goto(chart)
            ticks = await page.locator("svg text[text-anchor=end]").all_text_contents()
            assert len(ticks) == 5 and len(set(ticks)) == 5 and ticks[0] in ("0", "0$", "0 USD"), ticks
            top = float("".join(c for c in ticks[-1] if c.isdigit() or c in ".e-"))
            assert 0 < top < 0.01 and not any("e" in tick for tick in ticks), ticks
            assert errors == []
        finally:
            await browser.close()
