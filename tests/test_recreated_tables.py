"""A hooked table dropped and created again (issue 13, item 1), on a real Django
project (tests/djangoapp), a real PostgreSQL, a real relay process and a
loopback receiver.

``manage.py migrate app zero && manage.py migrate app`` (and every test runner
that recreates tables) leaves the new table without the hook's triggers. Without
``[database] repair_triggers`` that is reported at once: the relay logs an
error naming hook and table, ``cdc_hooks_hook_capturing`` is 0, ``status``
exits 1, the web overview shows it. With it, the event trigger re-creates the
triggers with the table, and rows written after the recreation are delivered.
"""

from __future__ import annotations

import logging
import re
import secrets
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import Result
from django.core.management import call_command
from fastapi.testclient import TestClient
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from receivers import Receiver, RelayProcess, RelayProcesses, free_port, wait_until

from cdc_hooks import capturing
from cdc_hooks.capturing import HookCapture
from cdc_hooks.config import Config
from cdc_hooks.web import create_app

Conn = psycopg.Connection[Any]
MakeConfig = Callable[..., Config]
Cli = Callable[..., Result]

TABLE = "public.djangoapp_person"
TOKEN = "recreated-token-0123456789abcdef"
HOOK = f"""
[[hooks]]
name = "person"
table = "djangoapp_person"
events = ["insert", "update", "delete"]
provides = ["name", "address"]

[delivery]
allow_private_networks = true

[web]
token = "{TOKEN}"
"""
REPAIR = "repair_triggers = true\n"  # right after make_config's [database] dsn


@pytest.fixture
def app(django_settings: None, clean_db: str) -> Iterator[Any]:
    """The Django app's Person model, its table migrated on the clean database."""
    from django.db import connections
    from djangoapp.models import Person

    migrate()
    yield Person
    connections.close_all()  # the next test's clean_db ends the sessions anyway


@pytest.fixture
def relays(tmp_path: Any) -> Iterator[Callable[..., RelayProcess]]:
    processes = RelayProcesses(tmp_path)
    yield processes.start
    processes.cleanup()


def migrate(*target: str) -> None:
    """manage.py migrate djangoapp [zero]."""
    call_command("migrate", "djangoapp", *target, verbosity=0)


def recreate() -> None:
    migrate("zero")
    migrate()


def installed(make_config: MakeConfig, cli: Cli, body: str, receiver: Receiver) -> Config:
    config = make_config(body)
    result = cli(config, "install")
    assert result.exit_code == 0, result.output
    listener = cli(config, "listeners", "add", "person", receiver.url("/person"))
    assert listener.exit_code == 0, listener.output
    return config


def scrape(port: int) -> str:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics",
                                     headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read().decode()


def capturing_gauge(port: int) -> float:
    found = re.search(r'^cdc_hooks_hook_capturing\{hook="person"\} (\S+)$', scrape(port), re.M)
    assert found, scrape(port)
    return float(found.group(1))


def names(receiver: Receiver) -> list[str]:
    return [body["data"]["name"] for body in receiver.bodies("/person")]


def overview(config: Config) -> tuple[str, dict[str, Any]]:
    """The web overview page (logged in) and GET /api/status."""
    with TestClient(create_app(config), base_url="https://testserver") as client:
        api = client.get("/api/status", headers={"Authorization": f"Bearer {TOKEN}"}).json()
        page = client.get("/login")
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
        client.post("/login", data={"csrf": csrf, "token": TOKEN, "next": "/"})
        return client.get("/").text, api


# Without repair: told, loudly and at once ---------------------------------------


