"""Upgrades (issue 7): `cdc-hooks install` brings a database installed at
schema version 1, the first released one, to the current version in place,
keeping undelivered changes, listeners and pending deliveries, which a relay
then delivers. Real PostgreSQL, relay and receiver."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from click.testing import Result
from receivers import InProcessRelay, Receiver, wait_until

from cdc_hooks import db as db_module
from cdc_hooks import install as installer
from cdc_hooks.config import Config
from cdc_hooks.db import migrations, sql_text

Conn = psycopg.Connection[Any]
Cli = Callable[..., Result]

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


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver().start()
    yield server
    server.close()


def install_version_1(conn: Conn, config: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    """The schema as the first release left it: bootstrap and migration 1 applied
    by hand, then that release's install of the hooks (no newer migration)."""
    version_1 = [m for m in migrations() if m[0] == 1]
    with conn.transaction():
        conn.execute(sql_text("bootstrap.sql"))
        conn.execute(version_1[0][1])
        conn.execute("INSERT INTO cdc_hooks.schema_version (version) VALUES (1)")
    with monkeypatch.context() as patch:
        patch.setattr(db_module, "migrations", lambda: version_1)
        patch.setattr(installer, "migrations", lambda: version_1)
        installer.install(config)
    # Version 1 had no built-in hooks.
    conn.execute("DELETE FROM cdc_hooks.hooks WHERE name = 'cdc_hooks.listener_disabled'")
    assert conn.execute("SELECT max(version) FROM cdc_hooks.schema_version").fetchone() == (1,)


def counts(conn: Conn) -> tuple[int, int, int]:
    row = conn.execute("SELECT (SELECT count(*) FROM cdc_hooks.outbox),"
                       " (SELECT count(*) FROM cdc_hooks.deliveries WHERE status = 'pending'),"
                       " (SELECT count(*) FROM cdc_hooks.listeners)").fetchone()
    assert row is not None
    return row[0], row[1], row[2]


def test_upgrade_from_version_1_keeps_and_then_delivers_everything(
        conn, make_config, cli, receiver, monkeypatch):
    conn.execute("CREATE TABLE person (id serial PRIMARY KEY, name text)")
    config = make_config(CONFIG + "\n[retention]\ninterval = 0\n")
    install_version_1(conn, config, monkeypatch)

    added = cli(config, "listeners", "add", "person", receiver.url("/person"))
    assert added.exit_code == 0, added.output
    person = int(re.search(r"listener (\d+) added", added.stdout).group(1))  # type: ignore[union-attr]
    assert cli(config, "listeners", "add", "myhook", receiver.url("/custom")).exit_code == 0
    assert cli(config, "listeners", "pause", str(person)).exit_code == 0
    # Dispatched while paused: pending deliveries, held.
    conn.execute("INSERT INTO person (name) VALUES ('Ann'), ('Bob')")
    relay = InProcessRelay(config).start()
    try:
        wait_until(lambda: counts(conn)[:2] == (0, 2), message="dispatched, held")
    finally:
        relay.stop()
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
                        ).fetchone() == (list(range(1, latest + 1)),)
    assert counts(conn) == before
    assert cli(config, "check").exit_code == 0
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
    assert [(b["event"], b["data"]["name"]) for b in bodies] == [
        ("insert", "Ann"), ("insert", "Bob"), ("insert", "Cy"), ("update", "Bo")]
    assert receiver.bodies("/custom")[0]["data"] == {"message": "hi"}
    assert counts(conn)[:2] == (0, 0)


def test_install_on_an_upgraded_database_has_nothing_left_to_do(conn, make_config, cli,
                                                                monkeypatch):
    conn.execute("CREATE TABLE person (id serial PRIMARY KEY, name text)")
    config = make_config(CONFIG)
    install_version_1(conn, config, monkeypatch)
    behind = cli(config, "check")
    assert behind.exit_code == 1
    assert "schema cdc_hooks is at version 1" in behind.stdout
    assert 'hook "cdc_hooks.listener_disabled": not installed' in behind.stdout
    assert cli(config, "install").exit_code == 0
    assert cli(config, "install").stdout.startswith("no changes")
    assert cli(config, "install", "--dry-run").stdout.strip() == "-- nothing to do"
