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

from cdc_hooks.config import Config

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
