"""The trust boundary with the application's role (issue 12, items 1 and 2).

An application role that owns its tables, with no grant on cdc_hooks, tries to
reach past its own rows through capture: a cast to json of its own type that
runs inside the capture function (on the normal and the fallback path), another
hook's capture function attached to its own table, forged outbox rows, and the
built-in or other custom hooks. Real roles on real PostgreSQL, install run as a
superuser (the strongest rights a cast could have borrowed)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

Conn = psycopg.Connection[Any]

CONFIG = """
[[hooks]]
name = "items"
table = "items"
provides = ["name", "note"]

[[hooks]]
name = "accounts"
table = "accounts"
provides = ["balance"]

[[hooks]]
name = "myhook"
provides = ["message"]
{senders}
"""

# A cast to json that tries, with whatever rights it runs with, to become
# superuser, read the listeners' secrets and forge an event for accounts.
# Each attempt swallows its own error, so the write goes on either way.
EVIL_CAST = """
CREATE TYPE evil AS ENUM ('y');
CREATE TABLE loot (what text);
CREATE FUNCTION evil_json(evil) RETURNS json LANGUAGE plpgsql AS $$
BEGIN
    BEGIN
        EXECUTE format('ALTER ROLE %I SUPERUSER', session_user);
    EXCEPTION WHEN OTHERS THEN NULL;
    END;
    BEGIN
        INSERT INTO loot SELECT secret FROM cdc_hooks.listeners;
    EXCEPTION WHEN OTHERS THEN NULL;
    END;
    BEGIN
        INSERT INTO cdc_hooks.outbox (hook, kind, payload, source)
        VALUES ('accounts', 'insert', '{"new": {"id": [666], "balance": [1000000]}}',
                'accounts'::regclass);
    EXCEPTION WHEN OTHERS THEN NULL;
    END;
    RETURN '"evil"'::json;
