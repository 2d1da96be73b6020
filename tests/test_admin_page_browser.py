"""The admin page in a real browser: headless Chromium (Debian's `chromium`) driven by Playwright.

Sign in with the CLI's one-time link, see the charts and the usage table, filter the request log,
open a request. A screenshot is saved to test-artifacts/admin-page.png.

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
    from playwright.async_api import async_playwright

    executable = _chromium()
    app_id, user = str(uuid.uuid4()), "browser-user-" + uuid.uuid4().hex[:6]
    async with aiohttp.ClientSession() as session:
        async with session.put(f"{gateway.url}/sekisho/admin/policies/apps/{app_id}", headers={"Authorization": f"Bearer {admin_token}"},
                               json={"name": "Browser app", "settings": {"trust_user_header": True}}) as response:
            assert response.status == 201
        token = issuer.mint(app_id)
        for text in ("first question", "second question"):
            async with session.post(gateway.url + CHAT, headers={"Authorization": f"Bearer {token}", "x-sekisho-user": user},
                                    json={"messages": [{"role": "user", "content": text}]}) as response:
                assert response.status == 200
    env = {**os.environ, "SEKISHO_SQLITE_PATH": sqlite_path}
    link = subprocess.run([sys.executable, "-m", "shared.admin.cli", "--data-dir", str(data_dir), "admin-login", "--url", gateway.url],
                          cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout.strip()

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            page = await browser.new_page(viewport={"width": 1500, "height": 1800})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            await page.goto(link)  # redeems the code, sets the session cookie, lands on the page
            assert page.url == f"{gateway.url}/sekisho/admin"
            await page.fill("#app", app_id)
            await page.click("#apply")
            # The usage table (from the roll-ups) shows the app, and only it once filtered.
            await page.locator("#usage-table tbody tr", has_text=app_id).wait_for()
            await page.wait_for_function("document.querySelectorAll('#usage-table tbody tr').length === 1")
            assert app_id in await page.locator("#usage-table tbody tr").first.inner_text()
            # The chart is a server-side SVG that loaded.
            await page.wait_for_function("document.getElementById('chart-cost').complete && document.getElementById('chart-cost').naturalWidth > 0")
            # Quota use for the chosen app.
            await page.locator("#quota-body table").wait_for()
            # Filter the log by user, open a request.
            await page.fill("#log-filters input[name=user_id]", user)
            await page.click("#log-filters button[type=submit]")
            await page.wait_for_function("document.querySelectorAll('#log-table tbody tr').length === 2")
            await page.locator("#log-table tbody tr").first.click()
            await page.locator("#detail").wait_for(state="visible")
            assert "second question" in await page.locator("#detail-prompt").inner_text()
            assert "gpt-4o-mini" in await page.locator("#detail-summary").inner_text()
            ARTIFACTS.mkdir(exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / "admin-page.png"), full_page=True)
            assert errors == []
        finally:
            await browser.close()
