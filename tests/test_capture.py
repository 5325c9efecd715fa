"""Capture on a real PostgreSQL: install/check/uninstall through the CLI, triggers through SQL."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import Result
from psycopg import conninfo, sql

from cdc_hooks import jsoncodec
from cdc_hooks.config import Config
from cdc_hooks.db import migrations
from cdc_hooks.registry import send

Conn = psycopg.Connection[Any]
MakeConfig = Callable[..., Config]
Cli = Callable[..., Result]

PERSON = """
[[hooks]]
name = "person"
table = "public.person"
events = ["insert", "update", "delete"]
provides = ["name", "address"]
"""
CUSTOM = """
[[hooks]]
name = "myhook"
provides = ["name", "address"]
"""
SECRET = "s3cret-" + secrets.token_hex(8)


def create_person(conn: Conn) -> None:
    conn.execute("CREATE TABLE person (id serial PRIMARY KEY, name text, address text, "
                 "password_hash text)")


def outbox(conn: Conn) -> list[tuple[str, str, dict[str, Any]]]:
    """(hook, kind, payload) of every outbox row, in order."""
    rows = conn.execute("SELECT hook, kind, payload::text FROM cdc_hooks.outbox ORDER BY id")
    return [(hook, kind, jsoncodec.loads(payload)) for hook, kind, payload in rows]


def rows_of(arrays: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Column arrays back into rows."""
    lengths = {len(values) for values in arrays.values()}
    assert len(lengths) == 1, f"column arrays of different lengths: {arrays}"
    return [{c: values[i] for c, values in arrays.items()} for i in range(lengths.pop())]


def events(conn: Conn) -> list[tuple[str, str, list[dict[str, Any]], list[dict[str, Any]]]]:
    """(hook, kind, new rows, old rows) per outbox row."""
    return [(hook, kind, rows_of(p["new"]) if "new" in p else [],
             rows_of(p["old"]) if "old" in p else []) for hook, kind, p in outbox(conn)]


def schema_exists(conn: Conn) -> bool:
    return conn.execute("SELECT to_regnamespace('cdc_hooks') IS NOT NULL").fetchone()[0]


def triggers(conn: Conn, table: str) -> list[str]:
    rows = conn.execute("SELECT tgname FROM pg_trigger WHERE tgrelid = %s::regclass "
                        "AND NOT tgisinternal ORDER BY tgname", (table,))
    return [r[0] for r in rows]


def installed(make_config: MakeConfig, cli: Cli, body: str) -> Config:
    config = make_config(body)
    result = cli(config, "install")
    assert result.exit_code == 0, result.output
    return config


# install ----------------------------------------------------------------------

def test_install_creates_schema_and_triggers(conn: Conn, make_config: MakeConfig,
                                             cli: Cli) -> None:
    create_person(conn)
    config = make_config(PERSON + CUSTOM)
    result = cli(config, "install")
    assert result.exit_code == 0, result.output
    assert f"schema cdc_hooks: create to version {migrations()[-1][0]}" in result.stdout
    assert "+ person: insert, update, delete on public.person providing name, address" \
        in result.stdout
    assert "+ myhook: custom hook providing name, address" in result.stdout
    assert triggers(conn, "person") == ["cdc_hooks_person_delete", "cdc_hooks_person_insert",
                                        "cdc_hooks_person_update"]
    hooks = conn.execute("SELECT name, table_schema, table_name, events, provides, key_columns, "
                         "when_changed FROM cdc_hooks.hooks ORDER BY name").fetchall()
    assert hooks == [
        # Built in: cdc-hooks' own operational events (issue 7).
        ("cdc_hooks.listener_disabled", None, None, [], ["listener_id", "hook", "url", "reason"],
         [], []),
        ("myhook", None, None, [], ["name", "address"], [], []),
        ("person", "public", "person", ["insert", "update", "delete"], ["name", "address"],
         ["id"], ["name", "address"]),
    ]


def test_defaults_provide_every_column_but_the_key(conn: Conn, make_config: MakeConfig,
                                                  cli: Cli) -> None:
    create_person(conn)
    installed(make_config, cli, '[[hooks]]\nname = "person"\ntable = "person"\n')
    assert triggers(conn, "person") == ["cdc_hooks_person_insert", "cdc_hooks_person_update"]
    row = conn.execute("SELECT provides, key_columns FROM cdc_hooks.hooks").fetchone()
    assert row == (["name", "address", "password_hash"], ["id"])


BAD_HOOKS = [
    ('table = "nope"', 'hook "bad": table public.nope does not exist'),
    ('table = "other.person"', 'hook "bad": table other.person does not exist'),
    ('table = "person"\nprovides = ["name", "nickname"]',
     'hook "bad": provided column "nickname" does not exist in public.person'),
    ('table = "person"\nkey = ["uuid"]', 'hook "bad": key column "uuid" does not exist'),
    ('table = "person"\nprovides = ["name"]\nwhen_changed = ["name"]\nkey = ["nope"]',
     'hook "bad": key column "nope" does not exist'),
    ('table = "nokey"', 'hook "bad": table public.nokey has no primary key; name the columns '
                        "that identify a row with key = [...]"),
    ('table = "person_view"\nkey = ["id"]', 'hook "bad": public.person_view is a view, not a table'),
    ('table = "person_summary"\nkey = ["id"]',
     'hook "bad": public.person_summary is a materialized view, not a table'),
    ('table = "person"\nwhen_changed = ["nickname"]',
     'hook "bad": when_changed column "nickname" does not exist'),
]


def create_bad_targets(conn: Conn) -> None:
    create_person(conn)
    conn.execute("CREATE TABLE nokey (a int, b text)")
    conn.execute("CREATE VIEW person_view AS SELECT id, name FROM person")
    conn.execute("CREATE MATERIALIZED VIEW person_summary AS SELECT id, name FROM person")