END
$$;
CREATE CAST (evil AS json) WITH FUNCTION evil_json(evil);
"""


@pytest.fixture
def app_role(conn: Conn) -> Iterator[str]:
    """A login role owning the table items; accounts belongs to someone else."""
    name = f"cdc_app_{secrets.token_hex(3)}"
    role = sql.Identifier(name)
    conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(role))
    try:
        conn.execute("CREATE TABLE accounts (id serial PRIMARY KEY, balance int)")
        conn.execute("CREATE TABLE items (id serial PRIMARY KEY, name text, note text)")
        conn.execute(sql.SQL("ALTER TABLE items OWNER TO {}").format(role))
        conn.execute(sql.SQL("GRANT CREATE ON SCHEMA public TO {}").format(role))
        yield name
    finally:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                     (name,))
        conn.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(role))
        conn.execute(sql.SQL("DROP ROLE {}").format(role))


def install(make_config, cli, senders: str = "") -> Any:
    config = make_config(CONFIG.format(senders=senders))
    result = cli(config, "install")
    assert result.exit_code == 0, result.output
    return config


def connect_as(clean_db: str, role: str) -> Conn:
    return psycopg.connect(make_conninfo(clean_db, user=role), autocommit=True)


def assert_nothing_gained(conn: Conn, role: str) -> None:
    assert conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = %s",
                        (role,)).fetchone() == (False,)
    assert conn.execute("SELECT count(*) FROM loot").fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM cdc_hooks.outbox WHERE hook = 'accounts'"
                        ).fetchone() == (0,)


def test_a_cast_in_a_provided_column_runs_with_the_writers_rights(
        conn, clean_db, app_role, make_config, cli):
    install(make_config, cli)
    conn.execute("INSERT INTO cdc_hooks.listeners (hook, url, secret) "
                 "VALUES ('items', 'https://example.com/h', 'whsec_c2VjcmV0')")
    with connect_as(clean_db, app_role) as app:
        app.execute(EVIL_CAST)
        app.execute("ALTER TABLE items ALTER COLUMN note TYPE evil USING note::evil")
        app.execute("INSERT INTO items (name, note) VALUES ('x', 'y')")
    assert_nothing_gained(conn, app_role)
    # The write was captured, as the writer's cast made it.
    payload = conn.execute("SELECT payload::text FROM cdc_hooks.outbox WHERE hook = 'items'"
                           ).fetchone()
    assert payload is not None and '"evil"' in payload[0]


def test_a_cast_in_an_unprovided_column_on_the_fallback_path_gains_nothing(
        conn, clean_db, app_role, make_config, cli):
    install(make_config, cli)
    with connect_as(clean_db, app_role) as app:
        app.execute(EVIL_CAST)
        app.execute("ALTER TABLE items ADD COLUMN hidden evil")
        # A provided column dropped: the trigger falls back to to_jsonb of whole rows.
        app.execute("ALTER TABLE items DROP COLUMN note")
        app.execute("INSERT INTO items (name, hidden) VALUES ('x', 'y')")
    assert_nothing_gained(conn, app_role)
    row = conn.execute("SELECT payload::text FROM cdc_hooks.outbox WHERE hook = 'items'").fetchone()
    assert row is not None and "hidden" not in row[0]


def test_another_hooks_capture_function_cannot_be_attached(conn, clean_db, app_role,
                                                           make_config, cli):
    install(make_config, cli)
    with connect_as(clean_db, app_role) as app:
        app.execute("CREATE TEMP TABLE fake (id int, balance int)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            app.execute("CREATE TRIGGER forge AFTER INSERT ON fake REFERENCING NEW TABLE AS "
                        "new_rows FOR EACH STATEMENT EXECUTE FUNCTION "
                        "cdc_hooks.capture_accounts('accounts', '{id,balance}')")


@pytest.mark.parametrize("source", ["'accounts'::regclass", "'items'::regclass", "NULL"])
def test_the_outbox_refuses_events_for_a_table_the_writer_cannot_write(
        conn, clean_db, app_role, make_config, cli, source):
    install(make_config, cli)
    with connect_as(clean_db, app_role) as app:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            app.execute("INSERT INTO cdc_hooks.outbox (hook, kind, payload, source) VALUES "
                        f"('accounts', 'insert', '{{}}', {source})")  # type: ignore[arg-type]
        # Its own table, its own hook: allowed (it could write the row anyway).
        app.execute("INSERT INTO cdc_hooks.outbox (hook, kind, payload, source) VALUES "
                    "('items', 'insert', '{\"new\": {}}', 'items'::regclass)")
        # No id of its choosing: it could take the one another writer's row is about to get.
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            app.execute("INSERT INTO cdc_hooks.outbox (id, hook, kind, payload, source) "
                        "OVERRIDING SYSTEM VALUE VALUES "
                        "(99999, 'items', 'insert', '{}', 'items'::regclass)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            app.execute("SELECT secret FROM cdc_hooks.listeners")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            app.execute("SELECT * FROM cdc_hooks.outbox")


def test_custom_and_built_in_hooks_are_sent_only_by_their_senders(conn, clean_db, app_role,
                                                                  make_config, cli):
    install(make_config, cli)
    with connect_as(clean_db, app_role) as app:
        for hook in ("cdc_hooks.listener_disabled", "myhook"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="may not send"):
                app.execute("SELECT cdc_hooks.send(%s, '{}')", (hook,))
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                app.execute("INSERT INTO cdc_hooks.outbox (hook, kind, payload) "
                            "VALUES (%s, %s, '{\"data\": {}}')", (hook, hook))
    assert conn.execute("SELECT count(*) FROM cdc_hooks.outbox").fetchone() == (0,)

    install(make_config, cli, senders=f'senders = ["{app_role}"]')
    with connect_as(clean_db, app_role) as app:
        event = app.execute("SELECT cdc_hooks.send('myhook', '{\"message\": \"hi\"}')").fetchone()
        assert event is not None and event[0] > 0
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="built-in"):
            app.execute("SELECT cdc_hooks.send('cdc_hooks.listener_disabled', '{}')")
    assert conn.execute("SELECT id * 1000, hook FROM cdc_hooks.outbox").fetchall() == [
        (event[0], "myhook")]


def test_a_sender_that_does_not_exist_is_refused_at_install(conn, make_config, cli):
    conn.execute("CREATE TABLE accounts (id serial PRIMARY KEY, balance int)")
    conn.execute("CREATE TABLE items (id serial PRIMARY KEY, name text, note text)")
    result = cli(make_config(CONFIG.format(senders='senders = ["no_such_role_x"]')), "install")
    assert result.exit_code == 2
    assert 'hook "myhook": sender role "no_such_role_x" does not exist' in result.stderr
    assert conn.execute("SELECT to_regnamespace('cdc_hooks')").fetchone() == (None,)


def test_writers_with_grants_only_are_captured_on_tables_and_partitions(
        conn, clean_db, app_role, make_config, cli):
    """Column-level rights are enough, as PostgreSQL counts them for the statement;
    a write to a partition named directly is checked against that partition."""
    conn.execute("DROP TABLE accounts")
    conn.execute("CREATE TABLE accounts (id int PRIMARY KEY, balance int) PARTITION BY RANGE (id)")
    conn.execute("CREATE TABLE accounts_low PARTITION OF accounts FOR VALUES FROM (0) TO (100)")
    install(make_config, cli)
    role = sql.Identifier(app_role)
    conn.execute(sql.SQL("GRANT SELECT (id), INSERT (id, balance), UPDATE (balance) ON accounts "
                         "TO {}").format(role))
    conn.execute(sql.SQL("GRANT INSERT, SELECT ON accounts_low TO {}").format(role))
    with connect_as(clean_db, app_role) as app:
        app.execute("INSERT INTO accounts (id, balance) VALUES (1, 10)")
        app.execute("UPDATE accounts SET balance = 11 WHERE id = 1")
        app.execute("INSERT INTO accounts_low (id, balance) VALUES (2, 20)")
    assert conn.execute("SELECT kind, source::regclass::text FROM cdc_hooks.outbox ORDER BY id"
                        ).fetchall() == [("insert", "accounts"), ("update", "accounts"),
                                         ("insert", "accounts_low")]


def test_backfill_refuses_to_run_another_roles_cast(conn, clean_db, app_role, make_config, cli):
    """A backfill converts the table's values to JSON with the operator's rights: the
    application role's cast to json would run as the operator (here a superuser)."""
    config = install(make_config, cli)
    with connect_as(clean_db, app_role) as app:
        app.execute("INSERT INTO items (name, note) VALUES ('x', 'y')")
        app.execute(EVIL_CAST)
    refused = cli(config, "backfill", "items")
    assert refused.exit_code == 2
    assert "would run another role's code with your rights: evil (cast function owned by " \
           f"{app_role})" in refused.stderr
    assert_nothing_gained(conn, app_role)
    assert conn.execute("SELECT count(*) FROM cdc_hooks.outbox WHERE kind = 'read'"
                        ).fetchone() == (0,)


