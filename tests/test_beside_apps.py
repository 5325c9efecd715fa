"""Beside real applications: behind PgBouncer, run for real, and in a user's terminal.

Debian's pgbouncer (1.18: no prepared statements in transaction mode) is started
by the test, on a free loopback port, in front of the test run's database.
Transaction mode: the CLI's, the Python API's and the web's sessions work through
it (no server-side prepared statements); the relay, which needs a session (LISTEN,
advisory locks), refuses with one clear line. Session mode: the relay delivers.

In the terminal: a database error while install inspects the tables is one
``error:`` line, and SQLAlchemy's warnings (column types it has no class for)
never show.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from receivers import Receiver, RelayProcesses, free_port, wait_until

from cdc_hooks import install as installer
from cdc_hooks.config import Config, load_config
from cdc_hooks.registry import Hook, Registry
from cdc_hooks.web import create_app

PGBOUNCER = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/local/sbin")
needs_pgbouncer = pytest.mark.skipif(
    PGBOUNCER is None, reason="no pgbouncer binary (Debian: apt-get install pgbouncer; .ci/run does)")

TOKEN = "test-token-0123456789abcdef"
TABLES = 8  # enough hooks for psycopg to prepare the statements install repeats per hook


class PgBouncer:
    """pgbouncer in front of the database of `dsn`, in `pool_mode`, until stop()."""

    def __init__(self, dsn: str, pool_mode: str, directory: Path) -> None:
        server = conninfo_to_dict(dsn)
        self.port = free_port()
        user = str(server.get("user") or "postgres")
        target = " ".join(f"{key}={server[key]}" for key in ("host", "port", "password")
                          if server.get(key))
        (directory / "users.txt").write_text(f'"{user}" ""\n', encoding="utf-8")
        ini = directory / "pgbouncer.ini"
        ini.write_text(f"""[databases]
* = {target}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {directory / "users.txt"}
pool_mode = {pool_mode}
""", encoding="utf-8")
        # It refuses to run as root; it reads its files before it switches user.
        switch = ["-u", _unprivileged_user()] if os.geteuid() == 0 else []
        self.log = directory / "pgbouncer.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen([str(PGBOUNCER), *switch, str(ini)], stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.dsn = make_conninfo(dsn, host="127.0.0.1", port=str(self.port))
        wait_until(self._answers, message=f"pgbouncer on port {self.port}")

    def _answers(self) -> bool:
        assert self.proc.poll() is None, self.log.read_text(errors="replace")
        try:
            psycopg.connect(self.dsn, connect_timeout=2).close()
        except psycopg.OperationalError:
            return False
        return True

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def _unprivileged_user() -> str:
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name).pw_name
        except KeyError:
            continue
    pytest.skip("pgbouncer refuses root, and there is no postgres or nobody user to run it as")


@pytest.fixture
def pooler(clean_db: str, tmp_path: Path) -> Iterator[Callable[[str], PgBouncer]]:
    """pooler(pool_mode) -> a running PgBouncer in front of the clean database."""
    started: list[PgBouncer] = []

    def start(pool_mode: str) -> PgBouncer:
        directory = tmp_path / f"pgbouncer-{len(started)}"
        directory.mkdir()
        started.append(PgBouncer(clean_db, pool_mode, directory))
        return started[-1]

    yield start
    for bouncer in started:
        bouncer.stop()


def config_through(tmp_path: Path, dsn: str, *, tables: int = TABLES,
                   name: str = "cdc_hooks.toml") -> Config:
    hooks = "".join(f'[[hooks]]\nname = "t{i}"\ntable = "t{i}"\n\n' for i in range(tables))
    path = tmp_path / name
    path.write_text(f"""[database]
dsn = "{dsn}"

{hooks}[[hooks]]
name = "myhook"
provides = ["message"]

[delivery]
allow_private_networks = true

