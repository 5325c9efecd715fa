"""Backfill (issue 7): 'read' events for existing rows, in batches by key,
resumable, with listeners opting in or out; real PostgreSQL, a real relay and
loopback receivers."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from click.testing import Result
from receivers import InProcessRelay, wait_until

from cdc_hooks import backfill
from cdc_hooks import install as installer
from cdc_hooks.config import Config
from cdc_hooks.db import Database
from cdc_hooks.errors import ListenerError
from cdc_hooks.registry import Registry

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
retry_schedule = [0.2]

[retention]
interval = 0
"""

ROWS = 250  # three batches of 100


@pytest.fixture
def config(conn: Conn, make_config: Callable[..., Config]) -> Config:
    # A composite key, and a column the hook does not provide.
    conn.execute("CREATE TABLE person (org int, id int, name text, secret text, "
                 "PRIMARY KEY (org, id))")
    conn.execute("INSERT INTO person SELECT i %% 3, i, 'P' || i, 'hidden' "
                 "FROM generate_series(1, %s) AS i", (ROWS,))
    config = make_config(CONFIG)
    installer.install(config)
    return config


def add(cli: Cli, config: Config, url: str, *options: str) -> int:
    result = cli(config, "listeners", "add", "person", url, *options)
    assert result.exit_code == 0, result.output
    return int(re.search(r"listener (\d+) added", result.stdout).group(1))  # type: ignore[union-attr]


def queued_keys(conn: Conn) -> list[tuple[int, int]]:
    """(org, id) of every row queued as a read event, in outbox order."""
    return [(r[0], r[1]) for r in conn.execute(
        "SELECT (payload -> 'new' -> 'org' ->> i)::int, (payload -> 'new' -> 'id' ->> i)::int "
        "FROM cdc_hooks.outbox, generate_series(0, json_array_length(payload -> 'new' -> 'id') - 1) i "
        "WHERE kind = 'read' ORDER BY id, i")]


def test_backfill_reaches_listeners_that_want_it(conn, config, cli, receiver):
    everyone = add(cli, config, receiver.url("/all"))
    add(cli, config, receiver.url("/none"), "--no-backfill")
    add(cli, config, receiver.url("/some"), "--match", "name=startswith:P1")
    result = cli(config, "backfill", "person", "--batch", "100")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"backfill 1: {ROWS} rows of person queued as read events"
    # Keyset order over the composite key, each row once.
    all_keys = sorted((i % 3, i) for i in range(1, ROWS + 1))
    assert queued_keys(conn) == all_keys

    relay = InProcessRelay(config).start()
    try:
        received = receiver.wait_for(ROWS, "/all")
        some = [f"P{i}" for i in range(1, ROWS + 1) if str(i).startswith("1")]
        receiver.wait_for(len(some), "/some")
    finally:
        relay.stop()
    body = received[0].json
    assert body["event"] == "read" and body["created"] is False and body["hook"] == "person"
    assert set(body) == {"id", "hook", "event", "created", "key", "data", "occurred_at"}
    assert set(body["key"]) == {"org", "id"} and set(body["data"]) == {"name"}  # no secret
    assert sorted((b["key"]["org"], b["key"]["id"]) for b in receiver.bodies("/all")) == all_keys
    assert sorted(b["data"]["name"] for b in receiver.bodies("/some")) == sorted(some)
    assert receiver.received("/none") == []
    assert conn.execute("SELECT count(*) FROM cdc_hooks.deliveries WHERE listener_id = %s",
                        (everyone,)).fetchone() == (ROWS,)


def test_listener_options_are_checked_by_every_interface(conn, config, cli, receiver):
    registry = Registry()
    registry.load(config)
    hook = registry.get("person")
    with pytest.raises(ListenerError, match="listener option 'backfill' must be true or false, not 'no'"):
        hook.listener(receiver.url("/x"), backfill="no").save()
    with pytest.raises(ListenerError, match="unknown listener option 'colour' \\(options: backfill\\)"):
        hook.listener(receiver.url("/x"), colour="red").save()
    assert conn.execute("SELECT count(*) FROM cdc_hooks.listeners").fetchone() == (0,)
    hook.listener(receiver.url("/python"), backfill=False).save()
    assert "active, no backfill" in cli(config, "listeners", "list").stdout


