"""Per-listener delivery controls (issue 15): event kinds (events), the
changed-column filter (changed) and TRUNCATE, end to end against real
PostgreSQL, the real relay and loopback receivers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from receivers import InProcessRelay, Reply, wait_until
from shared import PERSON_HOOKS, csrf_of
from test_relay import DELIVERY, TABLE, add_listener, wait_settled
from test_web_api import AUTH, WEB, login

from cdc_hooks import install as installer
from cdc_hooks.config import Config
from cdc_hooks.registry import Registry
from cdc_hooks.web import create_app


@pytest.fixture
def config(installed: Callable[..., Config]) -> Config:
    return installed(PERSON_HOOKS + DELIVERY + WEB, TABLE)


@pytest.fixture
def relay(config: Config) -> Iterator[InProcessRelay]:
    running = InProcessRelay(config).start()
    yield running
    running.stop()


@pytest.fixture
def client(config: Config) -> Iterator[TestClient]:
    with TestClient(create_app(config), base_url="https://testserver") as test_client:
        yield test_client


def kinds(received: list[Any]) -> list[tuple[str, str | None]]:
    return [(r.json["event"], r.json["data"]["name"] if r.json["data"] else None)
            for r in received]


def listener_count(conn: psycopg.Connection[Any]) -> int:
    return conn.execute("SELECT count(*) FROM cdc_hooks.listeners").fetchone()[0]


# Event kinds -----------------------------------------------------------------


def test_only_the_chosen_event_kinds_arrive(conn, config, cli, receiver, relay, client):
    add_listener(cli, config, "person", receiver.url("/deletes"), "--events", "delete")
    add_listener(cli, config, "person", receiver.url("/writes"), "--events", "insert,update")
    add_listener(cli, config, "person", receiver.url("/repeated"), "--events", "insert",
                 "--events", "delete")
    add_listener(cli, config, "person", receiver.url("/all"))
    answer = client.post("/api/listeners", headers=AUTH, json={
        "hook": "person", "url": receiver.url("/api"), "events": ["update"]})
    assert answer.status_code == 201 and answer.json()["events"] == ["update"], answer.text
    registry = Registry()
    registry.load(config)
    registry.get("person").listener(url=receiver.url("/python"), events=["delete"]).save()
    conn.execute("INSERT INTO person (id, name) VALUES (1, 'Joe')")
    conn.execute("UPDATE person SET name = 'Jim' WHERE id = 1")
    conn.execute("DELETE FROM person WHERE id = 1")
    receiver.wait_for(1 + 2 + 2 + 3 + 1 + 1)
    wait_settled(conn)
    assert kinds(receiver.received("/deletes")) == [("delete", "Jim")]
    assert kinds(receiver.received("/writes")) == [("insert", "Joe"), ("update", "Jim")]
    assert kinds(receiver.received("/repeated")) == [("insert", "Joe"), ("delete", "Jim")]
    assert kinds(receiver.received("/api")) == [("update", "Jim")]
    assert kinds(receiver.received("/python")) == [("delete", "Jim")]
    assert len(receiver.received("/all")) == 3


@pytest.mark.parametrize(("options", "needle"), [
    (["--events", "truncate"], 'events: hook "person" does not capture "truncate"'),
    (["--events", "insert,upsert"], '"upsert"'),
    (["--changed", "secret"], 'changed: hook "person" does not provide a column "secret"'),
])
def test_bad_events_or_changed_are_refused_by_the_cli(conn, config, cli, options, needle):
    result = cli(config, "listeners", "add", "person", "http://127.0.0.1:9/", *options)
    assert result.exit_code == 2, result.output
    assert needle in result.output and result.output.count("error:") == 1
    assert listener_count(conn) == 0


@pytest.mark.parametrize(("body", "needle"), [
    ({"events": ["truncate"]}, 'events: hook "person" does not capture "truncate"'),
    ({"events": "delete"}, "body.events"),
    ({"changed": ["nope"]}, 'changed: hook "person" does not provide a column "nope"'),
    ({"hook": "myhook", "events": ["insert"]}, 'events: hook "myhook" does not capture "insert"'),
])
def test_bad_events_or_changed_are_422_naming_the_field(conn, client, body, needle):
    response = client.post("/api/listeners", headers=AUTH,
                           json={"hook": "person", "url": "http://127.0.0.1:9/", **body})
    assert response.status_code == 422, response.text
    assert needle in response.json()["detail"]
    assert listener_count(conn) == 0


def test_patch_replaces_and_resets_the_filters(client):
    created = client.post("/api/listeners", headers=AUTH, json={
        "hook": "person", "url": "http://127.0.0.1:9/", "events": ["delete"]}).json()
    path = f"/api/listeners/{created['id']}"
    changed = client.patch(path, headers=AUTH, json={"events": ["insert"], "changed": ["name"]})
    assert (changed.json()["events"], changed.json()["changed"]) == (["insert"], ["name"])
    refused = client.patch(path, headers=AUTH, json={"changed": ["secret"]})
    assert refused.status_code == 422 and '"secret"' in refused.json()["detail"]
    reset = client.patch(path, headers=AUTH, json={"events": [], "changed": []}).json()
    assert (reset["events"], reset["changed"]) == (None, None)


# Changed columns -------------------------------------------------------------


def test_only_updates_that_changed_a_chosen_column_arrive(conn, config, cli, receiver, relay):
    add_listener(cli, config, "person", receiver.url("/address"), "--changed", "address")
    add_listener(cli, config, "person", receiver.url("/either"), "--changed", "address,profile",
                 "--events", "update")
    add_listener(cli, config, "person", receiver.url("/all"))
    conn.execute("INSERT INTO person (id, name) VALUES (1, 'Joe')")
    conn.execute("UPDATE person SET name = 'Jim' WHERE id = 1")
    conn.execute("UPDATE person SET address = 'Main St' WHERE id = 1")
    conn.execute("UPDATE person SET profile = '{}' WHERE id = 1")
    conn.execute("UPDATE person SET name = 'Jo', address = 'Elm St' WHERE id = 1")
    conn.execute("UPDATE person SET name = 'Al', id = 2 WHERE id = 1")  # the key changed
    conn.execute("DELETE FROM person")
    receiver.wait_for(4 + 3 + 7)
    wait_settled(conn)
    # the key change makes another row: ordered by event, not by arrival
    got = sorted(receiver.received("/address"), key=lambda r: int(r.json["id"][4:]))
    assert [(r.json["event"], r.json["data"]["name"]) for r in got] == [
        ("insert", "Joe"), ("update", "Jim"), ("update", "Jo"), ("delete", "Al")]
    assert [r.json["changes"] for r in receiver.received("/either")] == [
        {"address": None}, {"profile": None}, {"address": "Main St", "name": "Jim"}]
    assert len(receiver.received("/all")) == 7


def test_the_preview_honours_events_and_changed(conn, config, client, relay, receiver, cli):
    add_listener(cli, config, "person", receiver.url("/all"))
    conn.execute("INSERT INTO person (id, name) VALUES (1, 'Joe')")
    conn.execute("UPDATE person SET name = 'Jim' WHERE id = 1")
    conn.execute("UPDATE person SET address = 'x' WHERE id = 1")
    conn.execute("DELETE FROM person")
    receiver.wait_for(4)
    wait_settled(conn)
    login(client)
    form = client.get("/hooks/person/listen")
    assert 'name="events"' in form.text and 'name="changed"' in form.text
    page = client.get("/hooks/person/preview",
                      params={"events": "update,delete", "changed": "address"})
    assert page.status_code == 200, page.text
    assert "<strong>2</strong> of the last 4 events" in page.text
    refused = client.get("/hooks/person/preview", params={"changed": "secret"})
    assert 'changed: hook &#34;person&#34; does not provide' in refused.text
    created = client.post("/hooks/person/listen", data={
        "csrf": csrf_of(client), "url": "http://127.0.0.1:9/form", "events": "delete",
        "changed": "address, name"})
    assert created.status_code == 200, created.text
    assert conn.execute("SELECT events, changed FROM cdc_hooks.listeners WHERE url LIKE %s",
                        ("%/form",)).fetchone() == (["delete"], ["address", "name"])


# TRUNCATE ----------------------------------------------------------------------

TRUNCATING = """
[[hooks]]
name = "person"
table = "person"
events = ["insert", "update", "delete", "truncate"]
provides = ["name", "address", "profile"]