[web]
token = "{TOKEN}"
""", encoding="utf-8")
    return load_config(path)


def create_tables(conn: psycopg.Connection[Any], tables: int = TABLES) -> None:
    for i in range(tables):
        conn.execute(f"CREATE TABLE t{i} (id serial PRIMARY KEY, name text, at point, doc xml)")


def succeeds(cli: Callable[..., Any], config: Config, *args: str) -> str:
    result = cli(config, *args)  # the fixture lets a traceback through: it fails the test
    assert result.exit_code == 0, (args, result.output)
    assert result.stderr == "", (args, result.stderr)
    return result.stdout


@needs_pgbouncer
def test_the_cli_works_through_a_transaction_pooler(conn, pooler, tmp_path, cli, receiver):
    create_tables(conn)
    config = config_through(tmp_path, pooler("transaction").dsn)
    assert "+ t0" in succeeds(cli, config, "install")
    assert "ok:" in succeeds(cli, config, "check")
    assert "no changes" in succeeds(cli, config, "install")
    for i in range(TABLES):
        succeeds(cli, config, "listeners", "add", f"t{i}", receiver.url("/t"), "--match", "name=J")
    listed = succeeds(cli, config, "listeners", "list")
    assert listed.count(receiver.url("/t")) == TABLES
    assert "sent event evt_" in succeeds(cli, config, "send", "myhook", "message=hi")
    assert "deliveries pending" in succeeds(cli, config, "status")
    assert "ok:" in succeeds(cli, config, "check")


def installed_directly(conn: psycopg.Connection[Any], clean_db: str, tmp_path: Path) -> None:
    create_tables(conn)
    installer.install(config_through(tmp_path, clean_db, name="direct.toml"))


@needs_pgbouncer
def test_install_works_beside_an_application_that_prepares_statements(conn, pooler, tmp_path,
                                                                      cli):
    # The application's session on the pooled server holds a prepared statement of
    # the name psycopg gives its first one: install's table inspection used to
    # prepare its own and end in SQLAlchemy's traceback (DuplicatePreparedStatement).
    create_tables(conn)
    bouncer = pooler("transaction")
    with psycopg.connect(bouncer.dsn, autocommit=True) as application:
        application.execute("PREPARE _pg3_0 AS SELECT 1")
        config = config_through(tmp_path, bouncer.dsn)
        assert "+ t0" in succeeds(cli, config, "install")
        assert "ok:" in succeeds(cli, config, "check")


@needs_pgbouncer
def test_the_python_api_works_through_a_transaction_pooler(conn, clean_db, pooler, tmp_path,
                                                           receiver):
    installed_directly(conn, clean_db, tmp_path)
    config = config_through(tmp_path, pooler("transaction").dsn)
    registry = Registry()
    registry.configure(config)
    hook = registry.register(Hook("myhook", ["message"], registry=registry))
    for n in range(8):
        hook.listener(url=receiver.url(f"/{n}")).match(message="hi").save()
        assert hook.send(message="hi") > 0


@needs_pgbouncer
def test_two_web_servers_work_through_one_transaction_pooler(conn, clean_db, pooler, tmp_path):
    # Each pools its connections and runs the same queries again and again: psycopg
    # would prepare them, both as _pg3_0, on the server session PgBouncer reuses.
    installed_directly(conn, clean_db, tmp_path)
    config = config_through(tmp_path, pooler("transaction").dsn)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with TestClient(create_app(config), base_url="https://testserver") as first, \
            TestClient(create_app(config), base_url="https://testserver") as second:
        for _ in range(8):
            for client in (first, second):
                response = client.get("/api/hooks", headers=auth)
                assert response.status_code == 200, response.text


@needs_pgbouncer
def test_the_relay_refuses_a_transaction_pooler_in_one_line(conn, pooler, tmp_path, cli):
    create_tables(conn, 1)
    config = config_through(tmp_path, pooler("transaction").dsn, tables=1)
    succeeds(cli, config, "install")
    # A child process, as a user runs it; the timeout only guards against a relay
    # that would reconnect forever instead of refusing.
    ran = subprocess.run([sys.executable, "-m", "cdc_hooks", "--config", str(config.path), "run"],
                         capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert ran.returncode == 2, ran.stderr
    assert ran.stderr.startswith("error: the relay needs a direct or session-pooled connection: ")
    assert ran.stderr.count("\n") == 1, ran.stderr
    assert "pool_mode = transaction" in ran.stderr


@needs_pgbouncer
def test_the_relay_delivers_through_a_session_pooler(conn, pooler, tmp_path, cli,
                                                     receiver: Receiver):
    create_tables(conn, 1)
    config = config_through(tmp_path, pooler("session").dsn, tables=1)
    succeeds(cli, config, "install")
    succeeds(cli, config, "listeners", "add", "t0", receiver.url("/t0"))
    relays = RelayProcesses(tmp_path)
    try:
        relay = relays.start(config)
        conn.execute("INSERT INTO t0 (name) VALUES ('Joe')")
        [received] = receiver.wait_for(1)
        assert relay.running, relay.log()
    finally:
        relays.cleanup()
    assert received.json["data"]["name"] == "Joe"


def test_install_and_check_print_no_library_warnings(conn, make_config):
    # A child process: pytest would catch the warnings before they reach stderr.
    conn.execute("CREATE TABLE place (id serial PRIMARY KEY, at point, doc xml)")
    config = make_config('[[hooks]]\nname = "place"\ntable = "place"\n')
    for command in ("install", "check"):
        ran = subprocess.run([sys.executable, "-m", "cdc_hooks", "--config", str(config.path),
                              command], capture_output=True, text=True, timeout=120)
        assert ran.returncode == 0, ran.stderr
        assert ran.stderr == "", ran.stderr


def test_a_database_error_while_install_inspects_tables_is_one_line(conn, clean_db, tmp_path,
                                                                    cli):
    # A role that may not run a catalog function SQLAlchemy's inspector calls: its
    # error used to escape as SQLAlchemy's traceback.
    create_tables(conn, 1)
    role = f"cdc_inspect_{secrets.token_hex(3)}"
    format_type = "FUNCTION pg_catalog.format_type(oid, integer)"
    conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        conn.execute(f"REVOKE EXECUTE ON {format_type} FROM PUBLIC")
        config = config_through(tmp_path, make_conninfo(clean_db, user=role), tables=1)
        result = cli(config, "install")
        assert result.exit_code == 1, result.output
        assert result.stderr.splitlines() == [
            "error: PostgreSQL: permission denied for function format_type"], result.stderr
    finally:
        conn.execute(f"GRANT EXECUTE ON {format_type} TO PUBLIC")
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                     (role,))
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


# --match: a word before a colon is an operator or refused -----------------------


def test_an_operator_that_is_no_near_miss_is_refused_not_matched_as_text(conn, make_config, cli):
    conn.execute("CREATE TABLE person (id serial PRIMARY KEY, name text, address text)")
    config = make_config('[[hooks]]\nname = "person"\ntable = "person"\n\n'
                         "[delivery]\nallow_private_networks = true\n")
    succeeds(cli, config, "install")
    url = "http://127.0.0.1:9/hook"
    for option in ("name=regex:^J", "name=prefix:J", "name=eq:Joe", "name=sounds_like:x"):
        result = cli(config, "listeners", "add", "person", url, "--match", option)
        assert result.exit_code == 2, result.output
        (line,) = result.stderr.splitlines()
        word = option.split("=")[1].split(":")[0]
        assert line.startswith(f"error: --match '{option}': unknown operator \"{word}\"")
        assert "operators: any, is, startswith, endswith, contains, like" in line
        assert f"to match the text itself: name=is:{option.split('=')[1]}" in line
    assert "(none)" in succeeds(cli, config, "listeners", "list")
    # The text itself stays reachable, and a URL's scheme is no operator.
    succeeds(cli, config, "listeners", "add", "person", url, "--match", "name=is:regex:^J",
             "--match", "address=http://x")
    (match,) = [row[0] for row in conn.execute("SELECT match FROM cdc_hooks.listeners")]
    assert match == {"name": {"$is": "regex:^J"}, "address": "http://x"}


# The Python API's database, as README says ------------------------------------


def test_the_python_api_finds_its_database_as_the_readme_says(make_config, clean_db, tmp_path,
                                                              monkeypatch):
    config = make_config('[[hooks]]\nname = "myhook"\nprovides = ["message"]\n')
    installer.install(config)

    def sent() -> int:
        registry = Registry()  # a fresh one: the config is read on first use
        return registry.register(Hook("myhook", ["message"], registry=registry)).send(message="hi")

    monkeypatch.setenv("CDC_HOOKS_CONFIG", str(config.path))
    assert sent() > 0
    monkeypatch.delenv("CDC_HOOKS_CONFIG")
    monkeypatch.chdir(config.path.parent)  # ./cdc_hooks.toml
    assert sent() > 0
    monkeypatch.chdir(tmp_path.parent)
    monkeypatch.setenv("CDC_HOOKS_DSN", clean_db)  # no file: the DSN alone
    assert sent() > 0
    monkeypatch.delenv("CDC_HOOKS_DSN")
    registry = Registry()
    registry.load(config)  # or in code
    assert registry.get("myhook").send(message="hi") > 0


# redeliver --since: a bare time is local, an offset is honoured ------------------


@pytest.fixture
def tokyo_time() -> Iterator[None]:
    """This process in Asia/Tokyo (UTC+9 all year), as a user's TZ would put it."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = "Asia/Tokyo"
    time.tzset()
    yield
    if before is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = before
    time.tzset()