@pytest.mark.parametrize(("bad", "message"), BAD_HOOKS)
def test_a_bad_hook_installs_nothing(conn: Conn, make_config: MakeConfig, cli: Cli,
                                     bad: str, message: str) -> None:
    create_bad_targets(conn)
    config = make_config(PERSON + CUSTOM + f'[[hooks]]\nname = "bad"\n{bad}\n')
    result = cli(config, "install")
    assert result.exit_code == 2
    assert f"error: {message}" in result.stderr
    assert result.stdout == ""
    assert not schema_exists(conn)
    assert triggers(conn, "person") == []


def test_a_bad_hook_leaves_an_existing_install_untouched(conn: Conn, make_config: MakeConfig,
                                                        cli: Cli) -> None:
    create_bad_targets(conn)
    installed(make_config, cli, PERSON)
    before = conn.execute("SELECT name, provides FROM cdc_hooks.hooks").fetchall()
    changed = PERSON.replace('["name", "address"]', '["name"]')
    result = cli(make_config(changed + '[[hooks]]\nname = "bad"\ntable = "nokey"\n'), "install")
    assert result.exit_code == 2
    assert 'hook "bad": table public.nokey has no primary key' in result.stderr
    assert conn.execute("SELECT name, provides FROM cdc_hooks.hooks").fetchall() == before
    assert len(triggers(conn, "person")) == 3


def test_every_bad_hook_is_reported(conn: Conn, make_config: MakeConfig, cli: Cli) -> None:
    create_bad_targets(conn)
    config = make_config('[[hooks]]\nname = "a"\ntable = "nope"\n'
                         '[[hooks]]\nname = "b"\ntable = "nokey"\n')
    result = cli(config, "install")
    assert result.exit_code == 2
    assert 'error: hook "a": table public.nope does not exist' in result.stderr
    assert 'error: hook "b": table public.nokey has no primary key' in result.stderr