[delivery]
allow_private_networks = true
retry_schedule = [0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2]
timeout = 2
"""


@pytest.fixture
def truncating(conn: psycopg.Connection[Any], make_config: Callable[..., Config]) -> Config:
    conn.execute(TABLE)
    config = make_config(TRUNCATING)
    installer.install(config)
    return config


def pending(conn: psycopg.Connection[Any], listener_id: int) -> int:
    return conn.execute("SELECT count(*) FROM cdc_hooks.deliveries WHERE listener_id = %s"
                        " AND status = 'pending'", (listener_id,)).fetchone()[0]


def test_a_truncate_arrives_after_the_pending_deliveries_and_before_later_ones(
        conn, truncating, cli, receiver):
    """Rows 1-5 fail at first (pending, retried) when the TRUNCATE happens; row 6 is
    inserted after it. Nothing of before the TRUNCATE arrives after it, nothing of
    after it before it; a listener whose match no row meets still gets it."""
    failing = {"on": True}
    receiver.set_default("/slow", lambda headers, body: Reply(500 if failing["on"] else 200))
    slow, _ = add_listener(cli, truncating, "person", receiver.url("/slow"))
    add_listener(cli, truncating, "person", receiver.url("/nobody"), "--match", "name=nobody")
    add_listener(cli, truncating, "person", receiver.url("/inserts"), "--events", "insert")
    running = InProcessRelay(truncating).start()
    try:
        sent_in_order(conn, slow, receiver, failing)
    finally:
        running.stop()


def sent_in_order(conn: psycopg.Connection[Any], slow: int, receiver: Any,
                  failing: dict[str, bool]) -> None:
    conn.execute("INSERT INTO person (id, name) SELECT i, 'p' || i FROM generate_series(1, 3) i")
    conn.execute("INSERT INTO person (id, name) VALUES (4, 'p4')")
    conn.execute("INSERT INTO person (id, name) VALUES (5, 'p5')")
    receiver.wait_for(5, "/slow")  # each tried at least once, and failed
    conn.execute("TRUNCATE person")
    conn.execute("INSERT INTO person (id, name) VALUES (6, 'p6')")
    conn.execute("INSERT INTO person (id, name) VALUES (1, 'again')")  # a row of before
    receiver.wait_for(1, "/nobody")
    wait_until(lambda: pending(conn, slow) == 8, 30, message="all 8 recorded for /slow")
    failing["on"] = False
    receiver.wait_for(5 + 2, "/inserts")
    wait_settled(conn, timeout=60)
    arrived = [(r.json["event"], r.json["key"]) for r in receiver.received("/slow")
               if r.status == 200]
    cut = arrived.index(("truncate", None))
    assert sorted(k["id"] for _, k in arrived[:cut]) == [1, 2, 3, 4, 5]
    assert sorted(k["id"] for _, k in arrived[cut + 1:]) == [1, 6]
    truncate = next(r.json for r in receiver.received("/nobody"))
    assert (truncate["event"], truncate["key"], truncate["data"]) == ("truncate", None, None)
    assert len(receiver.received("/nobody")) == 1
    assert all(r.json["event"] == "insert" for r in receiver.received("/inserts"))


def test_truncate_is_refused_for_a_hook_that_does_not_capture_it(conn, config, cli):
    result = cli(config, "listeners", "add", "person", "http://127.0.0.1:9/", "--events",
                 "insert,truncate")
    assert result.exit_code == 2 and '"truncate"' in result.output
    conn.execute("TRUNCATE person")
    assert conn.execute("SELECT count(*) FROM cdc_hooks.outbox").fetchone() == (0,)


def test_listeners_update_replaces_and_resets_the_filters(conn, config, cli, receiver):
    listener, _ = add_listener(cli, config, "person", receiver.url("/x"))
    assert cli(config, "listeners", "update", str(listener), "--events", "delete",
               "--changed", "name,address").exit_code == 0
    filters = "SELECT events, changed FROM cdc_hooks.listeners WHERE id = %s"
    assert conn.execute(filters, (listener,)).fetchone() == (["delete"], ["name", "address"])
    assert cli(config, "listeners", "update", str(listener), "--all-events").exit_code == 0
    assert conn.execute(filters, (listener,)).fetchone() == (None, ["name", "address"])
    for bad, message in ((["--events", "truncate"], 'does not capture "truncate"'),
                         (["--changed", "secret"], 'does not provide a column "secret"'),
                         (["--events", "delete", "--all-events"], "not both")):
        refused = cli(config, "listeners", "update", str(listener), *bad)
        assert refused.exit_code == 2 and message in refused.stderr, refused.output
    assert conn.execute(filters, (listener,)).fetchone() == (None, ["name", "address"])
