"""Upgrades (issue 7): `cdc-hooks install` brings a database installed at
schema version 1, the first released one, to the current version in place,
keeping undelivered changes, listeners and pending deliveries, which a relay
then delivers. Real PostgreSQL, relay and receiver."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from click.testing import Result
from receivers import InProcessRelay, wait_until

from cdc_hooks import db as database
from cdc_hooks import install as installer
from cdc_hooks import services
from cdc_hooks.db import Database, migrations, query
from cdc_hooks.relay.events import expand
from cdc_hooks.signing import generate_secret

Conn = psycopg.Connection[Any]
Cli = Callable[..., Result]

VERSION_1 = Path(__file__).parent / "data" / "install_version_1.sql"
CONFIG = """
[[hooks]]
name = "person"
table = "person"
provides = ["name"]

[[hooks]]
name = "myhook"
provides = ["message"]

[delivery]
allow_private_networks = true
"""


def install_version_1(conn: Conn) -> None:
    """The schema as the first release left it: its install script, frozen (capture
    functions of that time included), with no built-in hooks, which came later."""
    conn.execute(VERSION_1.read_text(encoding="utf-8"))  # type: ignore[arg-type]
    conn.execute("DELETE FROM cdc_hooks.hooks WHERE name = 'cdc_hooks.listener_disabled'")
    assert conn.execute("SELECT max(version) FROM cdc_hooks.schema_version").fetchone() == (1,)


def dispatch_like_version_1(conn: Conn) -> None:
    """What the first release's relay made of the outbox: events, and a pending delivery
    per listener of the hook (in that release's columns). Today's relay refuses to run on
    an older schema."""
    hooks = {h.name: h for h in Database(conn).installed_hooks()}
    with conn.transaction():
        for outbox_id, hook, kind, payload, occurred_at, _ in conn.execute(
                query("take_outbox"), {"limit": 100}).fetchall():
            for event in expand(outbox_id, hooks.get(hook), kind, payload, occurred_at):
                conn.execute("INSERT INTO cdc_hooks.events (id, hook, kind, row_key, body,"
                             " occurred_at) VALUES (%s, %s, %s, %s, %s, %s)",
                             (event.id, event.hook, event.kind, event.row_key, event.body,
                              event.occurred_at))
                conn.execute("INSERT INTO cdc_hooks.deliveries (event_id, listener_id, row_key)"
                             " SELECT %s, id, %s FROM cdc_hooks.listeners WHERE hook = %s",
                             (event.id, event.row_key, event.hook))


def add_listener_like_version_1(conn: Conn, hook: str, url: str) -> int:
    row = conn.execute("INSERT INTO cdc_hooks.listeners (hook, url, secret) VALUES (%s, %s, %s)"
                       " RETURNING id", (hook, url, generate_secret())).fetchone()
    assert row is not None
    return int(row[0])


def counts(conn: Conn) -> tuple[int, int, int]:
    row = conn.execute("SELECT (SELECT count(*) FROM cdc_hooks.outbox),"
                       " (SELECT count(*) FROM cdc_hooks.deliveries WHERE status = 'pending'),"
                       " (SELECT count(*) FROM cdc_hooks.listeners)").fetchone()
    assert row is not None
    return row[0], row[1], row[2]


def test_upgrade_from_version_1_keeps_and_then_delivers_everything(
        conn, make_config, cli, receiver):
    conn.execute("CREATE TABLE person (id serial PRIMARY KEY, name text)")
    config = make_config(CONFIG + "\n[retention]\ninterval = 0\n")
    install_version_1(conn)

    # Listeners as that release added them (today's CLI writes today's columns).
    person = add_listener_like_version_1(conn, "person", receiver.url("/person"))
    add_listener_like_version_1(conn, "myhook", receiver.url("/custom"))
    assert cli(config, "listeners", "pause", str(person)).exit_code == 0
    # Dispatched while paused: pending deliveries, held.
    conn.execute("INSERT INTO person (name) VALUES ('Ann'), ('Bob')")
    dispatch_like_version_1(conn)
    assert counts(conn)[:2] == (0, 2)
    # Captured but not dispatched yet.
    conn.execute("INSERT INTO person (name) VALUES ('Cy')")
    conn.execute("UPDATE person SET name = 'Bo' WHERE name = 'Bob'")
    assert cli(config, "send", "myhook", "message=hi").exit_code == 0
    before = counts(conn)
    assert before == (3, 2, 2)

    result = cli(config, "install")
    assert result.exit_code == 0, result.output
    latest = migrations()[-1][0]
    assert result.stdout.splitlines()[0] == f"schema cdc_hooks: upgrade from version 1 to version {latest}"
    assert conn.execute("SELECT array_agg(version ORDER BY version) FROM cdc_hooks.schema_version"
                        ).fetchone() == ([version for version, _ in migrations()],)
    assert counts(conn) == before
    assert cli(config, "check").exit_code == 0
    # Version 1's capture functions ran as the installer; the upgrade replaced them.
    assert conn.execute("SELECT proname, prosecdef FROM pg_proc WHERE proname LIKE 'capture%%'"
                        ).fetchall() == [("capture_person", False)]
    assert conn.execute("SELECT count(*) FROM cdc_hooks.hooks WHERE name = "
                        "'cdc_hooks.listener_disabled'").fetchone() == (1,)
    assert conn.execute("SELECT state FROM cdc_hooks.listeners WHERE id = %s",
                        (person,)).fetchone() == ("paused",)

    assert cli(config, "listeners", "resume", str(person)).exit_code == 0
    relay = InProcessRelay(config).start()
    try:
        receiver.wait_for(4, "/person")
        receiver.wait_for(1, "/custom")
    finally:
        relay.stop()
    bodies = receiver.bodies("/person")
    received = [(b["event"], b["data"]["name"]) for b in bodies]
    # Rows may interleave (the relay sends several at once); a row's changes keep their order.
    assert sorted(received) == [("insert", "Ann"), ("insert", "Bob"), ("insert", "Cy"),
                                ("update", "Bo")]
    assert received.index(("insert", "Bob")) < received.index(("update", "Bo"))
    assert receiver.bodies("/custom")[0]["data"] == {"message": "hi"}
    assert counts(conn)[:2] == (0, 0)


def test_install_on_an_upgraded_database_has_nothing_left_to_do(conn, make_config, cli):
    conn.execute("CREATE TABLE person (id serial PRIMARY KEY, name text)")
    config = make_config(CONFIG)
    install_version_1(conn)
    behind = cli(config, "check")
    assert behind.exit_code == 1
    assert "schema cdc_hooks is at version 1" in behind.stdout
    assert 'hook "cdc_hooks.listener_disabled": not installed' in behind.stdout
    assert cli(config, "install").exit_code == 0
    assert cli(config, "install").stdout.startswith("no changes")
    assert cli(config, "install", "--dry-run").stdout.strip() == "-- nothing to do"


def test_upgrade_from_version_9_keeps_undelivered_events_and_shows_every_attempt(
        conn, make_config, cli, receiver, monkeypatch):
    """Schema version 14 keeps bodies without their envelope and a first attempt that
    delivered on its delivery: what version 9 stored is still sent and shown."""
    conn.execute("CREATE TABLE person (id serial PRIMARY KEY, name text)")
    config = make_config(CONFIG + "\n[retention]\ninterval = 0\n")
    with monkeypatch.context() as patch:
        up_to_9 = [m for m in migrations() if m[0] <= 9]
        for module in (installer, database):
            patch.setattr(module, "migrations", lambda: up_to_9)
        assert cli(config, "install").exit_code == 0
    person = add_listener_like_version_1(conn, "person", receiver.url("/person"))
    conn.execute("INSERT INTO person (name) VALUES ('Ann'), ('Bob')")
    dispatch_like_version_1(conn)  # events kept whole, two pending deliveries
    # Ann's, delivered at its first attempt as version 9 recorded it: an attempt log row.
    (ann,) = conn.execute(
        "UPDATE cdc_hooks.deliveries SET status = 'delivered', attempts = 1, last_status = 200,"
        " finished_at = now() WHERE id = (SELECT min(id) FROM cdc_hooks.deliveries)"
        " RETURNING id").fetchone()
    conn.execute("INSERT INTO cdc_hooks.attempts (delivery_id, status_code, duration_ms, response)"
                 " VALUES (%s, 200, 12.5, 'ok')", (ann,))
    conn.execute("INSERT INTO person (name) VALUES ('Cy')")  # captured, not dispatched
    assert counts(conn) == (1, 1, 1)

    result = cli(config, "install")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == (
        f"schema cdc_hooks: upgrade from version 9 to version {migrations()[-1][0]}")
    assert counts(conn) == (1, 1, 1)
    relay = InProcessRelay(config).start()
    try:
        bodies = [json.loads(r.body) for r in receiver.wait_for(2, "/person")]
        wait_until(lambda: counts(conn)[:2] == (0, 0), message="everything delivered")
    finally:
        relay.stop()
    assert sorted(b["data"]["name"] for b in bodies) == ["Bob", "Cy"]

    with Database.connect(config.dsn) as db:
        shown = {d.id: d for d in (services.deliveries.get_delivery(db, r.id) for r in
                                   services.deliveries.page(db, listener_id=person, limit=10).items)}
    assert [(a.status_code, a.duration_ms, a.response) for a in shown[ann].attempt_log] == [
        (200, 12.5, "ok")]
    assert shown[ann].duration_ms == 12.5
    for delivery in shown.values():  # Bob's (a body kept whole) and Cy's (kept compact)
        (attempt,) = delivery.attempt_log
        assert delivery.status == "delivered" and attempt.status_code == 200
        assert attempt.duration_ms == delivery.duration_ms > 0
    assert {d.body["data"]["name"] for d in shown.values()} == {"Ann", "Bob", "Cy"}
    assert next(d for d in shown.values() if d.body["data"]["name"] == "Cy").body == bodies[
        [b["data"]["name"] for b in bodies].index("Cy")]
    assert conn.execute("SELECT count(*) FROM cdc_hooks.attempts").fetchone() == (1,)
