"""Permissions (issue 7): docs/permissions.sql, run as written, gives the
installer and the relay all they need and no more: install, listeners and
backfill as the installer; dispatch, delivery, 410 Gone, listener health and
pruning as the relay. Real roles on real PostgreSQL (dropped at the end)."""

from __future__ import annotations

import logging
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import Result
from psycopg import sql
from psycopg.conninfo import make_conninfo
from receivers import InProcessRelay, Reply, wait_until

from cdc_hooks import health, retention
from cdc_hooks.config import Config, load_config
from cdc_hooks.db import Database, query

Conn = psycopg.Connection[Any]
Cli = Callable[..., Result]
PERMISSIONS = Path(__file__).parent.parent / "docs" / "permissions.sql"
PSQL = shutil.which("psql") or pytest.skip("psql is needed to run docs/permissions.sql",
                                           allow_module_level=True)

CONFIG = """
[database]
dsn = "{dsn}"
relay_role = "{relay}"

[[hooks]]
name = "person"
table = "person"
provides = ["name"]

[delivery]
allow_private_networks = true
retry_schedule = [0.2]

[retention]
interval = {interval}
"""


def run_permissions_sql(dsn: str, variables: dict[str, str]) -> None:
    """docs/permissions.sql, run by psql exactly as its header says."""
    args = [part for name in ("installer", "relay", "database", "table", "key")
            for part in ("-v", f"{name}={variables[name]}")]
    subprocess.run([PSQL, "-X", "-q", "-v", "ON_ERROR_STOP=1", *args, "-f", str(PERMISSIONS),
                    "-d", dsn], check=True, capture_output=True, text=True)


@pytest.fixture
def roles(conn: Conn, clean_db: str) -> Iterator[dict[str, str]]:
    suffix = secrets.token_hex(3)
    names = {"installer": f"cdc_inst_{suffix}", "relay": f"cdc_relay_{suffix}",
             "app": f"cdc_app_{suffix}", "database": str(conn.info.dbname),
             "table": "public.person", "key": "id"}
    conn.execute("CREATE TABLE person (id serial PRIMARY KEY, name text, secret text)")
    app = sql.Identifier(names["app"])
    try:
        # The application's role: rights on its table only, none on cdc_hooks.
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(app))
        conn.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE ON person TO {}").format(app))
        conn.execute(sql.SQL("GRANT USAGE ON SEQUENCE person_id_seq TO {}").format(app))
        run_permissions_sql(clean_db, names)
        yield names
    finally:
        users = [names["installer"], names["relay"], names["app"]]
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                     "WHERE usename = ANY(%s)", (users,))
        for user in users:  # its objects and grants in this database, then the role
            conn.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(user)))
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(user)))


def config_as(tmp_path: Path, dsn: str, roles: dict[str, str], user: str,
              interval: float = 0) -> Config:
    path = tmp_path / f"{user}.toml"
    path.write_text(CONFIG.format(dsn=make_conninfo(dsn, user=roles[user]), interval=interval,
                                  relay=roles["relay"]))
    return load_config(path)


def test_least_privileges_suffice(conn, clean_db, roles, tmp_path, cli, receiver, caplog):
    installer = config_as(tmp_path, clean_db, roles, "installer")
    result = cli(installer, "install")
    assert result.exit_code == 0, result.output
    assert cli(installer, "check").exit_code == 0
    # (paced: the relay reserves its send slots in cdc_hooks.listener_pace)
    assert cli(installer, "listeners", "add", "person", receiver.url("/ok"),
               "--rate", "1000").exit_code == 0
    receiver.set_default("/gone", Reply(410))
    assert cli(installer, "listeners", "add", "person", receiver.url("/gone")).exit_code == 0
    assert cli(installer, "listeners", "add", "cdc_hooks.listener_disabled",
               receiver.url("/ops")).exit_code == 0

    # The application writes as itself: it needs no rights on cdc_hooks.
    with psycopg.connect(make_conninfo(clean_db, user=roles["app"]), autocommit=True) as app:
        app.execute("INSERT INTO person (name, secret) VALUES ('Ann', 'x'), ('Bob', 'y')")
    backfilled = cli(installer, "backfill", "person")
    assert backfilled.exit_code == 0, backfilled.output

    caplog.set_level(logging.INFO)
    relay = InProcessRelay(config_as(tmp_path, clean_db, roles, "relay", interval=0.2)).start()
    try:
        ok = receiver.wait_for(4, "/ok")
        receiver.wait_for(1, "/ops")  # 410 Gone: disabled by the relay, with its event
        # Pruning and health checks ran as the relay: wait for a round after this.
        conn.execute("UPDATE cdc_hooks.deliveries SET finished_at = now() - interval '8 days'"
                     " WHERE status = 'delivered'")
        wait_until(lambda: conn.execute(
            "SELECT count(*) FROM cdc_hooks.deliveries WHERE status = 'delivered'"
            " AND finished_at < now() - interval '7 days'").fetchone() == (0,),
            message="pruned by the relay")
    finally:
        relay.stop()
    assert sorted((r.json["event"], r.json["data"]["name"]) for r in ok) == [
        ("insert", "Ann"), ("insert", "Bob"), ("read", "Ann"), ("read", "Bob")]
    assert "maintenance failed" not in caplog.text
    assert "permission denied" not in caplog.text
    with Database.connect(make_conninfo(clean_db, user=roles["relay"])) as db:
        # (once the stopped relay's last round, if any, let go of the lock)
        wait_until(lambda: retention.prune(db, installer.retention), message="pruned")
        assert health.check(db, 5) == []


def test_the_relay_role_cannot_change_the_application(conn, clean_db, roles, tmp_path, cli):
    installer = config_as(tmp_path, clean_db, roles, "installer")
    assert cli(installer, "install").exit_code == 0
    with psycopg.connect(make_conninfo(clean_db, user=roles["relay"]), autocommit=True) as relay:
        for statement in ("SELECT * FROM person", "UPDATE person SET name = 'x'",
                          "DELETE FROM cdc_hooks.listeners", "DROP TABLE cdc_hooks.outbox",
                          "DELETE FROM cdc_hooks.hooks", "INSERT INTO cdc_hooks.outbox "
                          "(hook, kind, payload) VALUES ('person', 'insert', '{}')"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                relay.execute(statement)  # type: ignore[arg-type]
        # Statistics it may not refresh: the relay does not try (ANALYZE would only warn).
        stale = relay.execute(query("deliveries_statistics_stale"), {"min_changes": -1})
        assert stale.fetchone() == (False,)
