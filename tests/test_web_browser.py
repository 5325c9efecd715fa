"""durian's flow in a real headless Chromium (issue 6, "Done when"): log in,
select the person hook, fill the generated filter (name starts with "J"),
create the listener, see it listed, write matching and non-matching rows, watch
the matching deliveries appear in the live log, redeliver one.

Everything is real: `cdc-hooks run --web` as a process (relay and web in one
event loop), PostgreSQL, an aiohttp receiver on loopback, Debian's chromium
driven by Playwright (never `playwright install`: it downloads a browser).
Screenshots of each page go to the test's temporary directory, or, with
CDC_HOOKS_SCREENSHOTS=1, to docs/screenshots/ for the README (a plain test run
leaves the work tree as it was).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from receivers import RelayProcess, free_port, wait_until
from shared import PERSON_TABLE

from cdc_hooks.config import Config

playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download)")
CHROMIUM = os.environ.get("CDC_HOOKS_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip("Debian's chromium is not installed: apt-get install -y chromium", allow_module_level=True)

expect = playwright.expect
# A ceiling, not a speed claim: a loaded CI machine may take seconds to relay and render.
expect.set_options(timeout=30_000)
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
TOKEN = "browser-token-0123456789abcdef"

CONFIG = f"""
[[hooks]]
name = "person"
table = "person"
provides = ["name", "address"]

[[hooks]]
name = "myhook"
provides = ["message"]

[delivery]
allow_private_networks = true

[web]
token = "{TOKEN}"
"""


class WebProcess(RelayProcess):
    """`cdc-hooks run --web 127.0.0.1:PORT`: the relay and the web interface in one process."""

    def __init__(self, config: Config, log_path: Path) -> None:
        assert config.path is not None
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(config.path, log_path, run_args=("--web", f"127.0.0.1:{self.port}"))
        self.start()
        wait_until(lambda: ("relay connected" in self.log() and "web interface" in self.log())
                   or not self.running, message="relay and web up")
        assert self.running, self.log()

    def wait(self, predicate: Callable[[], Any], message: str) -> None:
        """wait_until, with this process's log in the failure."""
        try:
            wait_until(predicate, message=message)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- run --web log ---\n{self.log()}") from None


@pytest.fixture
def config(installed: Callable[..., Config]) -> Config:
    return installed(CONFIG, PERSON_TABLE)


@pytest.fixture
def web(config: Config, tmp_path: Path) -> Iterator[WebProcess]:
    process = WebProcess(config, tmp_path / "run-web.log")
    yield process
    process.cleanup()


@pytest.fixture
def page(web: WebProcess) -> Iterator[Any]:
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": 1100, "height": 720})
        finally:
            browser.close()


@pytest.fixture
def shot(page: Any, tmp_path: Path) -> Callable[..., None]:
    """shot(name, full_page=False): a screenshot of the page as it is now."""
    folder = SCREENSHOTS if os.environ.get("CDC_HOOKS_SCREENSHOTS") else tmp_path

    def take(name: str, full_page: bool = False) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(folder / f"{name}.png"), full_page=full_page)

    return take


API_KEY = "browser-key-5Tq8Pz"