def test_where_and_listener_restrict_a_backfill(conn, config, cli, receiver):
    target = add(cli, config, receiver.url("/target"), "--no-backfill")  # asked for by id
    add(cli, config, receiver.url("/other"))
    result = cli(config, "backfill", "person", "--where", "name LIKE 'P2%' AND id < 30 -- a comment",
                 "--listener", str(target))
    assert result.exit_code == 0, result.output
    relay = InProcessRelay(config).start()
    try:
        receiver.wait_for(11, "/target")  # P2, P20..P29
        wait_until(lambda: conn.execute(
            "SELECT count(*) FROM cdc_hooks.outbox").fetchone() == (0,), message="dispatched")
    finally:
        relay.stop()
    assert sorted(r.json["data"]["name"] for r in receiver.received("/target")) == \
        sorted(["P2", *[f"P2{i}" for i in range(10)]])
    assert receiver.received("/other") == []


def test_an_interrupted_backfill_resumes_after_the_last_batch(conn, config, cli):
    with Database.connect(config.dsn) as db:
        job = backfill.start(db, "person")
        batches = backfill.batches(db, job, 100)
        assert next(batches) == 100
        batches.close()  # interrupted after one batch
    assert len(queued_keys(conn)) == 100
    result = cli(config, "backfill", "person", "--batch", "100")
    assert result.exit_code == 0, result.output
    assert "resuming backfill 1 after 100 rows" in result.stderr
    keys = queued_keys(conn)
    assert keys == sorted(keys) and len(set(keys)) == ROWS  # nothing skipped, nothing twice
    progress = conn.execute("SELECT rows_done, finished_at IS NOT NULL FROM cdc_hooks.backfills"
                            ).fetchall()
    assert progress == [(ROWS, True)]
    # Finished: the same command starts a new backfill.
    assert cli(config, "backfill", "person").stdout.startswith("backfill 2:")
    assert len(queued_keys(conn)) == 2 * ROWS


def test_restart_starts_over(conn, config, cli):
    with Database.connect(config.dsn) as db:
        job = backfill.start(db, "person")
        next(backfill.batches(db, job, 100))
    assert cli(config, "backfill", "person", "--restart").exit_code == 0
    assert len(queued_keys(conn)) == 100 + ROWS


def test_a_concurrent_update_waits_for_the_batch_that_read_the_row(conn, config, clean_db):
    """FOR SHARE: the update's event is queued after the row's read event."""
    with Database.connect(config.dsn) as db, db.transaction():
        job = backfill.start(db, "person")
        next(backfill.batches(db, job, ROWS))  # still inside our transaction: rows share-locked
        with psycopg.connect(clean_db, autocommit=True) as other:
            other.execute("SET lock_timeout = '200ms'")
            with pytest.raises(psycopg.errors.LockNotAvailable):
                other.execute("UPDATE person SET name = 'changed' WHERE id = 1")


@pytest.mark.parametrize(("condition", "message"), [
    ("nme = 'x'", 'column "nme" does not exist'),
    ("id + 1", "argument of WHERE must be type boolean"),
    ("true) UNION SELECT 1 FROM pg_class WHERE (true", "syntax error"),
    ("true; DELETE FROM person", "statement separator"),
    ("   ", "--where is empty"),
    # Escapes of the parenthesis around the condition (issue 12): refused before anything runs.
    ("id = 1) OR (true", 'syntax error at or near ")"'),
    ("1=1) --", 'syntax error at or near ")"'),
    ("id = 1) OR (true -- ", 'syntax error at or near ")"'),
    ("true /* the rest", "unterminated /* comment"),
    ("true;", "statement separator"),
    ("true FROM person", "clauses of its own"),
    ("true ORDER BY 1", "clauses of its own"),
    ("true UNION SELECT true", "clauses of its own"),
    ("true AS x", "clauses of its own"),
])
@pytest.mark.timeout(60)  # before the fix, "id = 1) OR (true" looped for ever
def test_a_where_condition_is_checked_before_it_runs(conn, config, cli, condition, message):
    result = cli(config, "backfill", "person", "--where", condition, "--batch", "1")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: --where {condition!r}" if condition.strip()
                                    else "error: --where is empty"), result.stderr
    assert message in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert conn.execute("SELECT count(*) FROM person").fetchone() == (ROWS,)
    assert queued_keys(conn) == []
    assert conn.execute("SELECT count(*) FROM cdc_hooks.backfills").fetchone() == (0,)


