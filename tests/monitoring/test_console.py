"""The console at /ui, driven in the system's headless Chromium (Playwright, no browser download): each page
renders the stack's live data, a scale action changes the pool and the page shows the decision, and a
viewer's token cannot act. SHOAL_CONSOLE_SCREENSHOTS=docs/console refreshes docs/console.md's images."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.monitoring.conftest import Monitored

pytestmark = [pytest.mark.monitoring, pytest.mark.slow]

TIMEOUT_MS = 90_000  # a new worker takes seconds to start on this machine's two cores
expect.set_options(timeout=TIMEOUT_MS)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "make test-monitoring installs Debian's chromium"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = os.environ.get("SHOAL_CONSOLE_SCREENSHOTS")
    return Path(folder) if folder else tmp_path_factory.mktemp("console")


def signed_in(browser: Browser, monitored: Monitored, token: str) -> Page:
    page = browser.new_page(viewport={"width": 1360, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(f"{monitored.endpoints.controller}/ui")
    page.fill("#token", token)
    page.click("#signin button[type=submit]")
    return page


def test_each_page_renders_live_data(browser: Browser, monitored: Monitored, shots: Path) -> None:
    page = signed_in(browser, monitored, monitored.endpoints.admin_token)
    expect(page.locator("#whoami")).to_have_text("signed in as admin")
    # Overview: both pools with their replicas, and the decisions that sized them.
    expect(page.locator('tr[data-pool="prefill"] td[data-field="ready"]')).to_have_text("1")
    expect(page.locator('tr[data-pool="decode"] td[data-field="ready"]')).to_have_text("1")
    expect(page.locator("#worker-count")).to_have_text("2")
    expect(page.locator("#timeline circle").first).to_be_visible()
    page.screenshot(path=str(shots / "overview.png"), full_page=True)

    page.goto(f"{monitored.endpoints.controller}/ui#/workers")
    rows = page.locator("tr[data-worker]")
    expect(rows).to_have_count(2)
    decode = page.locator("tr[data-worker^='decode-'] td")
    expect(decode.nth(1)).to_have_text("decode")  # its pool
    expect(decode.nth(6)).to_have_text(re.compile(r"^ \d+%$"))  # its KV cache use
    page.screenshot(path=str(shots / "workers.png"), full_page=True)

    # Experts: the decode pool's two-rank instance, with tokens per (layer, expert) and a balance per layer.
    page.goto(f"{monitored.endpoints.controller}/ui#/experts")
    instance = page.locator("section[data-instance^='decode-']")
    expect(instance).to_have_count(1)
    expect(instance.locator("h2")).to_contain_text("2 ranks")
    expect(instance.locator("td[data-field=balance]")).to_have_count(4)  # the tiny model's four MoE layers
    expect(instance.locator("td[data-field=balance]").first).to_have_text(re.compile(r"^\d+\.\d\d$"))
    page.screenshot(path=str(shots / "experts.png"), full_page=True)

    # Agent graphs: the submitted graph as a DAG; its steps finish, each LLM step placed on a pool.
    page.goto(f"{monitored.endpoints.controller}/ui#/graphs/{monitored.graph_id}")
    for step in ("find", "budget", "draft", "answer"):
        expect(page.locator(f'#dag g[data-step="{step}"]')).to_have_attribute("data-state", "succeeded")
    expect(page.locator("#dag line")).to_have_count(3)  # draft after find; answer after draft and budget
    expect(page.locator('#dag g[data-step="draft"] text').nth(1)).to_contain_text("on ")
    page.screenshot(path=str(shots / "graphs.png"), full_page=True)
    page.close()


def test_a_scale_action_changes_the_pool_and_shows_the_decision(
    browser: Browser, monitored: Monitored, shots: Path
) -> None:
    page = signed_in(browser, monitored, monitored.endpoints.admin_token)
    prefill = page.locator('tr[data-pool="prefill"]')
    prefill.locator("input").fill("2")
    prefill.locator("button[data-action=scale]").click()
    expect(page.locator("#confirm-text")).to_have_text("Scale pool prefill?")
    page.click("#confirm-ok")
    expect(page.locator("#status")).to_have_text("Scale: done")
    with monitored.admin() as admin:
        assert admin.get("/v1/pools/prefill").json()["replicas_override"] == 2
    # The controller decides, starts a worker, and the page shows the decision and then the new replica.
    expect(prefill.locator('td[data-field="desired"]')).to_have_text("2")
    expect(page.locator('#decisions tr[data-decision="prefill"]').first).to_contain_text("manual-override")
    expect(prefill.locator('td[data-field="ready"]')).to_have_text("2")
    page.screenshot(path=str(shots / "overview-scaled.png"), full_page=True)

    # Back to one: the controller drains the newest worker through a scale-down job, which the Jobs page lists.
    prefill.locator("input").fill("1")
    prefill.locator("button[data-action=scale]").click()
    page.click("#confirm-ok")
    page.goto(f"{monitored.endpoints.controller}/ui#/jobs")
    job = page.locator("tr[data-job^='scale-down-prefill-']")
    expect(job).to_have_count(1)
    expect(job.locator(".tag")).to_have_text("succeeded")
    page.screenshot(path=str(shots / "jobs.png"), full_page=True)
    page.close()


def test_a_viewer_sees_but_cannot_act(browser: Browser, monitored: Monitored) -> None:
    page = signed_in(browser, monitored, monitored.viewer_token)
    expect(page.locator("#whoami")).to_have_text("signed in as viewer")
    scale = page.locator('tr[data-pool="decode"] button[data-action=scale]')
    expect(scale).to_be_disabled()
    page.goto(f"{monitored.endpoints.controller}/ui#/workers")
    expect(page.locator("button[data-action=drain]").first).to_be_disabled()
    # Greyed-out buttons are a courtesy; the API is the lock: the viewer's token is refused with 403.
    status = page.evaluate(
        """async () => (await fetch("/v1/pools/decode/scale", {method: "POST",
             headers: {authorization: `Bearer ${sessionStorage.getItem("shoal-console-token")}`,
                       "content-type": "application/json"},
             body: JSON.stringify({replicas: 3})})).status"""
    )
    assert status == 403
    with monitored.admin() as admin:
        assert admin.get("/v1/pools/decode").json()["replicas_override"] is None
    page.close()


def test_a_wrong_token_is_refused(browser: Browser, monitored: Monitored) -> None:
    page = signed_in(browser, monitored, "not-a-token")
    expect(page.locator("#signin-error")).to_have_text("That token was not accepted.")
    expect(page.locator("#page")).to_be_empty()
    page.close()