def test_backfill_refuses_to_run_another_roles_policy(conn, clean_db, app_role, tmp_path, cli):
    """A row-level security policy on the table would run its code with the rights of
    an installer that is not the owner (docs/permissions.sql's installer)."""
    installer = f"{app_role}_inst"
    role = sql.Identifier(installer)
    conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(role))
    try:
        conn.execute(sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(
            sql.Identifier(conn.info.dbname), role))
        conn.execute(sql.SQL("GRANT TRIGGER, SELECT, UPDATE (id) ON items, accounts TO {}"
                             ).format(role))
        path = tmp_path / "installer.toml"
        path.write_text(f'[database]\ndsn = "{make_conninfo(clean_db, user=installer)}"\n'
                        + CONFIG.format(senders=""))
        assert cli(path, "install").exit_code == 0
        with connect_as(clean_db, app_role) as app:
            app.execute("INSERT INTO items (name, note) VALUES ('x', 'y')")
            app.execute("CREATE TABLE loot (what text)")
            app.execute("CREATE FUNCTION spy() RETURNS boolean LANGUAGE plpgsql AS $$ BEGIN "
                        "INSERT INTO loot VALUES (current_user); RETURN true; "
                        "EXCEPTION WHEN OTHERS THEN RETURN true; END $$")
            app.execute("ALTER TABLE items ENABLE ROW LEVEL SECURITY")
            app.execute(sql.SQL("CREATE POLICY spying ON items TO {} USING (spy())").format(role))
        refused = cli(path, "backfill", "items")
        assert refused.exit_code == 2
        assert "row-level security" in refused.stderr and "run the backfill as" in refused.stderr
        assert conn.execute("SELECT count(*) FROM loot").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM cdc_hooks.outbox WHERE kind = 'read'"
                            ).fetchone() == (0,)
    finally:
        conn.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(role))
        conn.execute(sql.SQL("DROP ROLE {}").format(role))


def test_a_truncate_by_the_tables_owner_is_captured_with_no_grant(
        conn, clean_db, app_role, make_config, cli):
    config = make_config('[[hooks]]\nname = "items"\ntable = "items"\n'
                         'events = ["insert", "truncate"]\nprovides = ["name"]\n')
    assert cli(config, "install").exit_code == 0
    with connect_as(clean_db, app_role) as app:
        app.execute("INSERT INTO items (name) VALUES ('x')")
        app.execute("TRUNCATE items")
    assert conn.execute("SELECT kind, source = 'items'::regclass FROM cdc_hooks.outbox "
                        "ORDER BY id").fetchall() == [("insert", True), ("truncate", True)]
    assert conn.execute("SELECT payload::text FROM cdc_hooks.outbox WHERE kind = 'truncate'"
                        ).fetchone() == ("{}",)