def test_durians_flow_in_chromium(page, web, conn, receiver, shot):
    # Some history, so the filter's preview has events to judge.
    conn.execute("INSERT INTO person (name, address) VALUES ('Joe', 'NYC'), ('Ann', 'LA'), "
                 "('Jane', 'SF')")
    web.wait(lambda: conn.execute("SELECT count(*) FROM cdc_hooks.events").fetchone()[0] == 3,
             "events dispatched")

    # Log in once: every page asks for it.
    page.goto(web.url + "/hooks")
    expect(page).to_have_url(web.url + "/login?next=%2Fhooks")
    shot("login")
    page.get_by_label("Token").fill(TOKEN)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("heading", name="Select an event")).to_be_visible()
    shot("hooks")

    # Select the person event, fill the generated filter: name starts with "J".
    page.locator("tr", has_text="public.person").get_by_role("link", name="Create listener").click()
    expect(page.get_by_role("heading", name="Create a listener for person")).to_be_visible()
    assert page.locator("select[name^='cond:']").count() == 2  # one row per provided column
    page.get_by_label("URL").fill(receiver.url("/joe"))
    page.locator("select[name='cond:name']").select_option(label="starts with")
    page.get_by_label("value for name").fill("J")
    page.locator("textarea[name='headers']").fill(f"X-Api-Key: {API_KEY}")
    page.get_by_label("Rate limit").fill("50")
    expect(page.locator("#preview")).to_contain_text("2 of the last 3 events match")
    expect(page.locator("#preview tr.nomatch")).to_contain_text("Ann")
    shot("create-listener", full_page=True)
    page.get_by_role("button", name="Create listener").click()

    # The secret, shown once.
    expect(page.get_by_role("heading", name="Listener 1 created")).to_be_visible()
    secret = page.locator("#secret").inner_text()
    assert secret.startswith("whsec_")
    expect(page.locator("#headers")).to_contain_text(f"X-Api-Key: {API_KEY}")  # shown this once
    shot("listener-created")

    # Listed, without its secret.
    page.get_by_role("link", name="Listeners").first.click()
    row = page.locator("#listener-1")
    expect(row).to_contain_text(receiver.url("/joe"))
    expect(row).to_contain_text('{"name":{"$startswith":"J"}}')
    expect(row).to_contain_text("active")
    expect(row).to_contain_text("headers: X-Api-Key")
    expect(row).to_contain_text("rate: 50/s")
    assert secret not in page.content() and API_KEY not in page.content()

    # Matching and non-matching rows; the live log shows the matching ones arrive.
    page.get_by_role("link", name="Deliveries").first.click()
    expect(page.locator(".live")).to_be_visible()
    conn.execute("INSERT INTO person (name, address) VALUES ('Jim', 'Oslo'), ('Bob', 'Rome'), "
                 "('Jill', 'Lima')")
    conn.execute("UPDATE person SET address = 'Paris' WHERE name = 'Ann'")
    expect(page.locator("tr.delivery.delivered")).to_have_count(2)  # htmx refreshes: no reload
    received = receiver.wait_for(2, "/joe")
    assert sorted(r.json["data"]["name"] for r in received) == ["Jill", "Jim"]
    assert {r.headers["x-api-key"] for r in received} == {API_KEY}
    shot("deliveries")

    # A delivery's attempts and response, then redeliver it: same webhook-id again.
    page.locator("tr.delivery").first.get_by_role("link").first.click()
    expect(page.get_by_role("heading", name="Attempts")).to_be_visible()
    expect(page.locator("table.attempts")).to_contain_text("200")
    webhook_id = page.locator("dd code").first.inner_text()
    page.get_by_role("button", name="Redeliver").click()
    expect(page.locator(".flash")).to_contain_text("queued again")
    again = receiver.wait_for(3, "/joe")
    assert [r.webhook_id for r in again].count(webhook_id) == 2
    for _ in range(50):  # the relay records the attempt just after the receiver got it
        page.reload()
        if page.locator("table.attempts tbody tr").count() == 2:
            break
        page.wait_for_timeout(200)
    expect(page.locator("table.attempts tbody tr")).to_have_count(2)
    shot("delivery", full_page=True)

    # Listeners show the outcome; the overview its figures and chart.
    page.get_by_role("link", name="Listeners").first.click()
    expect(page.locator("#listener-1")).to_contain_text("100%")
    shot("listeners")
    page.get_by_role("link", name="Overview").click()
    expect(page.locator("svg.chart rect.ok").first).to_be_visible()
    shot("overview")

    # Rotate the secret with a 10-minute overlap: the new one shown once, and until when
    # the old one still signs.
    page.get_by_role("link", name="Listeners").first.click()
    page.locator("#listener-1").get_by_role("link", name="rotate secret").click()
    page.get_by_label("Overlap, in seconds").fill("600")
    page.get_by_role("button", name="Rotate secret").click()
    expect(page.get_by_role("heading", name="New secret for listener 1")).to_be_visible()
    rotated = page.locator("#secret").inner_text()
    assert rotated.startswith("whsec_") and rotated != secret
    expect(page.locator("#overlap")).to_contain_text("signed with both the new and the old secret")
    page.get_by_role("link", name="Listeners").first.click()
    expect(page.locator("#listener-1")).to_contain_text("old secret signs until")
    assert rotated not in page.content()

    assert web.terminate() == 0, web.log()
    assert "Traceback" not in web.log(), web.log()