@pytest.mark.parametrize("condition", [
    "id IN (SELECT id FROM person WHERE name LIKE 'P1%') AND org = 1",
    "name = ')' -- a parenthesis in a string and a comment",
    "(id < 5) /* a closed comment */",
    "name = $$a) OR (true$$ OR id < 5",
])
def test_a_valid_condition_with_parentheses_strings_and_comments_still_works(conn, config, cli,
                                                                              condition):
    expected = {(r[0], r[1]) for r in conn.execute(
        f"SELECT org, id FROM person WHERE ({condition}\n)")}  # the test's own, trusted SQL
    result = cli(config, "backfill", "person", "--where", condition, "--batch", "2")
    assert result.exit_code == 0, result.output
    keys = queued_keys(conn)
    assert keys == sorted(keys) and set(keys) == expected and len(keys) == len(expected)


def test_even_a_bug_in_the_guard_cannot_make_a_backfill_loop(conn, config, monkeypatch):
    """An escaping condition that got past the guard (built here without it) is
    stopped by the key order; with that check gone too, by the table's row count."""
    def escaped(db: Database) -> backfill.Backfill:
        condition, hook = "id = 3) OR (true", backfill._table_hook(db, "person")
        backfill_id = db.backfill_start(hook.name, condition, None, hook.key_columns)
        return backfill.Backfill(backfill_id, hook, condition, None, None, 0, False)

    with Database.connect(config.dsn) as db, \
            pytest.raises(backfill.BackfillError, match="at or before the last key reached"):
        list(backfill.batches(db, escaped(db), 1))
    assert queued_keys(conn) == [(0, 3)]  # the first batch; the one that went back is not queued

    conn.execute("DELETE FROM cdc_hooks.outbox")
    conn.execute("DELETE FROM cdc_hooks.backfills")
    monkeypatch.setattr(backfill, "_statement", _without_key_order(backfill._statement))
    with Database.connect(config.dsn) as db, \
            pytest.raises(backfill.BackfillError, match=f"more than the table holds \\({ROWS}\\)"):
        list(backfill.batches(db, escaped(db), 1))
    assert len(queued_keys(conn)) == ROWS  # the same row over and over, but no more than that


def _without_key_order(statement: Callable[..., Any]) -> Callable[..., Any]:
    """The batch statement with its key order check turned off (a simulated bug)."""
    def patched(name: str, hook: Any, condition: str | None, *, after: bool = False) -> Any:
        composed = statement(name, hook, condition, after=after)
        return psycopg.sql.SQL(composed.as_string(None).replace(  # type: ignore[arg-type]
            "(SELECT count(*) FROM numbered WHERE", "(SELECT 0 * count(*) FROM numbered WHERE"))
    return patched


def test_refusals(conn, config, cli, receiver):
    assert "custom hook" in cli(config, "backfill", "myhook").stderr
    assert 'unknown hook "nope"' in cli(config, "backfill", "nope").stderr
    assert "no listener with id 99" in cli(config, "backfill", "person", "--listener", "99").stderr
    other = cli(config, "listeners", "add", "myhook", receiver.url())
    other_id = re.search(r"listener (\d+)", other.stdout).group(1)  # type: ignore[union-attr]
    result = cli(config, "backfill", "person", "--listener", other_id)
    assert result.exit_code == 2 and 'listens to hook "myhook"' in result.stderr