def test_a_table_recreated_by_django_is_reported_at_once(app: Any, make_config: MakeConfig,
                                                         cli: Cli, receiver: Receiver,
                                                         relays: Callable[..., RelayProcess]) -> None:
    config = installed(make_config, cli, HOOK, receiver)
    port = free_port()
    relay = relays(config, "--metrics", f"127.0.0.1:{port}")
    app.objects.create(name="Joe", address="Elm Street")
    receiver.wait_for(1, "/person")
    assert capturing_gauge(port) == 1
    assert cli(config, "status").exit_code == 0

    recreate()  # migrate djangoapp zero && migrate djangoapp

    error = wait_until(lambda: [line for line in relay.log().splitlines()
                                if "is not capturing" in line], message="the relay's error")
    assert len(error) == 1 and " ERROR " in error[0], error
    assert f'hook "person" is not capturing changes of {TABLE}: triggers ' \
           f"cdc_hooks_person_delete on {TABLE}, cdc_hooks_person_insert on {TABLE}, " \
           f"cdc_hooks_person_update on {TABLE} are missing" in error[0]
    assert "run cdc-hooks install" in error[0]
    assert capturing_gauge(port) == 0
    status = cli(config, "status")
    assert status.exit_code == 1, status.output
    assert re.search(rf"^person +{TABLE} +triggers cdc_hooks_person_delete", status.stdout, re.M)
    page, api = overview(config)
    assert "Hooks not capturing" in page and "cdc_hooks_person_insert on" in page
    assert [(h["hook"], h["table"]) for h in api["hooks_not_capturing"]] == [("person", TABLE)]

    assert cli(config, "install").exit_code == 0  # the fix the error names
    wait_until(lambda: 'hook "person" is capturing changes of' in relay.log(),
               message="capturing again")
    assert capturing_gauge(port) == 1
    assert cli(config, "status").exit_code == 0
    app.objects.create(name="Back", address="Main Street")
    receiver.wait_for(2, "/person")
    assert names(receiver) == ["Joe", "Back"]


def test_the_relay_logs_each_change_once() -> None:
    """Once per transition, not every round (the relay checks every few seconds)."""
    watch = capturing.Watch()
    gone = HookCapture("person", "public.person", "table public.person does not exist")
    ok = HookCapture("person", "public.person", None)
    logger = logging.getLogger("cdc_hooks.relay")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        for states in ([ok], [ok], [gone], [gone], [gone], [ok], [ok], [gone]):
            watch.note(states)
    finally:
        logger.removeHandler(handler)
    assert [(r.levelname, r.getMessage().split(":")[0]) for r in records] == [
        ("ERROR", 'hook "person" is not capturing changes of public.person'),
        ("WARNING", 'hook "person" is capturing changes of public.person again'),
        ("ERROR", 'hook "person" is not capturing changes of public.person'),
    ]


# With repair_triggers: the triggers come back with the table --------------------


def test_repair_triggers_keeps_a_django_migrate_cycle_capturing(
        app: Any, make_config: MakeConfig, cli: Cli, receiver: Receiver,
        relays: Callable[..., RelayProcess]) -> None:
    config = installed(make_config, cli, REPAIR + HOOK, receiver)
    relay = relays(config)
    app.objects.create(name="Joe", address="Elm Street")
    receiver.wait_for(1, "/person")

    recreate()
    app.objects.create(name="After", address="Oak Street")
    row = app.objects.get(name="After")
    row.address = "Pine Street"
    row.save()
    recreate()  # and again: every cycle
    app.objects.create(name="Again", address="Ash Street")

    receiver.wait_for(4, "/person")
    assert [(b["event"], b["data"]["name"], b["data"]["address"])
            for b in receiver.bodies("/person")] == [
        ("insert", "Joe", "Elm Street"), ("insert", "After", "Oak Street"),
        ("update", "After", "Pine Street"), ("insert", "Again", "Ash Street")]
    assert "not capturing" not in relay.log()
    assert cli(config, "status").exit_code == 0
    check = cli(config, "check")
    assert check.exit_code == 0, check.output


def test_install_repair_triggers_says_so_and_dry_run_shows_it(conn: Conn, make_config: MakeConfig,
                                                             cli: Cli) -> None:
    conn.execute("CREATE TABLE djangoapp_person (id serial PRIMARY KEY, name text, address text)")
    config = make_config(REPAIR + HOOK)
    script = cli(config, "install", "--dry-run")
    assert "CREATE EVENT TRIGGER cdc_hooks_repair_triggers ON ddl_command_end" in script.stdout
    result = cli(config, "install")
    assert "+ cdc_hooks_repair_triggers: re-creates a hook's triggers" in result.stdout
    assert cli(config, "install").stdout.startswith("no changes")
    off = make_config(HOOK)
    assert cli(off, "check").stdout.splitlines() == [
        "the event trigger cdc_hooks_repair_triggers is installed, but [database] "
        "repair_triggers is false (run cdc-hooks install as a superuser)"]
    assert "- cdc_hooks_repair_triggers: removed" in cli(off, "install").stdout
    assert conn.execute("SELECT count(*) FROM pg_event_trigger").fetchone() == (0,)


