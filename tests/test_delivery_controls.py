"""Delivery controls of a listener (issue 15): its own headers, secret rotation with
an overlap, and `listeners update`. Real PostgreSQL, relay and loopback receivers.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import shared
import standardwebhooks
from fastapi.testclient import TestClient
from receivers import InProcessRelay, Reply, wait_until
from shared import PING_HOOK, bearer, web_section

from cdc_hooks.client import Client
from cdc_hooks.config import Config
from cdc_hooks.registry import Hook, Registry
from cdc_hooks.web import create_app

API_KEY = "key-4Rt9Wq2Lm7"  # a header value: a secret, never listed
TOKEN = "controls-test-token-0123456789"
AUTH = bearer(TOKEN)
CONFIG = PING_HOOK + web_section(TOKEN)


@pytest.fixture
def config(installed: Callable[..., Config]) -> Config:
    return installed(CONFIG)


def add(cli: Any, config: Config, url: str, *options: str) -> tuple[int, str]:
    result = cli(config, "listeners", "add", "ping", url, *options)
    assert result.exit_code == 0, result.output
    assert API_KEY not in result.output
    listener_id = int(re.search(r"listener (\d+) added", result.stdout).group(1))  # type: ignore[union-attr]
    return listener_id, re.search(r"secret: (whsec_\S+)", result.stdout).group(1)  # type: ignore[union-attr]


def send(cli: Any, config: Config, n: int) -> None:
    assert cli(config, "send", "ping", f"n:={n}").exit_code == 0


def stored(conn: Any, listener_id: int, column: str) -> Any:
    return conn.execute(f"SELECT {column} FROM cdc_hooks.listeners WHERE id = %s",
                        (listener_id,)).fetchone()[0]


def login(client: TestClient) -> None:
    response = shared.login(client, TOKEN, "/")
    assert response.status_code == 303, response.text


# Headers -------------------------------------------------------------------------


def test_headers_reach_the_receiver_and_their_values_nothing_else(conn, config, cli, receiver,
                                                                    caplog):
    receiver.set_default("/gone", Reply(410))
    listener, _ = add(cli, config, receiver.url("/gone"), "--header", f"X-Api-Key: {API_KEY}",
                      "--header", "X-Tenant:t1")
    assert cli(config, "listeners", "add", "cdc_hooks.listener_disabled",
               receiver.url("/ops")).exit_code == 0
    relay = InProcessRelay(config).start()
    try:
        send(cli, config, 1)
        [ops] = receiver.wait_for(1, "/ops")
    finally:
        relay.stop()
    [hit] = receiver.received("/gone")
    assert hit.headers["x-api-key"] == API_KEY and hit.headers["x-tenant"] == "t1"
    assert hit.headers["content-type"] == "application/json"
    assert ops.json["data"]["listener_id"] == listener and API_KEY not in ops.body.decode()

    listing = cli(config, "listeners", "list").output
    assert "X-Api-Key, X-Tenant" in listing
    seen = {"listeners list": listing, "status": cli(config, "status").output}
    with TestClient(create_app(config), base_url="https://testserver") as client:
        answer = client.get(f"/api/listeners/{listener}", headers=AUTH)
        assert answer.status_code == 200, answer.text
        assert answer.json()["header_names"] == ["X-Api-Key", "X-Tenant"]
        seen |= {path: client.get(path, headers=AUTH).text
                 for path in ("/api/listeners", "/api/status", "/api/deliveries")}
        login(client)
        for path in ("/", "/listeners", f"/listeners/{listener}/edit", "/deliveries"):
            page = client.get(path)
            assert page.status_code == 200, (path, page.text)
            seen[path] = page.text
        assert "X-Api-Key" in seen["/listeners"] and "X-Api-Key" in seen[f"/listeners/{listener}/edit"]
    assert [where for where, text in seen.items() if API_KEY in text] == []
    assert API_KEY not in caplog.text


def test_headers_are_shown_once_by_the_api_and_stored_by_python(conn, config):
    with TestClient(create_app(config), base_url="https://testserver") as client:
        created = client.post("/api/listeners", headers=AUTH, json={
            "hook": "ping", "url": "http://127.0.0.1:9/a", "headers": {"X-Api-Key": API_KEY}})
        assert created.status_code == 201, created.text
        assert created.json()["headers"] == {"X-Api-Key": API_KEY}
        assert created.headers["Cache-Control"] == "no-store"
        listed = client.get(f"/api/listeners/{created.json()['id']}", headers=AUTH).json()
        assert "headers" not in listed and listed["header_names"] == ["X-Api-Key"]
        replaced = client.patch(f"/api/listeners/{listed['id']}", headers=AUTH,
                                json={"headers": {"Authorization": "Bearer b"}})
        assert replaced.status_code == 200 and replaced.json()["header_names"] == ["Authorization"]
        assert API_KEY not in replaced.text
    registry = Registry()
    registry.configure(config)
    new = Hook("ping", registry=registry).listener(url="http://127.0.0.1:9/b",
                                                   headers={"X-Api-Key": API_KEY}).save()
    assert new.headers == {"X-Api-Key": API_KEY}
    assert stored(conn, new.id, "headers") == {"X-Api-Key": API_KEY}


REFUSED = [
    ("webhook-signature: x", 'header "webhook-signature": cdc-hooks sets it itself'),
    ("Content-Type: text/plain", 'header "Content-Type": cdc-hooks sets it itself'),
    ("content-length: 3", 'header "content-length": cdc-hooks sets it itself'),
    ("Host: example.com", 'header "Host": cdc-hooks sets it itself'),
    ("User-Agent: me", 'header "User-Agent": cdc-hooks sets it itself'),
    ("X Key: a", "header 'X Key': not a valid header name"),
    ("X-A: a\rb", 'header "X-A": the value must not contain control characters'),
    ("X-A: a\x00b", 'header "X-A": the value must not contain control characters'),
]


@pytest.mark.parametrize(("line", "message"), REFUSED)
def test_a_bad_header_is_refused_by_name_and_nothing_is_stored(conn, config, cli, line, message):
    result = cli(config, "listeners", "add", "ping", "http://127.0.0.1:9/x", "--header", line)
    assert result.exit_code == 2 and f"error: {message}" in result.stderr, result.output
    name, _, value = line.partition(":")
    with TestClient(create_app(config), base_url="https://testserver") as client:
        answer = client.post("/api/listeners", headers=AUTH, json={
            "hook": "ping", "url": "http://127.0.0.1:9/x", "headers": {name: value.strip()}})
        assert answer.status_code == 422, answer.text
        if "\x00" not in value:  # NUL is refused earlier, as in any text field
            assert message in answer.json()["detail"]
    assert conn.execute("SELECT count(*) FROM cdc_hooks.listeners").fetchone()[0] == 0


def test_a_header_line_without_a_colon_or_given_twice_is_refused(conn, config, cli):
    for options, message in ((["--header", "X-Api-Key"], 'write it as "Name: value"'),
                             (["--header", "X-A: 1", "--header", "x-a: 2"],
                              'header "x-a": given twice')):
        result = cli(config, "listeners", "add", "ping", "http://127.0.0.1:9/x", *options)
        assert result.exit_code == 2 and message in result.stderr, result.output
    assert conn.execute("SELECT count(*) FROM cdc_hooks.listeners").fetchone()[0] == 0


# Secret rotation with overlap ----------------------------------------------------


def signatures(request: Any) -> list[str]:
    return request.headers["webhook-signature"].split(" ")


def verifies(secret: str, request: Any) -> bool:
    try:
        standardwebhooks.Webhook(secret).verify(request.body, request.headers)
    except standardwebhooks.webhooks.WebhookVerificationError:
        return False
    return True


def test_during_the_overlap_both_secrets_verify_and_after_it_only_the_new_one(
        conn, config, cli, receiver):
    listener, old = add(cli, config, receiver.url("/r"))
    rotated = cli(config, "listeners", "rotate", str(listener), "--overlap", "1")
    assert rotated.exit_code == 0, rotated.output
    new = re.search(r"secret: (whsec_\S+)", rotated.stdout).group(1)  # type: ignore[union-attr]
    assert new != old and "signed with the old secret too" in rotated.stdout
    assert "old secret signs until" in cli(config, "listeners", "list").output
    relay = InProcessRelay(config).start()
    try:
        send(cli, config, 1)
        [during] = receiver.wait_for(1, "/r")
        # Past the overlap by the database's clock, and by a margin the relay's.
        wait_until(lambda: conn.execute("SELECT previous_secret_until < now() - interval '1 s' "
                                        "FROM cdc_hooks.listeners").fetchone()[0],
                   message="the overlap to pass")
        send(cli, config, 2)
        after = receiver.wait_for(2, "/r")[1]
    finally:
        relay.stop()
    assert len(signatures(during)) == 2 and verifies(old, during) and verifies(new, during)
    assert len(signatures(after)) == 1 and verifies(new, after) and not verifies(old, after)
    assert "old secret signs until" not in cli(config, "listeners", "list").output


def test_rotation_through_the_api_the_client_and_the_page(conn, config, cli):
    listener, old = add(cli, config, "http://127.0.0.1:9/r")
    with TestClient(create_app(config), base_url="https://testserver") as client:
        answer = client.patch(f"/api/listeners/{listener}", headers=AUTH,
                              json={"rotate_secret": True, "overlap_seconds": 600})
        assert answer.status_code == 200, answer.text
        assert answer.json()["secret"].startswith("whsec_")
        assert answer.json()["secret_overlap_until"] is not None
        assert stored(conn, listener, "previous_secret") == old
        api = Client("https://testserver", token=TOKEN, transport=client._transport)
        rotated = api.rotate(listener, overlap=0)
        assert rotated.secret_overlap_until is None and rotated.secret != answer.json()["secret"]
        assert stored(conn, listener, "previous_secret") is None
        assert api.rotate(listener).secret_overlap_until is not None  # 24 h by default
        for body, field in (({"rotate_secret": True, "overlap_seconds": -1}, "overlap_seconds"),
                            ({"rotate_secret": True, "overlap_seconds": 10**9}, "overlap_seconds"),
                            ({"overlap_seconds": 5}, "overlap_seconds")):
            refused = client.patch(f"/api/listeners/{listener}", headers=AUTH, json=body)
            assert refused.status_code == 422 and field in refused.json()["detail"], refused.text
        login(client)
        page = client.get(f"/listeners/{listener}/rotate")
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
        assert 'name="overlap" value="86400"' in page.text
        shown = client.post(f"/listeners/{listener}/rotate", data={"csrf": csrf, "overlap": "60"})
        assert shown.status_code == 200 and 'id="overlap"' in shown.text, shown.text
        refused = client.post(f"/listeners/{listener}/rotate", data={"csrf": csrf, "overlap": "-5"})
        assert refused.status_code == 422 and "overlap must be between" in refused.text


def test_a_bad_overlap_is_refused_by_the_cli(conn, config, cli):
    listener, _ = add(cli, config, "http://127.0.0.1:9/r")
    before = stored(conn, listener, "secret")
    for value in ("-1", "nan", "1e9"):
        result = cli(config, "listeners", "rotate", str(listener), "--overlap", value)
        assert result.exit_code == 2 and "error: overlap must be between 0 and" in result.stderr, \
            result.output
    assert stored(conn, listener, "secret") == before


# listeners update ------------------------------------------------------------------


def test_listeners_update_changes_url_match_headers_and_backfill(conn, config, cli, receiver):
    listener, _ = add(cli, config, receiver.url("/old"), "--match", "n:=1", "--header", "X-A: 1")
    updated = cli(config, "listeners", "update", str(listener), "--url", receiver.url("/new"),
                  "--match", "n:=2", "--header", f"X-B: {API_KEY}", "--no-backfill")
    assert updated.exit_code == 0 and f"listener {listener} updated" in updated.stdout, updated.output
    assert API_KEY not in updated.output
    relay = InProcessRelay(config).start()
    try:
        send(cli, config, 1)
        send(cli, config, 2)
        [hit] = receiver.wait_for(1, "/new")
    finally:
        relay.stop()
    assert hit.json["data"] == {"n": 2} and receiver.received() == [hit]
    assert hit.headers["x-b"] == API_KEY and "x-a" not in hit.headers
    assert stored(conn, listener, "config") == {"backfill": False}

    cleared = cli(config, "listeners", "update", str(listener), "--no-headers", "--no-match",
                  "--backfill")
    assert cleared.exit_code == 0, cleared.output
    assert stored(conn, listener, "headers") == {} and stored(conn, listener, "match") == {}
    assert stored(conn, listener, "config") == {"backfill": True}
    assert stored(conn, listener, "url") == receiver.url("/new")  # not given: kept


@pytest.mark.parametrize(("options", "message"), [
    ([], "nothing to change"),
    (["--header", "X-A: 1", "--no-headers"], "give --header or --no-headers, not both"),
    (["--match", "n:=1", "--no-match"], "give --match or --no-match, not both"),
    (["--match", "nope=1"], 'match field "nope": hook "ping" does not provide it'),
    (["--url", "ftp://127.0.0.1/x"], "http"),
    (["--header", "Host: x", "--url", "http://127.0.0.1:9/other"],
     'header "Host": cdc-hooks sets it itself'),
])
def test_listeners_update_refuses_bad_input_and_changes_nothing(conn, config, cli, options, message):
    listener, _ = add(cli, config, "http://127.0.0.1:9/r", "--header", "X-A: 1")
    before = conn.execute("SELECT * FROM cdc_hooks.listeners").fetchall()
    result = cli(config, "listeners", "update", str(listener), *options)
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert result.stderr.startswith("error: ")
    assert conn.execute("SELECT * FROM cdc_hooks.listeners").fetchall() == before


def test_listeners_update_of_an_unknown_listener_says_so(config, cli):
    result = cli(config, "listeners", "update", "99", "--url", "http://127.0.0.1:9/r")
    assert result.exit_code != 0 and "no listener with id 99" in result.stderr, result.output