def test_redeliver_since_reads_a_bare_time_as_local_and_honours_an_offset(conn, make_config, cli,
                                                                         tokyo_time):
    config = make_config('[[hooks]]\nname = "myhook"\nprovides = ["message"]\n\n'
                         "[delivery]\nallow_private_networks = true\n")
    succeeds(cli, config, "install")
    succeeds(cli, config, "listeners", "add", "myhook", "http://127.0.0.1:9/hook")
    # Dead letters created at 00:30 and 02:00 UTC: 09:30 and 11:00 in Tokyo.
    for event_id, created in ((1, "2026-01-01T00:30Z"), (2, "2026-01-01T02:00Z")):
        conn.execute("INSERT INTO cdc_hooks.events (id, hook, kind, body, occurred_at) "
                     "VALUES (%s, 'myhook', 'myhook', '{}', %s)", (event_id, created))
        conn.execute("INSERT INTO cdc_hooks.deliveries (event_id, listener_id, status, created_at, "
                     "finished_at) SELECT %s, id, 'dead', %s, %s FROM cdc_hooks.listeners",
                     (event_id, created, created))
    for since, queued in (("2026-01-01 10:00:00", 1), ("2026-01-01 10:00", 1),
                          ("2026-01-01T10:00+09:00", 1), ("2026-01-01T01:00:00+00:00", 1),
                          ("2026-01-01T00:00Z", 2), ("2026-01-01", 2)):
        conn.execute("UPDATE cdc_hooks.deliveries SET status = 'dead'")
        out = succeeds(cli, config, "redeliver", "--since", since)
        assert out.startswith(f"{queued} deliver"), (since, out)
    result = cli(config, "redeliver", "--since", "yesterday")
    assert result.exit_code == 2 and "is not an ISO 8601 time" in result.stderr
