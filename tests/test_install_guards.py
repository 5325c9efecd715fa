"""What install refuses beside a live application (issue 13, items 2 and 6), on a
real PostgreSQL through the CLI:

- a config change that strands listeners (a removed hook, a matched field no
  longer provided, an event no longer captured) is refused, naming each
  listener and why, unless --force, which pauses them with the reason shown by
  ``listeners list``, ``status``, the API and the web listeners page;
- a key that does not identify a row (no unique index on NOT NULL columns, or
  NULLS NOT DISTINCT) is refused, naming hook, table and key.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from click.testing import Result
from fastapi.testclient import TestClient

from cdc_hooks.config import Config
from cdc_hooks.web import create_app

Conn = psycopg.Connection[Any]
MakeConfig = Callable[..., Config]
Cli = Callable[..., Result]

TOKEN = "guards-token-0123456789abcdef"
SETTINGS = f'\n[delivery]\nallow_private_networks = true\n\n[web]\ntoken = "{TOKEN}"\n'


def person_hook(provides: str = '"name", "address"', events: str = '"insert", "update"') -> str:
    return (f'[[hooks]]\nname = "person"\ntable = "person"\nevents = [{events}]\n'
            f"provides = [{provides}]\n")


OTHER = '[[hooks]]\nname = "other"\nprovides = ["x"]\n'


@pytest.fixture
def person(conn: Conn, make_config: MakeConfig, cli: Cli) -> Config:
    """person installed, with an Elm listener, an everything listener and one on other."""
    conn.execute("CREATE TABLE person (id serial PRIMARY KEY, name text, address text)")
    config = make_config(person_hook() + OTHER + SETTINGS)
    assert cli(config, "install").exit_code == 0
    for args in (("person", "http://127.0.0.1:9/elm", "--match", "address=contains:Elm"),
                 ("person", "http://127.0.0.1:9/all"),
                 ("other", "http://127.0.0.1:9/other", "--match", "x=1")):
        result = cli(config, "listeners", "add", *args)
        assert result.exit_code == 0, result.output
    return config


def listener_states(conn: Conn) -> list[tuple[int, str, str | None]]:
    return [tuple(r) for r in conn.execute(  # type: ignore[misc]
        "SELECT id, state, disabled_reason FROM cdc_hooks.listeners ORDER BY id")]


def hook_row(conn: Conn, name: str) -> tuple[Any, ...] | None:
    return conn.execute("SELECT events, provides FROM cdc_hooks.hooks WHERE name = %s",
                        (name,)).fetchone()


def errors(result: Result) -> list[str]:
    return [line.removeprefix("error: ") for line in result.stderr.splitlines()]


# Item 2: stranded listeners ----------------------------------------------------

NARROWED_PROVIDES = 'listener 1 of hook "person": match field "address" is no longer provided ' \
                    "(provides: name)"
NARROWED_EVENTS = 'listener {} of hook "person": event "update" is no longer captured (events: insert)'
REMOVED = 'listener 3 of hook "other": hook "other" is removed from the config'

CHANGES = [
    (person_hook('"name"') + OTHER, [NARROWED_PROVIDES]),
    (person_hook(events='"insert"') + OTHER,
     [NARROWED_EVENTS.format(1), NARROWED_EVENTS.format(2)]),
    (person_hook(), [REMOVED]),
]


@pytest.mark.parametrize(("body", "stranded"), CHANGES, ids=["provides", "events", "removed"])
def test_install_refuses_a_change_that_strands_listeners(person: Config, conn: Conn,
                                                         make_config: MakeConfig, cli: Cli,
                                                         body: str, stranded: list[str]) -> None:
    before = (listener_states(conn), hook_row(conn, "person"), hook_row(conn, "other"))
    narrowed = make_config(body + SETTINGS)
    for args in (("install",), ("install", "--dry-run")):
        result = cli(narrowed, *args)
        assert result.exit_code == 2, result.output
        lines = errors(result)
        assert lines[0].startswith("install would leave listeners unable to receive")
        assert lines[1:-1] == stranded
        assert "install --force" in lines[-1]
        assert result.stdout == ""  # the dry run prints no script either
    assert (listener_states(conn), hook_row(conn, "person"), hook_row(conn, "other")) == before


@pytest.mark.parametrize(("body", "stranded"), CHANGES, ids=["provides", "events", "removed"])
def test_install_force_pauses_the_stranded_listeners_with_the_reason(
        person: Config, conn: Conn, make_config: MakeConfig, cli: Cli, body: str,
        stranded: list[str]) -> None:
    narrowed = make_config(body + SETTINGS)
    script = cli(narrowed, "install", "--dry-run", "--force")
    assert script.exit_code == 0, script.output
    assert script.stdout.count("UPDATE cdc_hooks.listeners") == len(stranded)
    result = cli(narrowed, "install", "--force")
    assert result.exit_code == 0, result.output
    reasons = {int(re.match(r"listener (\d+)", s).group(1)):  # type: ignore[union-attr]
               "paused by install: " + s.split(": ", 1)[1] for s in stranded}
    for listener_id, reason in reasons.items():
        assert f"! listener {listener_id} paused: {reason.removeprefix('paused by install: ')}" \
            in result.stdout
    assert listener_states(conn) == [
        (i, "paused", reasons[i]) if i in reasons else (i, "active", None) for i in (1, 2, 3)]

    listed = cli(narrowed, "listeners", "list").stdout
    status = cli(narrowed, "status")
    assert status.exit_code == 0, status.output
    for listener_id, reason in reasons.items():
        assert f"paused ({reason})" in listed
        assert re.search(rf"^{listener_id} .* paused +{re.escape(reason)}$", status.stdout, re.M)
    with TestClient(create_app(narrowed), base_url="https://testserver") as client:
        api = client.get("/api/listeners", headers={"Authorization": f"Bearer {TOKEN}"}).json()
        assert {item["id"]: item["disabled_reason"] for item in api
                if item["state"] == "paused"} == reasons
        page = logged_in(client).get("/listeners").text
        for reason in reasons.values():
            assert escape(reason) in page
    assert cli(narrowed, "check").exit_code == 0  # in line: nothing left to report


def test_a_listener_the_change_leaves_matching_is_not_stranded(person: Config, conn: Conn,
                                                               make_config: MakeConfig,
                                                               cli: Cli) -> None:
    conn.execute("DELETE FROM cdc_hooks.listeners WHERE id = 1")  # the one matching address
    result = cli(make_config(person_hook('"name"') + OTHER + SETTINGS), "install")
    assert result.exit_code == 0, result.output
    assert hook_row(conn, "person") == (["insert", "update"], ["name"])
    assert [s for _, s, _ in listener_states(conn)] == ["active", "active"]


def test_a_stranded_listener_cannot_be_resumed(person: Config, conn: Conn,
                                               make_config: MakeConfig, cli: Cli) -> None:
    narrowed = make_config(person_hook('"name"') + SETTINGS)
    assert cli(narrowed, "install", "--force").exit_code == 0
    for listener_id, why in ((1, 'match field "address": hook "person" does not provide it'),
                             (3, 'unknown hook "other"')):
        result = cli(narrowed, "listeners", "resume", str(listener_id))
        assert result.exit_code == 2
        assert result.stderr.startswith(f"error: listener {listener_id} cannot be resumed: {why}")
    assert [s for _, s, _ in listener_states(conn)] == ["paused", "active", "paused"]
    assert cli(narrowed, "listeners", "pause", "2").exit_code == 0
    assert cli(narrowed, "listeners", "resume", "2").exit_code == 0  # an unaffected one resumes


def logged_in(client: TestClient) -> TestClient:
    csrf = re.search(r'name="csrf" value="([^"]+)"', client.get("/login").text).group(1)  # type: ignore[union-attr]
    response = client.post("/login", data={"csrf": csrf, "token": TOKEN, "next": "/"},
                           follow_redirects=False)
    assert response.status_code == 303, response.text
    return client


def escape(text: str) -> str:
    return text.replace("&", "&amp;").replace('"', "&#34;").replace("<", "&lt;").replace(">", "&gt;")


# Item 6: a key must identify a row ---------------------------------------------

KEY_TABLES = [
    # (table, key, refused: the error's explanation, or None when accepted)
    ("CREATE TABLE t (a int, b text)", '["a"]',
     "no primary key, unique constraint or unique index is on these columns (or some of them)"),
    ("CREATE TABLE t (a int UNIQUE, b text)", '["a"]',
     'unique index "t_a_key" (a) lets rows with NULLs in it repeat'),
    ("CREATE TABLE t (a int NOT NULL, b text); CREATE UNIQUE INDEX t_a ON t (a) WHERE a > 0",
     '["a"]', "no primary key, unique constraint or unique index is on these columns"),
    ("CREATE TABLE t (a int NOT NULL, b text); CREATE UNIQUE INDEX t_a ON t ((a + 1))",
     '["a"]', "no primary key, unique constraint or unique index is on these columns"),
    ("CREATE TABLE t (a int NOT NULL, b text NOT NULL, UNIQUE (a, b))", '["a"]',
     "no primary key, unique constraint or unique index is on these columns"),
    ("CREATE TABLE t (a int NOT NULL UNIQUE, b text)", '["a"]', None),
    ("CREATE TABLE t (a int NOT NULL UNIQUE, b text)", '["a", "b"]', None),  # a subset will do
    ("CREATE TABLE t (a int NOT NULL, b text NOT NULL); CREATE UNIQUE INDEX t_ab ON t (b, a) "
     "INCLUDE (a)", '["a", "b"]', None),
    ("CREATE TABLE t (a int, b text); CREATE UNIQUE INDEX t_a ON t (a) NULLS NOT DISTINCT",
     '["a"]', None),
    ("CREATE TABLE t (a int PRIMARY KEY, b text)", '["a"]', None),
    ("CREATE TABLE t (a int, b text, PRIMARY KEY (a, b))", '["a", "b"]', None),
]


@pytest.mark.parametrize(("table", "key", "refused"), KEY_TABLES)
def test_install_requires_a_key_that_identifies_a_row(conn: Conn, make_config: MakeConfig,
                                                      cli: Cli, table: str, key: str,
                                                      refused: str | None) -> None:
    conn.execute(table)
    config = make_config(f'[[hooks]]\nname = "t"\ntable = "t"\nkey = {key}\n')
    result = cli(config, "install")
    if refused is None:
        assert result.exit_code == 0, result.output
        return
    assert result.exit_code == 2, result.output
    columns = ", ".join(re.findall(r'"(\w+)"', key))
    assert result.stderr.startswith(
        f'error: hook "t": key ({columns}) does not identify a row of public.t: {refused}')
    assert "ADD UNIQUE" in result.stderr and "NULLS NOT DISTINCT" in result.stderr
    assert conn.execute("SELECT to_regnamespace('cdc_hooks')").fetchone() == (None,)  # nothing done


def test_with_a_unique_key_backfill_queues_every_row(conn: Conn, make_config: MakeConfig,
                                                     cli: Cli) -> None:
    """What the rule protects: backfill pages by key, so rows sharing one were lost
    (1 of 2 queued); with the key unique there are none to lose."""
    conn.execute("CREATE TABLE t (a int, b text)")
    conn.execute("INSERT INTO t VALUES (1, 'x'), (1, 'y')")
    config = make_config('[[hooks]]\nname = "t"\ntable = "t"\nkey = ["a"]\n')
    assert cli(config, "install").exit_code == 2  # two rows, one key: refused
    conn.execute("DELETE FROM t WHERE b = 'y'")
    conn.execute("INSERT INTO t VALUES (2, 'y')")
    conn.execute("ALTER TABLE t ALTER a SET NOT NULL, ADD UNIQUE (a)")
    assert cli(config, "install").exit_code == 0
    result = cli(config, "backfill", "t")
    assert result.exit_code == 0, result.output
    assert "2 rows of t queued" in result.stdout
