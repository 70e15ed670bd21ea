"""The dashboard in a real browser: Debian's headless Chromium driven by Playwright, against a
real uvicorn server, real Postgres and Valkey, and a real dramatiq worker.

An operator signs in, sees a dead letter, retries it and sees it processed; a viewer's retry is
refused. Every page's screenshot is saved under test-artifacts/screenshots/.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import dashboard as support
from tests.support.dashboard import (
    DASH_QUEUE,
    OPERATOR,
    VIEWER,
    dead_letter,
    flaky_until_released,
    processed_rows,
    wait_for,
)
from web.dashboard.views import REFRESH_S

dash_settings = support.dash_settings
dash_url = support.dash_url

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "test-artifacts" / "screenshots"
XQ = f"dramatiq:{DASH_QUEUE}.XQ"


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail("Debian's chromium is not installed: `make test` installs it (apt-get)")
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=executable, headless=True, args=["--no-sandbox"]
        )
        yield browser
        browser.close()


def shot(page: Any, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def sign_in(page: Any, base: str, user: tuple[str, str]) -> None:
    page.goto(f"{base}/dashboard")
    assert "/dashboard/login" in page.url  # nothing without credentials
    page.fill("#username", user[0])
    page.fill("#password", user[1])
    page.click("#sign-in")
    page.wait_for_url(f"{base}/dashboard")
    assert f"{user[0]} (" in page.inner_text("header")


def test_operator_retries_a_dead_letter_and_sees_it_processed(
    chromium: Any, dash_url: str, inproc_worker: Any, redis_client: Any, sql: Any
) -> None:
    # Given a message that failed for good in a real worker
    flaky_until_released.send("browser-1", email="maria.lopez@example.com")
    assert wait_for(lambda: redis_client.zcard(XQ) == 1)

    context = chromium.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.goto(f"{dash_url}/dashboard/login")
    shot(page, "01-login")
    sign_in(page, dash_url, OPERATOR)
    assert page.inner_text("#total-dead") == "1"
    shot(page, "02-overview")

    # When the operator opens the queues page, the dead letter is there, e-mail masked
    page.click("text=Queues")
    row = page.locator("tr.dead-letter")
    assert row.count() == 1
    assert "flaky_until_released" in row.inner_text()
    assert "m***@example.com" in row.inner_text()
    assert "maria.lopez" not in page.content()
    assert "PermanentError" in row.inner_text()
    shot(page, "03-queues-dead-letter")

    # and, the cause fixed, retries it
    redis_client.set("release:browser-1", "1")
    row.locator("button.retry-one").click()
    page.wait_for_selector("#flash")
    assert "Retried 1" in page.inner_text("#flash")

    # Then a real worker processes it and the dashboard shows no dead letter left
    assert wait_for(lambda: processed_rows(sql, "browser-1") == 1)
    page.goto(f"{dash_url}/dashboard/queues")
    assert page.locator("#no-dead-letters").count() == 1
    shot(page, "04-queues-after-retry")
    page.goto(f"{dash_url}/dashboard")
    assert page.inner_text("#total-dead") == "0"
    assert page.locator("#throughput-chart rect").count() >= 1  # the attempts are charted

    for name, path in (
        ("05-schedules", "/dashboard/schedules"),
        ("06-pipelines", "/dashboard/pipelines"),
        ("07-backups", "/dashboard/backups"),
        ("08-webhooks", "/dashboard/webhooks"),
        ("09-audit", "/dashboard/audit"),
    ):
        page.goto(f"{dash_url}{path}")
        assert page.locator("main h1").count() == 1, path
        shot(page, name)
    assert "dashboard.dead_letter.retry" in page.inner_text("#audit")
    assert OPERATOR[0] in page.inner_text("#audit")
    context.close()


def test_a_viewers_retry_is_refused(
    chromium: Any, dash_url: str, inproc_worker: Any, redis_client: Any, sql: Any
) -> None:
    flaky_until_released.send("browser-2")
    assert wait_for(lambda: redis_client.zcard(XQ) == 1)
    [rid] = redis_client.zrange(XQ, 0, -1)
    redis_client.set("release:browser-2", "1")

    context = chromium.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    sign_in(page, dash_url, VIEWER)
    # the overview refreshes itself: a letter that dies now shows up without a reload
    assert page.inner_text("#total-dead") == "1"
    page.evaluate("window.__not_reloaded = true")
    dead_letter("flaky_until_released", "browser-3")
    assert wait_for(lambda: page.inner_text("#total-dead") == "2", timeout=REFRESH_S * 2)
    assert page.evaluate("window.__not_reloaded") is True  # swapped in place, not reloaded
    page.goto(f"{dash_url}/dashboard/queues")
    assert page.locator("tr.dead-letter").count() == 2
    assert page.locator("button.retry-one").count() == 0  # a viewer gets no buttons
    shot(page, "10-viewer-queues")

    # A viewer who crafts the retry form anyway (with a valid CSRF token) is refused
    page.evaluate(
        """([queue, id]) => {
            const form = document.createElement("form");
            form.method = "post";
            form.action = "/dashboard/dead/retry";
            const csrf = document.querySelector("input[name=csrf]").value;
            for (const [name, value] of Object.entries({csrf, queue, id})) {
                const input = document.createElement("input");
                input.type = "hidden"; input.name = name; input.value = value;
                form.appendChild(input);
            }
            document.body.appendChild(form);
            form.submit();
        }""",
        [DASH_QUEUE, rid],
    )
    page.wait_for_selector("#refused")
    assert "viewer role cannot" in page.inner_text("#refused")
    shot(page, "11-viewer-refused")
    assert rid in redis_client.zrange(XQ, 0, -1)
    assert processed_rows(sql, "browser-2") == 0
    context.close()


def new_page(chromium: Any, *, address: str | None = None) -> tuple[Any, Any]:
    """A fresh browser context (its own cookies), appearing to come from `address` through
    the trusted proxy header the test server believes."""
    context = chromium.new_context(
        viewport={"width": 1400, "height": 900},
        extra_http_headers={"X-Forwarded-For": address} if address else {},
    )
    return context, context.new_page()


def test_sign_out_then_a_replayed_cookie_is_refused(
    chromium: Any, dash_url: str, dash_settings: Any
) -> None:
    context, page = new_page(chromium)
    sign_in(page, dash_url, OPERATOR)
    [cookie] = [c for c in context.cookies() if c["name"] == "tidemill_session"]
    page.click("#logout")
    page.wait_for_url(f"{dash_url}/dashboard/login")
    shot(page, "12-signed-out")
    context.close()
    # the attacker's browser with a copy of the cookie taken before sign-out
    thief, page = new_page(chromium)
    thief.add_cookies([cookie])
    page.goto(f"{dash_url}/dashboard/schedules")
    assert "/dashboard/login" in page.url
    thief.close()


def test_an_attackers_failures_do_not_stop_the_operator_elsewhere(
    chromium: Any, dash_url: str, dash_settings: Any
) -> None:
    attacker, page = new_page(chromium, address="203.0.113.66")
    page.goto(f"{dash_url}/dashboard/login")
    for _ in range(dash_settings.login_max_failures + 1):
        page.fill("#username", OPERATOR[0])
        page.fill("#password", "wrong-guess")
        page.click("#sign-in")
        page.wait_for_selector("#login-error")
    assert "wait" in page.inner_text("#login-error")
    shot(page, "13-attacker-held")
    attacker.close()
    # the operator, from her own address, signs in at once
    context, page = new_page(chromium, address="198.51.100.5")
    sign_in(page, dash_url, OPERATOR)
    page.goto(f"{dash_url}/dashboard/audit?action=login_rate_limited")
    assert "203.0.113.66" in page.inner_text("#audit")
    shot(page, "14-audit-rate-limited")
    context.close()


def test_a_forged_done_link_shows_nothing(chromium: Any, dash_url: str) -> None:
    context, page = new_page(chromium)
    sign_in(page, dash_url, VIEWER)
    page.goto(f"{dash_url}/dashboard/queues?done=deleted&n=500")
    assert page.locator("#flash").count() == 0
    assert "Deleted" not in page.inner_text("main")
    context.close()


def reloaded(page: Any) -> bool:
    page.reload()
    return True


POST_FORM = """([action, fields]) => {
    const form = document.createElement("form");
    form.method = "post";
    form.action = action;
    const csrf = document.querySelector("input[name=csrf]").value;
    for (const [name, value] of Object.entries({csrf, ...fields})) {
        const input = document.createElement("input");
        input.type = "hidden"; input.name = name; input.value = value;
        form.appendChild(input);
    }
    document.body.appendChild(form);
    form.submit();
}"""


def test_operator_pages_and_actions(
    chromium: Any, dash_url: str, dash_settings: Any, inproc_worker: Any, redis_client: Any
) -> None:
    from schedules.schedule import PIPELINE_ACTOR, load_schedules

    # Given a message that died after a real attempt, and one that ran
    flaky_until_released.send("browser-depth", email="maria.lopez@example.com")
    redis_client.set("release:browser-ok", "1")
    flaky_until_released.send("browser-ok")
    assert wait_for(lambda: redis_client.zcard(XQ) == 1)
    [rid] = redis_client.zrange(XQ, 0, -1)
    context, page = new_page(chromium)
    sign_in(page, dash_url, OPERATOR)

    # the queue page: dead letters by state, one message with its attempts
    page.goto(f"{dash_url}/dashboard/queues/{DASH_QUEUE}?state=dead")
    page.locator("tr.message a").first.click()
    page.wait_for_selector("#attempts")
    assert "PermanentError" in page.inner_text("#attempts")
    assert "maria.lopez" not in page.content()
    shot(page, "15-message")

    # pause the queue, then resume it
    page.goto(f"{dash_url}/dashboard/queues/{DASH_QUEUE}")
    page.click("#pause-queue")
    page.wait_for_selector("#queue-paused")
    assert "paused" in page.inner_text("#flash")
    shot(page, "16-queue-paused")
    page.click("#resume-queue")
    page.wait_for_selector("#queue-running")

    # workers: the in-process worker, with its pid
    page.goto(f"{dash_url}/dashboard/workers")
    assert wait_for(lambda: reloaded(page) and page.locator("tr.worker").count() >= 1)
    shot(page, "17-workers")

    # charts per queue, and a month from the hourly rollups
    page.goto(f"{dash_url}/dashboard/charts?queue={DASH_QUEUE}&range=30d")
    assert page.locator("#series-chart").count() == 1
    page.goto(f"{dash_url}/dashboard/charts?queue={DASH_QUEUE}")
    assert wait_for(lambda: reloaded(page) and "2 finished" in page.inner_text("#chart-totals"))
    shot(page, "18-charts")

    # a schedule's ticks: run now, and the tick is listed
    name = next(s.name for s in load_schedules(dash_settings) if s.actor == PIPELINE_ACTOR)
    page.goto(f"{dash_url}/dashboard/schedules/{name}")
    page.click("#run-now")
    page.wait_for_selector("#flash")
    page.goto(f"{dash_url}/dashboard/schedules/{name}")
    assert page.locator("tr.tick").count() == 1
    shot(page, "19-schedule-ticks")

    # back up now and verify queue the backup schedules
    for op in ("backup", "verify"):
        page.goto(f"{dash_url}/dashboard/backups")
        page.click(f"#{op}-now")
        page.wait_for_selector("#flash")
        assert "queued" in page.inner_text("#flash")
    shot(page, "20-backup-queued")

    # the audit page, filtered to queue actions
    page.goto(f"{dash_url}/dashboard/audit")
    page.fill("input[name=action]", "queue")
    page.click("#audit-filter button")
    page.wait_for_url("**/dashboard/audit?*")
    text = page.inner_text("#audit")
    assert "dashboard.queue.pause" in text and "dashboard.queue.resume" in text
    assert "dashboard.backup" not in text
    shot(page, "21-audit-filtered")

    # sign out everywhere ends this browser's session too
    page.click("#logout-everywhere")
    page.wait_for_url(f"{dash_url}/dashboard/login")
    page.goto(f"{dash_url}/dashboard/workers")
    assert "/dashboard/login" in page.url
    context.close()
    assert rid in redis_client.zrange(XQ, 0, -1)  # looking changed nothing


def test_a_viewer_sees_the_new_pages_and_is_refused_every_new_action(
    chromium: Any, dash_url: str, dash_settings: Any, redis_client: Any
) -> None:
    from schedules.schedule import load_schedules

    dead_letter("flaky_until_released", "viewer-depth")
    [rid] = redis_client.zrange(XQ, 0, -1)
    name = load_schedules(dash_settings)[0].name
    context, page = new_page(chromium)
    sign_in(page, dash_url, VIEWER)
    for path in (
        f"/dashboard/queues/{DASH_QUEUE}",
        f"/dashboard/queues/{DASH_QUEUE}/messages/{rid}",
        "/dashboard/workers",
        "/dashboard/charts",
        f"/dashboard/schedules/{name}",
        "/dashboard/backups",
        "/dashboard/audit",
    ):
        page.goto(f"{dash_url}{path}")
        assert page.locator("main h1").count() == 1, path
        for button in ("#pause-queue", "#resume-queue", "#run-now", "#backup-now", "#verify-now"):
            assert page.locator(button).count() == 0, (path, button)
    for action in (
        f"/dashboard/queues/{DASH_QUEUE}/pause",
        f"/dashboard/queues/{DASH_QUEUE}/resume",
        f"/dashboard/schedules/{name}/trigger",
        "/dashboard/backups/backup",
        "/dashboard/backups/verify",
    ):
        page.goto(f"{dash_url}/dashboard/workers")
        page.evaluate(POST_FORM, [action, {}])
        page.wait_for_selector("#refused")
        assert "viewer role cannot" in page.inner_text("#refused"), action
    shot(page, "22-viewer-refused-pause")
    context.close()
    from workers.pause import paused_queues

    assert paused_queues() == {}
