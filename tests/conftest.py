"""Shared fixtures: a real PostgreSQL database of this test run, never a mock.

Which server
    ``CDC_HOOKS_TEST_DSN`` if set (any database on the wanted server: it is only
    used to create and drop the run's own database); else the server on
    127.0.0.1:5432 (user postgres) if it answers; else an embedded PostgreSQL
    from the ``pgserver`` package, started in a data directory kept under the
    system temp dir (``cdc-hooks-test-pgdata``) and stopped at exit.
    ``CDC_HOOKS_TEST_DSN=embedded`` forces the embedded server (PostgreSQL 16
    there, 15 on this machine's server: run the suite on both).

The run's database
    Each test run creates a database with a unique name
    (``cdc_hooks_test_<pid>_<random>``) and drops it at the end, after
    terminating its backends, so concurrent runs on one server never collide.

Fixtures
    ``pg_dsn`` (session)
        DSN of the run's database. Nothing cleans it between tests: use it
        directly only for read-only work or state a test cleans itself.
    ``clean_db`` (function)
        The same DSN, after wiping it to an empty state: every user schema
        (``cdc_hooks`` included) is dropped and ``public`` recreated empty, so
        tables, types, functions and triggers of earlier tests are gone.
        Connections still open in the database from earlier tests (a relay
        that was not stopped) are terminated if they hold up the wipe.
        Tests that touch the database request this (or ``conn``/``make_config``,
        which depend on it). Roles are cluster-wide: a test that creates one
        drops it itself.
    ``conn`` (function)
        An autocommit psycopg connection to the clean database, closed after
        the test. Use ``with conn.transaction():`` for explicit transactions.
    ``make_config`` (function)
        ``make_config(body: str = "", name: str = "cdc_hooks.toml") -> Config``:
        writes ``[database] dsn = <clean_db>`` followed by the TOML ``body``
        (hooks, delivery, web sections) to ``tmp_path/name`` and returns the
        loaded Config; ``config.path`` is the file, for ``--config``.
        Call it again with another body to rewrite the same file.
    ``installed`` (function)
        ``installed(body: str, table: str | None = None) -> Config``: runs the
        ``table`` SQL (CREATE TABLE ...), writes the config (make_config) and
        installs it: what most tests start from.
    ``serve_web`` (function)
        ``serve_web(config) -> str``: ``cdc-hooks web`` as its own process on a
        free loopback port, up; its URL. Stopped with SIGTERM after the test,
        which must end it cleanly (exit 0).
    ``own_postgres`` (function)
        A PostgreSQL server of the test's own (tests/receivers.OwnPostgres), which
        it may stop, restart or configure; never the shared one.
    ``cli`` (function)
        ``cli(config, *args, input=None) -> click.testing.Result``: runs
        ``cdc-hooks --config <config.path> *args`` in-process with CliRunner
        (``config`` may also be the Path of a file). Unexpected exceptions
        propagate (a traceback is a bug); ``result.exit_code``,
        ``result.stdout``, ``result.stderr`` hold the rest.

Every test also runs without ``CDC_HOOKS_DSN`` and ``CDC_HOOKS_CONFIG`` in its
environment, so a developer's settings cannot leak into a test.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner, Result
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from receivers import OwnPostgres, Receiver, free_port, skip_without_postgres_user, wait_until

from cdc_hooks import install as installer
from cdc_hooks.cli import main
from cdc_hooks.config import Config, load_config

LOCAL_SERVER = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
SYSTEM_SCHEMAS = ("public", "information_schema")


def _answers(dsn: str) -> bool:
    try:
        with psycopg.connect(dsn, connect_timeout=2):
            return True
    except psycopg.Error:
        return False


def _embedded_server() -> str:
    """Starts (or joins) an embedded PostgreSQL; imported lazily, only when needed."""
    # A fixed directory: later runs skip initdb; 'stop' shuts it down at exit
    # once the last process using it is done (concurrent runs share it).
    pgdata = Path(tempfile.gettempdir()) / f"cdc-hooks-test-pgdata-{os.getuid()}"
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (CI, root): harmless here.
        warnings.simplefilter("ignore")
        import pgserver

        server = pgserver.get_server(pgdata, cleanup_mode="stop")
    return server.get_uri("postgres")


def _server_dsn() -> str:
    explicit = os.environ.get("CDC_HOOKS_TEST_DSN")
    if explicit == "embedded":
        return _embedded_server()
    if explicit:
        return explicit
    if _answers(LOCAL_SERVER):
        return LOCAL_SERVER
    return _embedded_server()


def _with_dbname(dsn: str, dbname: str) -> str:
    return make_conninfo(dsn, dbname=dbname)


def _drop_database(admin_dsn: str, dbname: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (dbname,),
        )
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(dbname)))


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    """DSN of a database created for this test run, dropped at its end."""
    server = _server_dsn()
    dbname = f"cdc_hooks_test_{os.getpid()}_{secrets.token_hex(4)}"
    # The server DSN's own database only serves to create and drop ours.
    admin = server
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    try:
        yield _with_dbname(server, dbname)
    finally:
        _drop_database(admin, dbname)


def _wipe(conn: psycopg.Connection[Any]) -> None:
    schemas = [r[0] for r in conn.execute(
        "SELECT nspname FROM pg_namespace "
        "WHERE nspname NOT LIKE 'pg\\_%%' AND nspname <> ALL(%s)",
        (list(SYSTEM_SCHEMAS),),
    )]
    with conn.transaction():
        for schema in [*schemas, "public"]:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                sql.Identifier(schema)))
        conn.execute("CREATE SCHEMA public")
        # As a new database has it, so that roles a test creates can use it.
        conn.execute("GRANT USAGE ON SCHEMA public TO PUBLIC")


def _end_other_sessions(conn: psycopg.Connection[Any]) -> None:
    """Ends every other session on the database and waits until they are gone.

    A stopped relay's backend can still be finishing its last statement after
    the client closed; left alone it would deadlock with the wipe's DROPs.
    """
    others = ("FROM pg_stat_activity "
              "WHERE datname = current_database() AND pid <> pg_backend_pid()")
    conn.execute("SELECT pg_terminate_backend(pid) " + others)
    deadline = time.monotonic() + 10
    while conn.execute("SELECT pid " + others).fetchone() is not None:
        if time.monotonic() > deadline:
            raise AssertionError("sessions left by an earlier test would not end")
        time.sleep(0.01)


@pytest.fixture(scope="session")
def django_settings(pg_dsn: str) -> None:
    """Django configured in code on the run's database, once per process (settings
    can be configured only once): tests/djangoapp installed, for migrations; the
    models of tests/hookproject name their own app_label."""
    import django
    from django.conf import settings

    if not settings.configured:
        info = conninfo_to_dict(pg_dsn)
        settings.configure(
            INSTALLED_APPS=["djangoapp"], USE_TZ=True,
            DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
            DATABASES={"default": {
                "ENGINE": "django.db.backends.postgresql", "NAME": info["dbname"],
                "USER": info.get("user", ""), "PASSWORD": info.get("password", ""),
                "HOST": info.get("host", ""), "PORT": info.get("port", ""),
            }},
        )
        django.setup()


@pytest.fixture
def clean_db(pg_dsn: str) -> str:
    """The run's database, emptied of everything earlier tests created."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        _end_other_sessions(conn)
        _wipe(conn)
    return pg_dsn