@pytest.fixture
def role(conn: Conn) -> Iterator[str]:
    """A login role that is not a superuser (roles are cluster-wide: dropped after)."""
    name = f"app_{secrets.token_hex(4)}"
    conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name)))
    yield name
    conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
    conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def test_repair_triggers_needs_a_superuser_and_says_so(conn: Conn, cli: Cli, clean_db: str,
                                                       role: str, tmp_path: Path) -> None:
    conn.execute("CREATE TABLE djangoapp_person (id serial PRIMARY KEY, name text, address text)")
    conn.execute(sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(
        sql.Identifier(conninfo_to_dict(clean_db)["dbname"]), sql.Identifier(role)))
    config = tmp_path / "as_role.toml"
    config.write_text(f'[database]\ndsn = "{make_conninfo(clean_db, user=role)}"\n{REPAIR}{HOOK}')
    for args in (("install",), ("install", "--dry-run")):
        result = cli(config, *args)
        assert result.exit_code == 2, result.output
        assert result.stderr.strip() == (
            "error: [database] repair_triggers = true: creating the event trigger "
            f'cdc_hooks_repair_triggers needs a superuser, and role "{role}" is not one '
            "(PostgreSQL lets only superusers create and own event triggers); run install as a "
            "superuser, or set repair_triggers = false")
    assert conn.execute("SELECT to_regnamespace('cdc_hooks')").fetchone() == (None,)


# The event trigger's cases, in SQL -------------------------------------------------

PERSON_TABLE = "CREATE TABLE {} (id serial PRIMARY KEY, name text, address text)"


@pytest.fixture
def repairing(conn: Conn, make_config: MakeConfig, cli: Cli) -> Config:
    """The person hook installed with repair_triggers, on public.person."""
    conn.execute(PERSON_TABLE.format("person"))
    config = make_config(REPAIR + HOOK.replace('"djangoapp_person"', '"person"'))
    result = cli(config, "install")
    assert result.exit_code == 0, result.output
    return config


def captured(conn: Conn) -> list[tuple[str, str, dict[str, Any]]]:
    return [(hook, kind, payload) for hook, kind, payload in conn.execute(
        "SELECT hook, kind, payload FROM cdc_hooks.outbox ORDER BY id")]


def person_triggers(conn: Conn, table: str = "person") -> list[str]:
    return [r[0] for r in conn.execute(
        "SELECT tgname FROM pg_trigger WHERE tgrelid = %s::regclass AND NOT tgisinternal "
        "ORDER BY tgname", (table,))]


ALL = ["cdc_hooks_person_delete", "cdc_hooks_person_insert", "cdc_hooks_person_update"]


def test_a_table_renamed_to_the_hooks_name_gets_its_triggers(repairing: Config, conn: Conn,
                                                            role: str) -> None:
    conn.execute(PERSON_TABLE.format("person_new"))
    conn.execute(sql.SQL("GRANT INSERT, SELECT ON person_new TO {}; "
                         "GRANT USAGE ON SEQUENCE person_new_id_seq TO {}").format(
        sql.Identifier(role), sql.Identifier(role)))
    assert person_triggers(conn, "person_new") == []  # not the hook's name: left alone
    with conn.transaction():
        conn.execute("DROP TABLE person")
        conn.execute("ALTER TABLE person_new RENAME TO person")
    assert person_triggers(conn) == ALL
    # Written by an application role: the outbox's row check knows the new table.
    conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
    conn.execute("INSERT INTO person (name, address) VALUES ('Joe', 'Elm')")
    conn.execute("RESET ROLE")
    assert captured(conn) == [("person", "insert", {"new": {"id": [1], "name": ["Joe"],
                                                            "address": ["Elm"]}})]


