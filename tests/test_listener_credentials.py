"""Credentials in a listener URL (issue 12): sent as Basic auth, never passed on.

``http://alice:pw@host/`` authenticates its deliveries; everywhere else the
URL is shown as ``http://alice:***@host/``: the cdc_hooks.listener_disabled
event other receivers get, `listeners list`, `status`, the REST API, the web
pages, attempt errors and logs. Real PostgreSQL, relay and receivers.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from typing import Any

import pytest
import shared
from fastapi.testclient import TestClient
from receivers import InProcessRelay, Reply, wait_until
from shared import PING_HOOK, bearer, web_section

from cdc_hooks import health
from cdc_hooks.config import Config
from cdc_hooks.db import Database
from cdc_hooks.urls import redact_url
from cdc_hooks.web import create_app

PASSWORD = "pw-7Hq2Zx9"
TOKEN = "credentials-test-token-0123456789"
AUTH = bearer(TOKEN)
CONFIG = PING_HOOK + web_section(TOKEN)


@pytest.fixture
def config(installed: Callable[..., Config]) -> Config:
    return installed(CONFIG)


def add(cli: Any, config: Config, hook: str, url: str) -> int:
    result = cli(config, "listeners", "add", hook, url)
    assert result.exit_code == 0, result.output
    assert PASSWORD not in result.output
    return int(re.search(r"listener (\d+) added", result.stdout).group(1))  # type: ignore[union-attr]


def stored_url(conn: Any, listener_id: int) -> str:
    return conn.execute("SELECT url FROM cdc_hooks.listeners WHERE id = %s",
                        (listener_id,)).fetchone()[0]


def login(client: TestClient) -> None:
    response = shared.login(client, TOKEN, "/")
    assert response.status_code == 303, response.text


def test_redact_url_masks_the_password_or_a_lone_user_name():
    assert redact_url("http://alice:pw@host/x") == "http://alice:***@host/x"
    assert redact_url("https://token@host:8443/") == "https://***@host:8443/"  # often a key
    assert redact_url("http://:pw@host/") == "http://:***@host/"
    assert redact_url("http://alice:p@ss@host/?a=b@c") == "http://alice:***@host/?a=b@c"
    assert redact_url("http://host/users/@me") == "http://host/users/@me"
    assert redact_url("invalid URL: http://a:b@127.1:9/x, was http://c:d@e/") == \
        "invalid URL: http://a:***@127.1:9/x, was http://c:***@e/"


def test_a_disabled_listener_s_credentials_reach_no_other_receiver_nor_any_listing(
        conn, config, cli, receiver, caplog):
    receiver.set_default("/gone", Reply(410))
    secured = receiver.url("/gone").replace("http://", f"http://alice:{PASSWORD}@")
    shown = receiver.url("/gone").replace("http://", "http://alice:***@")
    gone = add(cli, config, "ping", secured)
    add(cli, config, "cdc_hooks.listener_disabled", receiver.url("/ops"))
    # Stored anyway (SQL, an older version): a URL aiohttp refuses, quoting it in its error.
    unusable = conn.execute(
        "INSERT INTO cdc_hooks.listeners (hook, url, secret) VALUES ('ping', %s, %s) RETURNING id",
        (f"ftp://alice:{PASSWORD}@127.0.0.1:9/x", "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
    ).fetchone()[0]
    relay = InProcessRelay(config).start()
    try:
        assert cli(config, "send", "ping", "n:=1").exit_code == 0
        [ops] = receiver.wait_for(1, "/ops")
        wait_until(lambda: conn.execute(
            "SELECT last_error IS NOT NULL FROM cdc_hooks.deliveries WHERE listener_id = %s",
            (unusable,)).fetchone() == (True,), message="the unusable listener's attempt")
    finally:
        relay.stop()
    # The receiver still authenticates the delivery...
    [hit] = receiver.received("/gone")
    assert hit.headers["authorization"] == \
        "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    assert stored_url(conn, gone) == secured
    # ... and the event to the other listener carries the URL as shown.
    assert ops.json["data"] == {"listener_id": gone, "hook": "ping", "url": shown,
                                "reason": "receiver answered 410 Gone"}
    assert PASSWORD not in ops.body.decode()

    seen = {"listeners list": cli(config, "listeners", "list").output,
            "status": cli(config, "status").output}
    assert shown in seen["listeners list"] and shown in seen["status"]
    error = conn.execute("SELECT last_error FROM cdc_hooks.deliveries WHERE listener_id = %s",
                         (unusable,)).fetchone()[0]
    assert "ftp://alice:***@127.0.0.1:9/x" in error, error
    delivery = conn.execute("SELECT id FROM cdc_hooks.deliveries WHERE listener_id = %s",
                            (gone,)).fetchone()[0]
    with TestClient(create_app(config), base_url="https://testserver") as client:
        api = {path: client.get(path, headers=AUTH) for path in (
            "/api/listeners", f"/api/listeners/{gone}", "/api/status", "/api/deliveries",
            f"/api/deliveries/{delivery}")}
        assert all(answer.status_code == 200 for answer in api.values())
        assert api[f"/api/listeners/{gone}"].json()["url"] == shown
        assert api[f"/api/deliveries/{delivery}"].json()["url"] == shown
        assert [f["url"] for f in api["/api/status"].json()["failing_listeners"]
                if f["id"] == gone] == [shown]
        seen |= {path: answer.text for path, answer in api.items()}
        login(client)
        for path in ("/", "/listeners", "/deliveries", f"/deliveries/{delivery}",
                     f"/listeners/{gone}/edit", f"/listeners/{gone}/delete"):
            page = client.get(path)
            assert page.status_code == 200, (path, page.text)
            seen[path] = page.text
        assert "alice:***@" in seen["/listeners"] and "alice:***@" in seen[f"/listeners/{gone}/edit"]
    leaks = [where for where, text in seen.items() if PASSWORD in text]
    assert leaks == []
    assert PASSWORD not in caplog.text


def test_sending_the_url_back_as_shown_keeps_the_credentials(conn, config, cli):
    """An edit form, or a client that PATCHes the listed URL back, changes nothing."""
    secured = f"http://alice:{PASSWORD}@127.0.0.1:9/hook"
    listener = add(cli, config, "ping", secured)
    with TestClient(create_app(config), base_url="https://testserver") as client:
        listed = client.get(f"/api/listeners/{listener}", headers=AUTH).json()["url"]
        assert listed == "http://alice:***@127.0.0.1:9/hook"
        patched = client.patch(f"/api/listeners/{listener}", headers=AUTH, json={"url": listed})
        assert patched.status_code == 200 and patched.json()["url"] == listed
        assert stored_url(conn, listener) == secured
        login(client)
        edit = client.get(f"/listeners/{listener}/edit").text
        csrf = re.search(r'name="csrf" value="([^"]+)"', edit).group(1)  # type: ignore[union-attr]
        url = re.search(r'name="url" value="([^"]+)"', edit).group(1)  # type: ignore[union-attr]
        assert url == listed
        saved = client.post(f"/listeners/{listener}/edit", data={"csrf": csrf, "url": url})
        assert saved.status_code == 200 and "saved" in saved.text, saved.text
        assert stored_url(conn, listener) == secured
        # A new password is a new URL.
        changed = client.patch(f"/api/listeners/{listener}", headers=AUTH,
                               json={"url": "http://alice:other-pw@127.0.0.1:9/hook"})
        assert changed.status_code == 200
    assert stored_url(conn, listener) == "http://alice:other-pw@127.0.0.1:9/hook"


def test_failing_for_days_sends_the_url_as_shown(conn, config, cli):
    listener = add(cli, config, "ping", f"http://alice:{PASSWORD}@127.0.0.1:9/bad")
    add(cli, config, "cdc_hooks.listener_disabled", "http://127.0.0.1:9/ops")
    conn.execute("INSERT INTO cdc_hooks.events (id, hook, kind, body, occurred_at) "
                 "VALUES (1000, 'ping', 'ping', '{\"n\": 1}', now())")
    conn.execute("INSERT INTO cdc_hooks.deliveries (event_id, listener_id, status, attempts, "
                 "next_attempt_at) VALUES (1000, %s, 'pending', 2, now() + interval '1 hour')",
                 (listener,))
    with Database.connect(config.dsn) as db:
        assert health.check(db, 5) == []  # the streak starts now
        conn.execute("UPDATE cdc_hooks.listeners SET updated_at = now() - interval '6 days'")
        conn.execute("UPDATE cdc_hooks.listener_health SET failing_since = now() - interval '6 days'")
        [disabled] = health.check(db, 5)
    assert disabled.url == "http://alice:***@127.0.0.1:9/bad" and disabled.event_id is not None
    [payload] = [json.loads(r[0])["data"] for r in conn.execute(
        "SELECT payload::text FROM cdc_hooks.outbox WHERE kind = 'cdc_hooks.listener_disabled'")]
    assert payload["url"] == "http://alice:***@127.0.0.1:9/bad"


def test_a_refused_url_is_quoted_without_its_password(config, cli):
    for url in (f"ftp://alice:{PASSWORD}@example.com/", f"http://alice:{PASSWORD}@127.0.0.1:99999/"):
        result = cli(config, "listeners", "add", "ping", url)
        assert result.exit_code == 2 and "alice:***@" in result.stderr, result.output
        assert PASSWORD not in result.output