def test_a_config_that_does_not_load_exits_2(conn: Conn, cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "typo.toml"
    path.write_text('[[hooks]]\nname = "person"\ntable = "person"\nprovide = ["name"]\n')
    result = cli(path, "install")
    assert result.exit_code == 2
    assert 'error: hook "person": unknown key "provide" (did you mean "provides"?)' \
        in result.stderr
    result = cli(tmp_path / "missing.toml", "install")
    assert result.exit_code == 2
    assert "no such config file" in result.stderr


def test_an_unreachable_database_exits_1(cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[database]\ndsn = "postgresql://nobody:pw@127.0.0.1:1/none"\n' + CUSTOM)
    result = cli(path, "install")
    assert result.exit_code == 1
    assert "cannot connect to PostgreSQL at 127.0.0.1:1/none" in result.stderr
    assert "pw" not in result.stderr.replace("PostgreSQL", "")


def test_install_is_idempotent_and_follows_the_config(conn: Conn, make_config: MakeConfig,
                                                      cli: Cli) -> None:
    create_person(conn)
    conn.execute("CREATE TABLE pet (id int PRIMARY KEY, name text, owner int)")
    installed(make_config, cli, PERSON)
    again = cli(make_config(PERSON), "install")
    assert again.exit_code == 0
    assert again.stdout.strip() == "no changes: the database is in line with the config"

    # Change one hook, add another: both reported, the unchanged part untouched.
    edited = PERSON.replace('["insert", "update", "delete"]', '["insert"]')
    result = cli(make_config(edited + '[[hooks]]\nname = "pet"\ntable = "pet"\n'), "install")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "~ person: insert on public.person providing name, address",
        "+ pet: insert, update on public.pet providing name, owner",
    ]
    assert triggers(conn, "person") == ["cdc_hooks_person_insert"]
    assert triggers(conn, "pet") == ["cdc_hooks_pet_insert", "cdc_hooks_pet_update"]

    # Drop a hook: its triggers and function go, the other stays.
    result = cli(make_config('[[hooks]]\nname = "pet"\ntable = "pet"\n'), "install")
    assert result.stdout.splitlines() == ["- person: removed"]
    assert triggers(conn, "person") == []
    assert conn.execute("SELECT to_regproc('cdc_hooks.capture_person')").fetchone()[0] is None
    assert conn.execute("SELECT array_agg(name) FROM cdc_hooks.hooks"
                        " WHERE name NOT LIKE 'cdc\\_hooks.%'").fetchone()[0] == ["pet"]
    assert cli(make_config('[[hooks]]\nname = "pet"\ntable = "pet"\n'), "install").stdout \
        .startswith("no changes")


def test_install_restores_a_missing_trigger(conn: Conn, make_config: MakeConfig,
                                            cli: Cli) -> None:
    create_person(conn)
    config = installed(make_config, cli, PERSON)
    conn.execute("DROP TRIGGER cdc_hooks_person_update ON person")
    result = cli(config, "install")
    assert result.stdout.startswith("~ person:")
    assert len(triggers(conn, "person")) == 3


def test_install_follows_a_new_column(conn: Conn, make_config: MakeConfig, cli: Cli) -> None:
    create_person(conn)
    config = installed(make_config, cli, '[[hooks]]\nname = "person"\ntable = "person"\n')
    conn.execute("ALTER TABLE person ADD COLUMN email text")
    drift = cli(config, "check")
    assert drift.exit_code == 1
    assert 'hook "person": config changed since install' in drift.stdout
    result = cli(config, "install")
    assert "providing name, address, password_hash, email" in result.stdout
    conn.execute("INSERT INTO person (name, email) VALUES ('Joe', 'joe@example.com')")
    assert events(conn)[0][2] == [{"id": 1, "name": "Joe", "address": None,
                                   "password_hash": None, "email": "joe@example.com"}]


def test_dry_run_prints_sql_and_changes_nothing(conn: Conn, make_config: MakeConfig,
                                                cli: Cli) -> None:
    create_person(conn)
    config = make_config(PERSON)
    result = cli(config, "install", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "CREATE SCHEMA cdc_hooks" in result.stdout
    assert "CREATE TABLE cdc_hooks.outbox" in result.stdout
    assert 'CREATE OR REPLACE FUNCTION "cdc_hooks"."capture_person"()' in result.stdout
    assert 'CREATE TRIGGER "cdc_hooks_person_update" AFTER UPDATE ON "public"."person"' \
        in result.stdout
    assert not schema_exists(conn)
    assert triggers(conn, "person") == []

    installed(make_config, cli, PERSON)
    assert cli(config, "install", "--dry-run").stdout.strip() == "-- nothing to do"
    edited = make_config(PERSON.replace('["name", "address"]', '["name"]'))
    result = cli(edited, "install", "--dry-run")
    assert "CREATE SCHEMA" not in result.stdout
    assert 'CREATE OR REPLACE FUNCTION "cdc_hooks"."capture_person"()' in result.stdout
    assert conn.execute("SELECT provides FROM cdc_hooks.hooks").fetchone()[0] == [
        "name", "address"]


def test_dry_run_sql_applied_by_hand_equals_install(conn: Conn, make_config: MakeConfig,
                                                  cli: Cli) -> None:
    create_person(conn)
    config = make_config(PERSON + CUSTOM)
    script = cli(config, "install", "--dry-run").stdout
    conn.execute(script)  # as a DBA would run it with psql
    assert cli(config, "check").exit_code == 0
    assert cli(config, "install").stdout.startswith("no changes")
    conn.execute("INSERT INTO person (name) VALUES ('Joe')")
    assert events(conn)[0][2] == [{"id": 1, "name": "Joe", "address": None}]

    # A change that only touches bookkeeping (a new custom hook) is printed too.
    config = make_config(PERSON + CUSTOM + '[[hooks]]\nname = "other"\nprovides = ["x"]\n')
    script = cli(config, "install", "--dry-run").stdout
    assert "INSERT INTO cdc_hooks.hooks" in script
    conn.execute(script)
    assert cli(config, "check").exit_code == 0


def test_dry_run_reports_a_bad_hook(conn: Conn, make_config: MakeConfig, cli: Cli) -> None:
    result = cli(make_config('[[hooks]]\nname = "bad"\ntable = "nope"\n'), "install", "--dry-run")
    assert result.exit_code == 2
    assert 'hook "bad": table public.nope does not exist' in result.stderr


# check --------------------------------------------------------------------------

def test_check(conn: Conn, make_config: MakeConfig, cli: Cli) -> None:
    create_person(conn)
    config = make_config(PERSON)
    before = cli(config, "check")
    assert before.exit_code == 1
    assert "schema cdc_hooks is not installed" in before.stdout
    installed(make_config, cli, PERSON)
    ok = cli(config, "check")
    assert ok.exit_code == 0
    assert ok.stdout.strip() == "ok: the database is in line with the config"


def test_check_reports_a_dropped_column_and_a_missing_trigger(conn: Conn, make_config: MakeConfig,
                                                             cli: Cli) -> None:
    create_person(conn)
    config = installed(make_config, cli, PERSON)
    conn.execute("ALTER TABLE person DROP COLUMN address")
    conn.execute("DROP TRIGGER cdc_hooks_person_delete ON person")
    result = cli(config, "check")
    assert result.exit_code == 1
    assert 'hook "person": column "address" no longer exists in public.person ' \
        "(dropped or renamed); its events lack it" in result.stdout
    assert 'hook "person": trigger cdc_hooks_person_delete on public.person is missing' \
        in result.stdout
    # The config still names the column: resolving it fails too, and says so.
    assert 'hook "person": provided column "address" does not exist' in result.stdout


def test_check_reports_a_renamed_column(conn: Conn, make_config: MakeConfig, cli: Cli) -> None:
    create_person(conn)
    config = installed(make_config, cli, PERSON)
    conn.execute("ALTER TABLE person RENAME COLUMN name TO full_name")
    result = cli(config, "check")
    assert result.exit_code == 1
    assert 'column "name" no longer exists in public.person' in result.stdout


def test_check_reports_hooks_out_of_step(conn: Conn, make_config: MakeConfig, cli: Cli) -> None:
    create_person(conn)
    installed(make_config, cli, PERSON)
    result = cli(make_config(CUSTOM), "check")
    assert result.exit_code == 1
    assert 'hook "myhook": not installed' in result.stdout
    assert 'hook "person": installed but not in the config' in result.stdout


def test_check_reports_a_dropped_table(conn: Conn, make_config: MakeConfig, cli: Cli) -> None:
    create_person(conn)
    config = installed(make_config, cli, PERSON)
    conn.execute("DROP TABLE person")
    result = cli(config, "check")
    assert result.exit_code == 1
    assert 'hook "person": table public.person no longer exists' in result.stdout


# uninstall ----------------------------------------------------------------------

def test_uninstall_keeps_the_schema_and_its_events(conn: Conn, make_config: MakeConfig,
                                                   cli: Cli) -> None:
    create_person(conn)
    config = installed(make_config, cli, PERSON + CUSTOM)
    conn.execute("INSERT INTO person (name) VALUES ('Joe')")
    result = cli(config, "uninstall")
    assert result.exit_code == 0, result.output
    assert sorted(result.stdout.splitlines()) == ["- myhook: removed", "- person: removed"]
    assert triggers(conn, "person") == []
    assert conn.execute("SELECT count(*) FROM cdc_hooks.hooks").fetchone()[0] == 0
    assert conn.execute(
        "SELECT count(*) FROM pg_proc WHERE proname LIKE 'capture\\_%'").fetchone()[0] == 0
    conn.execute("INSERT INTO person (name) VALUES ('Jane')")  # no longer captured
    assert [e[2] for e in events(conn)] == [[{"id": 1, "name": "Joe", "address": None}]]
    assert cli(config, "uninstall").stdout == ""  # nothing left to remove


def test_uninstall_drop_schema(conn: Conn, make_config: MakeConfig, cli: Cli) -> None:
    create_person(conn)
    config = installed(make_config, cli, PERSON)
    conn.execute("INSERT INTO person (name) VALUES ('Joe'), ('Jane')")
    result = cli(config, "uninstall", "--drop-schema")
    assert result.exit_code == 0, result.output
    assert "- person: removed" in result.stdout
    assert "schema cdc_hooks dropped (1 outbox chunks and 0 pending deliveries discarded)" \
        in result.stdout
    assert not schema_exists(conn)
    assert triggers(conn, "person") == []
    conn.execute("INSERT INTO person (name) VALUES ('Bob')")
    assert cli(config, "uninstall").stdout.strip() == "nothing installed"
    # And it installs again from scratch.
    assert "schema cdc_hooks: create" in cli(config, "install").stdout


# What the triggers record -------------------------------------------------------

@pytest.fixture
def person(conn: Conn, make_config: MakeConfig, cli: Cli) -> Conn:
    """The person table with the person hook (insert, update, delete) installed."""
    create_person(conn)
    installed(make_config, cli, PERSON + CUSTOM)
    return conn


def test_committed_writes_are_recorded_rolled_back_ones_are_not(person: Conn) -> None:
    with person.transaction():
        person.execute("INSERT INTO person (name, address) VALUES ('Joe', 'NYC')")
    with pytest.raises(psycopg.errors.DivisionByZero), person.transaction():
        person.execute("INSERT INTO person (name, address) VALUES ('Rolled', 'Back')")
        person.execute("SELECT 1 / 0")
    with person.transaction():
        person.execute("UPDATE person SET name = 'Joseph'")
        with pytest.raises(psycopg.errors.DivisionByZero), person.transaction():  # savepoint
            person.execute("DELETE FROM person")
            person.execute("SELECT 1 / 0")
    with person.transaction(force_rollback=True):
        person.execute("DELETE FROM person")
    assert [(kind, new, old) for _, kind, new, old in events(person)] == [
        ("insert", [{"id": 1, "name": "Joe", "address": "NYC"}], []),
        ("update", [{"id": 1, "name": "Joseph", "address": "NYC"}],
         [{"id": 1, "name": "Joe", "address": "NYC"}]),
    ]


def test_each_event_kind(person: Conn) -> None:
    person.execute("INSERT INTO person (name, address, password_hash) "
                   "VALUES ('Joe', 'NYC', 'x'), ('Jane', NULL, 'y')")
    person.execute("UPDATE person SET address = 'LA' WHERE name = 'Jane'")
    person.execute("DELETE FROM person WHERE name = 'Joe'")
    assert outbox(person) == [
        ("person", "insert", {"new": {"id": [1, 2], "name": ["Joe", "Jane"],
                                      "address": ["NYC", None]}}),
        ("person", "update", {"new": {"id": [2], "name": ["Jane"], "address": ["LA"]},
                              "old": {"id": [2], "name": ["Jane"], "address": [None]}}),
        ("person", "delete", {"old": {"id": [1], "name": ["Joe"], "address": ["NYC"]}}),
    ]


def test_upsert_and_merge_record_what_happened(person: Conn) -> None:
    person.execute("INSERT INTO person (id, name) VALUES (1, 'Joe')")
    person.execute("INSERT INTO person (id, name) VALUES (1, 'Joey'), (2, 'Jane') "
                   "ON CONFLICT (id) DO UPDATE SET name = excluded.name")
    kinds = [(kind, [r["name"] for r in new], [r["name"] for r in old])
             for _, kind, new, old in events(person)]
    # PostgreSQL fires the upsert's UPDATE statement triggers before its INSERT ones.
    assert kinds == [("insert", ["Joe"], []), ("update", ["Joey"], ["Joe"]),
                     ("insert", ["Jane"], [])]


def test_copy_is_captured(person: Conn) -> None:
    with person.cursor().copy("COPY person (name, address) FROM STDIN") as copy:
        copy.write_row(("Joe", "NYC"))
        copy.write_row(("Jane", None))
    assert events(person)[0][1:3] == ("insert", [{"id": 1, "name": "Joe", "address": "NYC"},
                                                 {"id": 2, "name": "Jane", "address": None}])


def test_two_hooks_on_one_table_each_record_their_own_columns(
        conn: Conn, make_config: MakeConfig, cli: Cli) -> None:
    create_person(conn)
    both = ('[[hooks]]\nname = "names"\ntable = "person"\nprovides = ["name"]\n'
            '[[hooks]]\nname = "places"\ntable = "person"\nprovides = ["address"]\n'
            'events = ["insert"]\n')
    installed(make_config, cli, both)
    conn.execute("INSERT INTO person (name, address) VALUES ('Joe', 'NYC')")
    conn.execute("UPDATE person SET name = 'Joseph'")
    assert sorted((hook, kind, new) for hook, kind, new, _ in events(conn)) == [
        ("names", "insert", [{"id": 1, "name": "Joe"}]),
        ("names", "update", [{"id": 1, "name": "Joseph"}]),
        ("places", "insert", [{"id": 1, "address": "NYC"}]),
    ]
    installed(make_config, cli, both.split("[[hooks]]\nname = \"places\"")[0])
    assert triggers(conn, "person") == ["cdc_hooks_names_insert", "cdc_hooks_names_update"]


def test_a_statement_changing_no_rows_records_nothing(person: Conn) -> None:
    person.execute("UPDATE person SET name = 'x' WHERE false")
    person.execute("DELETE FROM person")
    assert outbox(person) == []


def test_event_ids_follow_the_outbox(person: Conn) -> None:
    person.execute("INSERT INTO person (name) VALUES ('Joe')")
    (outbox_id,) = person.execute("SELECT id FROM cdc_hooks.outbox").fetchone()
    assert outbox_id >= 1
    event_id = person.execute(
        "SELECT cdc_hooks.send('myhook', '{\"name\": \"x\"}')").fetchone()[0]
    assert event_id == (outbox_id + 1) * 1000


def test_update_pairs_old_and_new_rows_by_position(person: Conn) -> None:
    person.execute("INSERT INTO person (name) SELECT 'n' || g FROM generate_series(1, 50) g")
    person.execute("UPDATE person SET name = name || '!' WHERE id % 3 = 0")
    _, kind, new, old = events(person)[-1]
    assert kind == "update"
    assert [r["id"] for r in new] == [r["id"] for r in old]
    assert all(n["name"] == o["name"] + "!" for n, o in zip(new, old, strict=True))
    assert len(new) == 16


# Projection -----------------------------------------------------------------------

def cdc_hooks_dump(conn: Conn) -> str:
    """Every row of every table in schema cdc_hooks, as text."""
    tables = [r[0] for r in conn.execute(
        "SELECT relname FROM pg_class WHERE relnamespace = 'cdc_hooks'::regnamespace "
        "AND relkind IN ('r', 'p')")]
    assert "outbox" in tables
    parts = []
    for table in tables:
        query = sql.SQL("SELECT t::text FROM {} t").format(sql.Identifier("cdc_hooks", table))
        parts += [r[0] for r in conn.execute(query)]
    return "\n".join(parts)


def test_a_secret_column_never_reaches_the_cdc_hooks_schema(person: Conn) -> None:
    person.execute("INSERT INTO person (name, password_hash) VALUES ('Joe', %s)", (SECRET,))
    person.execute("UPDATE person SET password_hash = %s || '2'", (SECRET,))  # secret-only change
    person.execute("UPDATE person SET name = 'Joseph'")
    person.execute("DELETE FROM person")
    assert len(outbox(person)) == 4
    dump = cdc_hooks_dump(person)
    assert "Joseph" in dump  # the dump does see the provided values
    assert SECRET not in dump
    assert all("password_hash" not in p.get("new", p.get("old")) for _, _, p in outbox(person))


def test_a_secret_column_stays_out_on_the_fallback_path(person: Conn) -> None:
    person.execute("ALTER TABLE person DROP COLUMN address")  # forces the fallback capture
    person.execute("INSERT INTO person (name, password_hash) VALUES ('Joe', %s)", (SECRET,))
    person.execute("UPDATE person SET password_hash = 'new-' || password_hash")
    person.execute("DELETE FROM person")
    assert len(outbox(person)) == 3
    assert SECRET not in cdc_hooks_dump(person)


# Never break the application's writes ----------------------------------------------

@pytest.mark.parametrize("change", ["DROP COLUMN address", "RENAME COLUMN address TO addr"])
def test_writes_survive_a_dropped_or_renamed_column(person: Conn, change: str) -> None:
    person.execute(sql.SQL("ALTER TABLE person {}").format(sql.SQL(change)))  # type: ignore[arg-type]
    person.execute("INSERT INTO person (name, password_hash) VALUES ('Joe', 'x'), ('Jane', 'y')")
    person.execute("UPDATE person SET name = name || '!'")
    person.execute("DELETE FROM person WHERE name = 'Joe!'")
    assert [(kind, new, old) for _, kind, new, old in events(person)] == [
        ("insert", [{"id": 1, "name": "Joe"}, {"id": 2, "name": "Jane"}], []),
        ("update", [{"id": 1, "name": "Joe!"}, {"id": 2, "name": "Jane!"}],
         [{"id": 1, "name": "Joe"}, {"id": 2, "name": "Jane"}]),
        ("delete", [], [{"id": 1, "name": "Joe!"}]),
    ]


def test_writes_survive_when_every_provided_column_is_gone(person: Conn) -> None:
    person.execute("ALTER TABLE person DROP COLUMN address, DROP COLUMN name")
    person.execute("INSERT INTO person (password_hash) VALUES ('x')")
    assert events(person)[0][2] == [{"id": 1}]


def test_an_application_role_without_rights_on_cdc_hooks_writes_and_is_captured(
        person: Conn, clean_db: str) -> None:
    role = f"cdc_hooks_test_app_{secrets.token_hex(4)}"
    person.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        person.execute(sql.SQL("GRANT ALL ON person, person_id_seq TO {}").format(
            sql.Identifier(role)))
        with psycopg.connect(clean_db, user=role, autocommit=True) as app:
            app.execute("INSERT INTO person (name) VALUES ('Joe')")
            app.execute("UPDATE person SET name = 'Joseph'")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                app.execute("SELECT * FROM cdc_hooks.outbox")
        assert [kind for _, kind, _, _ in events(person)] == ["insert", "update"]
    finally:
        person.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        person.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


# Names, schemas, partitions ----------------------------------------------------------

def test_mixed_case_and_quoted_names_in_another_schema(conn: Conn, make_config: MakeConfig,
                                                       cli: Cli) -> None:
    conn.execute('CREATE SCHEMA "Sales Dept"')
    conn.execute('CREATE TABLE "Sales Dept"."Order Items" ("ID" int PRIMARY KEY, '
                 '"Product Name" text, qty int, "odd""col" text, "Secret" text)')
    config = installed(make_config, cli, '''
[[hooks]]
name = "Order-Items.v1"
table = '"Sales Dept"."Order Items"'
events = ["insert", "update", "delete"]
provides = ["Product Name", "qty", 'odd"col']
''')
    assert cli(config, "check").exit_code == 0
    conn.execute('INSERT INTO "Sales Dept"."Order Items" VALUES (1, \'Tea\', 2, \'q"q\', %s)',
                 (SECRET,))
    conn.execute('UPDATE "Sales Dept"."Order Items" SET qty = 3')
    conn.execute('DELETE FROM "Sales Dept"."Order Items"')
    row = {"ID": 1, "Product Name": "Tea", "qty": 2, 'odd"col': 'q"q'}
    assert events(conn) == [
        ("Order-Items.v1", "insert", [row], []),
        ("Order-Items.v1", "update", [{**row, "qty": 3}], [row]),
        ("Order-Items.v1", "delete", [], [{**row, "qty": 3}]),
    ]
    assert SECRET not in cdc_hooks_dump(conn)
    result = cli(config, "uninstall")
    assert result.stdout.strip() == "- Order-Items.v1: removed"
    assert triggers(conn, '"Sales Dept"."Order Items"') == []


def test_a_quoted_column_dropped_keeps_writes_working(conn: Conn, make_config: MakeConfig,
                                                      cli: Cli) -> None:
    conn.execute('CREATE TABLE "T" ("Id" int PRIMARY KEY, "A" text, "B" text)')
    installed(make_config, cli, '[[hooks]]\nname = "t"\ntable = \'"T"\'\n')
    conn.execute('ALTER TABLE "T" DROP COLUMN "A"')
    conn.execute('INSERT INTO "T" VALUES (1, \'b\')')
    assert events(conn)[0][2] == [{"Id": 1, "B": "b"}]


def test_a_partitioned_table(conn: Conn, make_config: MakeConfig, cli: Cli) -> None:
    conn.execute("CREATE TABLE reading (id int, region text, value numeric, "
                 "PRIMARY KEY (id, region)) PARTITION BY LIST (region)")
    conn.execute("CREATE TABLE reading_eu PARTITION OF reading FOR VALUES IN ('eu')")
    conn.execute("CREATE TABLE reading_us PARTITION OF reading FOR VALUES IN ('us')")
    config = installed(make_config, cli, '[[hooks]]\nname = "reading"\ntable = "reading"\n'
                                         'events = ["insert", "update", "delete"]\n')
    assert cli(config, "check").exit_code == 0
    conn.execute("INSERT INTO reading VALUES (1, 'eu', 1.5), (2, 'us', 2.5)")
    conn.execute("UPDATE reading SET value = value * 2")
    conn.execute("UPDATE reading SET region = 'us' WHERE id = 1")  # moves between partitions
    conn.execute("DELETE FROM reading WHERE id = 2")
    got = [(kind, new, old) for _, kind, new, old in events(conn)]
    one_eu = {"id": 1, "region": "eu", "value": Decimal("3.0")}
    assert got == [
        ("insert", [{"id": 1, "region": "eu", "value": Decimal("1.5")},
                    {"id": 2, "region": "us", "value": Decimal("2.5")}], []),
        ("update", [one_eu, {"id": 2, "region": "us", "value": Decimal("5.0")}],
         [{"id": 1, "region": "eu", "value": Decimal("1.5")},
          {"id": 2, "region": "us", "value": Decimal("2.5")}]),
        ("update", [{**one_eu, "region": "us"}], [one_eu]),
        ("delete", [], [{"id": 2, "region": "us", "value": Decimal("5.0")}]),
    ]


def test_writes_addressed_to_a_partition_are_captured(conn: Conn, make_config: MakeConfig,
                                                      cli: Cli) -> None:
    conn.execute("CREATE TABLE reading (id int, region text, PRIMARY KEY (id, region)) "
                 "PARTITION BY LIST (region)")
    conn.execute("CREATE TABLE reading_eu PARTITION OF reading FOR VALUES IN ('eu')")
    installed(make_config, cli, '[[hooks]]\nname = "reading"\ntable = "reading"\n')
    conn.execute("INSERT INTO reading_eu VALUES (1, 'eu')")
    conn.execute("INSERT INTO reading VALUES (2, 'eu')")
    assert [new for _, _, new, _ in events(conn)] == [[{"id": 1, "region": "eu"}],
                                                      [{"id": 2, "region": "eu"}]]


def test_a_partition_added_after_install_is_drift_until_installed(
        conn: Conn, make_config: MakeConfig, cli: Cli) -> None:
    conn.execute("CREATE TABLE reading (id int, region text, PRIMARY KEY (id, region)) "
                 "PARTITION BY LIST (region)")
    config = installed(make_config, cli, '[[hooks]]\nname = "reading"\ntable = "reading"\n')
    conn.execute("CREATE TABLE reading_us PARTITION OF reading FOR VALUES IN ('us')")
    check = cli(config, "check")
    assert check.exit_code == 1
    assert "public.reading_us" in check.output
    assert "~ reading" in cli(config, "install").output
    assert cli(config, "check").exit_code == 0
    conn.execute("INSERT INTO reading_us VALUES (1, 'us')")
    assert len(outbox(conn)) == 1


# Bulk statements ------------------------------------------------------------------

def test_bulk_statements_are_recorded_in_chunks(person: Conn) -> None:
    n = 2500
    person.execute("INSERT INTO person (name, address) "
                   "SELECT 'name ' || g, 'addr ' || g FROM generate_series(1, %s) g", (n,))
    person.execute("UPDATE person SET address = upper(address)")
    person.execute("DELETE FROM person")
    recorded = events(person)
    # Chunks of a statement may come in any order; statements come in order.
    assert [kind for _, kind, _, _ in recorded] == ["insert"] * 3 + ["update"] * 3 + ["delete"] * 3
    assert sorted((kind, len(new), len(old)) for _, kind, new, old in recorded) == [
        ("delete", 0, 500), ("delete", 0, 1000), ("delete", 0, 1000),
        ("insert", 500, 0), ("insert", 1000, 0), ("insert", 1000, 0),
        ("update", 500, 500), ("update", 1000, 1000), ("update", 1000, 1000),
    ]
    by_kind: dict[str, list[dict[str, Any]]] = {"insert": [], "update": [], "delete": []}
    for _, kind, new, old in recorded:
        by_kind[kind] += new or old
        if kind == "update":
            assert [r["id"] for r in new] == [r["id"] for r in old]
            assert all(r["address"] == o["address"].upper() for r, o in zip(new, old, strict=True))
    for kind, rows in by_kind.items():
        assert sorted(r["id"] for r in rows) == list(range(1, n + 1)), kind
    assert all(r["name"] == f"name {r['id']}" for r in by_kind["insert"])


# Column types -------------------------------------------------------------------------

TYPES_TABLE = """
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE typed (
    id uuid PRIMARY KEY,
    big_numeric numeric,
    money_like numeric(12, 2),
    big bigint,
    ratio double precision,
    flag boolean,
    at timestamptz,
    local_at timestamp,
    day date,
    doc json,
    docb jsonb,
    ints int[],
    texts text[],
    grid int[][],
    raw bytea,
    feeling mood,
    feelings mood[],
    note text
)
"""
BIG = "123456789012345678901234567890.123456789012345678901234567890"


def test_column_types_are_encoded_faithfully(conn: Conn, make_config: MakeConfig,
                                             cli: Cli) -> None:
    conn.execute(TYPES_TABLE)
    installed(make_config, cli, '[[hooks]]\nname = "typed"\ntable = "typed"\n')
    conn.execute("SET TIME ZONE 'UTC'")
    conn.execute(
        """INSERT INTO typed VALUES
        ('a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', %(big)s::numeric, 12.30, 9007199254740993,
         0.1, true, '2024-02-29 23:59:59.123456+02', '2024-01-01 00:00:00', '2024-12-31',
         '{"b": 1, "a": [1.10, "x"], "a": 2}', '{"nested": {"n": 1.000}}',
         '{1,NULL,3}', '{"a","b c","d\\"e"}', '{{1,2},{3,4}}', '\\x00ff10', 'happy',
         '{sad,ok}', E'tab\\tnewline\\n\\u00e9\\U0001F600'),
        ('b0eebc99-9c0b-4ef8-bb6d-6bb9bd380a12', 'NaN', NULL, NULL, 'Infinity', NULL, NULL,
         NULL, NULL, 'null', 'null', NULL, '{}', NULL, '', NULL, NULL, '')""",
        {"big": BIG},
    )
    first, second = events(conn)[0][2]
    assert first == {
        "id": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        "big_numeric": Decimal(BIG),
        "money_like": Decimal("12.30"),
        "big": 9007199254740993,  # above 2**53: exact, not a float
        "ratio": Decimal("0.1"),
        "flag": True,
        "at": "2024-02-29T21:59:59.123456+00:00",
        "local_at": "2024-01-01T00:00:00",
        "day": "2024-12-31",
        "doc": {"b": 1, "a": 2},  # json is normalised as jsonb would store it
        "docb": {"nested": {"n": Decimal("1.000")}},
        "ints": [1, None, 3],
        "texts": ["a", "b c", 'd"e'],
        "grid": [[1, 2], [3, 4]],
        "raw": "\\x00ff10",
        "feeling": "happy",
        "feelings": ["sad", "ok"],
        "note": "tab\tnewline\né\U0001f600",
    }
    assert str(first["big_numeric"]) == BIG  # every digit, no float rounding
    assert str(first["money_like"]) == "12.30"  # scale kept
    assert second == {
        "id": "b0eebc99-9c0b-4ef8-bb6d-6bb9bd380a12", "big_numeric": "NaN", "money_like": None,
        "big": None, "ratio": "Infinity", "flag": None, "at": None, "local_at": None,
        "day": None, "doc": None, "docb": None, "ints": None, "texts": [], "grid": None,
        "raw": "\\x", "feeling": None, "feelings": None, "note": "",
    }


def test_null_and_ragged_arrays_in_one_statement(conn: Conn, make_config: MakeConfig,
                                                 cli: Cli) -> None:
    # array_agg of array values fails on these; the capture must not break the write.
    conn.execute("CREATE TABLE tagged (id int PRIMARY KEY, tags text[], grid int[][])")
    installed(make_config, cli, '[[hooks]]\nname = "tagged"\ntable = "tagged"\n')
    conn.execute("INSERT INTO tagged VALUES (1, '{a}', '{{1}}'), (2, NULL, NULL), "
                 "(3, '{a,b,c}', '{{1,2},{3,4}}'), (4, '{}', '{}')")
    conn.execute("INSERT INTO tagged VALUES (5, NULL, NULL)")
    assert [new for _, _, new, _ in events(conn)] == [
        [{"id": 1, "tags": ["a"], "grid": [[1]]}, {"id": 2, "tags": None, "grid": None},
         {"id": 3, "tags": ["a", "b", "c"], "grid": [[1, 2], [3, 4]]},
         {"id": 4, "tags": [], "grid": []}],
        [{"id": 5, "tags": None, "grid": None}],
    ]


def test_a_composite_key(conn: Conn, make_config: MakeConfig, cli: Cli) -> None:
    conn.execute("CREATE TABLE membership (org int, member int, role text, "
                 "PRIMARY KEY (org, member))")
    conn.execute("CREATE TABLE nokey (a int NOT NULL UNIQUE, b text)")
    installed(make_config, cli, '[[hooks]]\nname = "m"\ntable = "membership"\n'
                                '[[hooks]]\nname = "n"\ntable = "nokey"\nkey = ["a"]\n')
    conn.execute("INSERT INTO membership VALUES (1, 2, 'admin')")
    conn.execute("INSERT INTO nokey VALUES (7, 'x')")
    assert [(hook, new) for hook, _, new, _ in events(conn)] == [
        ("m", [{"org": 1, "member": 2, "role": "admin"}]),
        ("n", [{"a": 7, "b": "x"}]),
    ]


# cdc_hooks.send() ----------------------------------------------------------------------

def test_send_from_sql(person: Conn) -> None:
    event_id = person.execute(
        "SELECT cdc_hooks.send('myhook', %s::jsonb)",
        ('{"name": "George Costanza", "address": "New York City"}',)).fetchone()[0]
    assert event_id % 1000 == 0
    (outbox_id,) = person.execute("SELECT max(id) FROM cdc_hooks.outbox").fetchone()
    assert event_id == outbox_id * 1000
    assert outbox(person) == [("myhook", "myhook", {"data": {
        "name": "George Costanza", "address": "New York City"}})]
    person.execute("SELECT cdc_hooks.send('myhook', '{}')")  # provides are optional
    assert outbox(person)[-1] == ("myhook", "myhook", {"data": {}})


def test_send_in_a_rolled_back_transaction_records_nothing(person: Conn) -> None:
    with person.transaction(force_rollback=True):
        person.execute("SELECT cdc_hooks.send('myhook', '{\"name\": \"x\"}')")
    assert outbox(person) == []


@pytest.mark.parametrize(("hook", "payload", "error", "message"), [
    ("nope", '{"name": "x"}', psycopg.errors.UndefinedObject, 'unknown hook "nope"'),
    ("myhook", '{"name": "x", "ssn": "1", "age": 3}', psycopg.errors.InvalidParameterValue,
     'hook "myhook" does not provide age, ssn'),
    ("person", '{"name": "x"}', psycopg.errors.WrongObjectType,
     'hook "person" is bound to table public.person; only custom hooks are sent'),
    ("myhook", '["name"]', psycopg.errors.InvalidParameterValue, "payload must be a JSON object"),
    ("myhook", "null", psycopg.errors.InvalidParameterValue, "payload must be a JSON object"),
])
def test_send_refuses(person: Conn, hook: str, payload: str, error: type[Exception],
                      message: str) -> None:
    with pytest.raises(error, match=message):
        person.execute("SELECT cdc_hooks.send(%s, %s::jsonb)", (hook, payload))
    assert outbox(person) == []


def test_send_with_sql_null_is_refused(person: Conn) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue):
        person.execute("SELECT cdc_hooks.send('myhook', NULL)")
    with pytest.raises(psycopg.errors.UndefinedObject):
        person.execute("SELECT cdc_hooks.send(NULL, '{}')")


# Custom hooks from the CLI and from Python ----------------------------------------------

def test_send_from_the_cli(person: Conn, make_config: MakeConfig, cli: Cli) -> None:
    config = make_config(PERSON + CUSTOM)
    result = cli(config, "send", "myhook", "name=George Costanza", "address:=null")
    assert result.exit_code == 0, result.output
    (outbox_id,) = person.execute("SELECT max(id) FROM cdc_hooks.outbox").fetchone()
    assert result.stdout.strip() == f"sent event evt_{outbox_id * 1000}"
    assert outbox(person) == [("myhook", "myhook", {"data": {"name": "George Costanza",
                                                             "address": None}})]


@pytest.mark.parametrize(("args", "message"), [
    (["myhook", "ssn=1"], 'hook "myhook" does not provide ssn'),
    (["nope", "name=x"], 'unknown hook "nope"'),
    (["person", "name=x"], 'hook "person" is bound to table public.person'),
])
def test_send_from_the_cli_refuses(person: Conn, make_config: MakeConfig, cli: Cli,
                                   args: list[str], message: str) -> None:
    result = cli(make_config(PERSON + CUSTOM), "send", *args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert outbox(person) == []


def test_send_from_python_joins_the_callers_transaction(person: Conn,
                                                       make_config: MakeConfig) -> None:
    with person.transaction(force_rollback=True):
        send("myhook", {"name": "Rolled back"}, connection=person)
    assert outbox(person) == []
    with person.transaction():
        event_id = send("myhook", {"name": "George"}, connection=person)
    assert event_id % 1000 == 0
    send("myhook", {"name": "Own connection"}, config=make_config(PERSON + CUSTOM))
    assert [p["data"]["name"] for _, _, p in outbox(person)] == ["George", "Own connection"]


def test_a_database_error_is_one_line_not_a_traceback(conn: Conn, make_config: MakeConfig, cli: Cli,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    role = f"cdc_hooks_nopriv_{os.getpid()}"
    conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        conn.execute("CREATE TABLE person (id int PRIMARY KEY, name text)")
        config = make_config('[[hooks]]\nname = "person"\ntable = "person"\n')
        monkeypatch.setenv("CDC_HOOKS_DSN", conninfo.make_conninfo(config.dsn or "", user=role))
        result = cli(config, "install")
        assert result.exit_code == 1
        assert result.stderr.startswith("error: PostgreSQL: permission denied")
        assert "Traceback" not in result.output
    finally:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,))
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_install_replaces_capture_functions_of_an_older_version(conn: Conn, make_config: MakeConfig,
                                                                cli: Cli) -> None:
    # A capture function generated by an older cdc-hooks (its template differed) is
    # replaced by the next install even though the hook itself did not change.
    create_person(conn)
    config = installed(make_config, cli, PERSON)
    conn.execute("CREATE OR REPLACE FUNCTION cdc_hooks.capture_person() RETURNS trigger "
                 "LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$")
    conn.execute("COMMENT ON FUNCTION cdc_hooks.capture_person() IS 'cdc-hooks capture old'")
    result = cli(config, "install")
    assert result.exit_code == 0, result.output
    assert "~ person" in result.output
    conn.execute("INSERT INTO person (name, address) VALUES ('Joe', 'NY')")
    assert len(outbox(conn)) == 1
    assert "no changes" in cli(config, "install").output


def test_columns_named_like_trigger_variables(conn: Conn, make_config: MakeConfig, cli: Cli) -> None:
    # Unqualified in the capture function, "new", "old" and "tg_argv" resolved to the
    # trigger's own variables and every write to the table failed.
    conn.execute('CREATE TABLE odd (id int PRIMARY KEY, "new" text, "old" text, tg_argv text)')
    installed(make_config, cli, '[[hooks]]\nname = "odd"\ntable = "odd"\n'
                                'events = ["insert", "update"]\n')
    conn.execute("INSERT INTO odd VALUES (1, 'n', 'o', 't')")
    conn.execute("UPDATE odd SET \"new\" = 'n2'")
    assert [(kind, new) for _, kind, new, _ in events(conn)] == [
        ("insert", [{"id": 1, "new": "n", "old": "o", "tg_argv": "t"}]),
        ("update", [{"id": 1, "new": "n2", "old": "o", "tg_argv": "t"}]),
    ]