def test_a_table_recreated_by_another_role_gets_its_triggers(repairing: Config, conn: Conn,
                                                             role: str, cli: Cli) -> None:
    """The event trigger runs for every role's DDL, and creates the triggers as the
    installer: the application role may not attach the capture function itself."""
    conn.execute("DROP TABLE person")
    conn.execute(sql.SQL("GRANT CREATE ON SCHEMA public TO {}").format(sql.Identifier(role)))
    conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("CREATE TABLE mine (id int); CREATE TRIGGER t AFTER INSERT ON mine "
                     "FOR EACH STATEMENT EXECUTE FUNCTION cdc_hooks.capture_person()")
    conn.execute(PERSON_TABLE.format("person"))
    conn.execute("INSERT INTO person (name) VALUES ('Joe')")
    conn.execute("RESET ROLE")
    assert person_triggers(conn) == ALL
    assert [kind for _, kind, _ in captured(conn)] == ["insert"]
    assert cli(repairing, "check").exit_code == 0


def test_partitions_of_a_recreated_partitioned_table_get_their_triggers(
        conn: Conn, make_config: MakeConfig, cli: Cli) -> None:
    ddl = ("CREATE TABLE measure (id int, at date, v int, PRIMARY KEY (id, at)) "
           "PARTITION BY RANGE (at); "
           "CREATE TABLE measure_2024 PARTITION OF measure FOR VALUES FROM ('2024-01-01') "
           "TO ('2025-01-01')")
    conn.execute(ddl)
    config = make_config(REPAIR + '[[hooks]]\nname = "measure"\ntable = "measure"\n')
    assert cli(config, "install").exit_code == 0
    conn.execute("DROP TABLE measure")
    conn.execute(ddl)
    conn.execute("CREATE TABLE measure_2025 (LIKE measure)")
    conn.execute("ALTER TABLE measure ATTACH PARTITION measure_2025 FOR VALUES "
                 "FROM ('2025-01-01') TO ('2026-01-01')")
    expected = ["cdc_hooks_measure_insert", "cdc_hooks_measure_update"]
    for table in ("measure", "measure_2024", "measure_2025"):
        assert person_triggers(conn, table) == expected, table
    conn.execute("INSERT INTO measure VALUES (1, '2024-05-01', 10)")
    conn.execute("INSERT INTO measure_2025 VALUES (2, '2025-05-01', 20)")  # the partition directly
    assert [p["new"]["v"] for _, _, p in captured(conn)] == [[10], [20]]
    assert cli(config, "check").exit_code == 0


def test_a_recreated_table_without_a_provided_column_is_captured_without_it(
        repairing: Config, conn: Conn, cli: Cli) -> None:
    conn.execute("DROP TABLE person")
    conn.execute("CREATE TABLE person (id serial PRIMARY KEY, name text)")
    conn.execute("INSERT INTO person (name) VALUES ('Joe')")
    assert captured(conn) == [("person", "insert", {"new": {"id": [1], "name": ["Joe"]}})]
    check = cli(repairing, "check")
    assert check.exit_code == 1
    assert 'hook "person": column "address" no longer exists in public.person' in check.stdout


def test_a_failed_repair_never_fails_the_ddl(repairing: Config, conn: Conn, cli: Cli) -> None:
    warnings: list[str] = []
    conn.add_notice_handler(lambda notice: warnings.append(
        f"{notice.severity_nonlocalized}: {notice.message_primary}"))
    conn.execute("DROP TABLE person")
    conn.execute("DROP FUNCTION cdc_hooks.capture_person()")
    conn.execute(PERSON_TABLE.format("person"))  # succeeds, with a warning
    assert person_triggers(conn) == []
    assert warnings == ['WARNING: cdc_hooks: the triggers of hook "person" could not be re-created '
                        "on public.person: function cdc_hooks.capture_person() does not exist"]
    conn.execute("INSERT INTO person (name) VALUES ('Joe')")  # the application goes on
    assert cli(repairing, "status").exit_code == 1


def test_unrelated_ddl_is_left_alone(repairing: Config, conn: Conn) -> None:
    notices: list[str] = []
    conn.add_notice_handler(lambda notice: notices.append(notice.message_primary))
    conn.execute("CREATE TABLE other (id int PRIMARY KEY); ALTER TABLE other ADD COLUMN x text; "
                 "CREATE TABLE other2 AS SELECT 1 AS a; ALTER TABLE person ADD COLUMN y int")
    assert person_triggers(conn, "other") == person_triggers(conn, "other2") == []
    assert person_triggers(conn) == ALL
    assert notices == []