@pytest.fixture
def conn(clean_db: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection to the clean database."""
    with psycopg.connect(clean_db, autocommit=True) as connection:
        yield connection


@pytest.fixture(autouse=True)
def _no_user_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CDC_HOOKS_DSN", raising=False)
    monkeypatch.delenv("CDC_HOOKS_CONFIG", raising=False)


@pytest.fixture
def make_config(clean_db: str, tmp_path: Path) -> Callable[..., Config]:
    """Writes a config file pointing at the clean database and loads it."""

    def make(body: str = "", name: str = "cdc_hooks.toml") -> Config:
        path = tmp_path / name
        dsn = clean_db.replace("\\", "\\\\").replace('"', '\\"')
        path.write_text(f'[database]\ndsn = "{dsn}"\n\n{body}', encoding="utf-8")
        return load_config(path)

    return make


@pytest.fixture
def installed(conn: psycopg.Connection[Any], make_config: Callable[..., Config]
              ) -> Callable[..., Config]:
    def install(body: str, table: str | None = None) -> Config:
        if table is not None:
            conn.execute(table)
        config = make_config(body)
        installer.install(config)
        return config

    return install


@pytest.fixture
def serve_web(tmp_path: Path) -> Iterator[Callable[[Config], str]]:
    started: list[tuple[subprocess.Popen[bytes], Path]] = []

    def serve(config: Config) -> str:
        port = free_port()
        log = tmp_path / f"web-{len(started)}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "cdc_hooks", "--config", str(config.path),
                                     "web", "--bind", f"127.0.0.1:{port}"],
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        started.append((proc, log))
        wait_until(lambda: "web interface" in log.read_text() or proc.poll() is not None,
                   message="cdc-hooks web up")
        assert proc.poll() is None, log.read_text()
        return f"http://127.0.0.1:{port}"

    yield serve
    for proc, log in started:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(30) == 0, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


@pytest.fixture
def own_postgres() -> Iterator[OwnPostgres]:
    skip_without_postgres_user()
    server = OwnPostgres()
    server.start()
    yield server
    server.destroy()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A loopback HTTP receiver (tests/receivers.py), closed after the test."""
    server = Receiver().start()
    yield server
    server.close()


@pytest.fixture
def cli() -> Callable[..., Result]:
    """Runs the cdc-hooks command in-process against a config."""

    def run(config: Config | Path, *args: str, input: str | None = None) -> Result:
        path = config.path if isinstance(config, Config) else config
        return CliRunner().invoke(
            main, ["--config", str(path), *args], input=input, catch_exceptions=False
        )

    return run
