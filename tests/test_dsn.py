"""The DSN's password never shows (issue 12): not in the CLI's output, the
relay's log, the web server's answers (unauthenticated /readyz) or its log,
whatever the DSN's form (URL, key/value, quoted, percent-encoded, with @ / ?
or spaces in the password) and whatever fails (a DSN that does not parse as
meant, a refused connection, a failed login).

Every password below is made of two parts that must appear nowhere.
tests/faults/test_faults_input.py runs every command on two plain DSNs.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from fastapi.testclient import TestClient
from psycopg.conninfo import make_conninfo
from receivers import OwnPostgres, RelayProcess, free_port, skip_without_postgres_user, wait_until

from cdc_hooks.config import Config
from cdc_hooks.dsn import describe_dsn, parse_dsn, without_password
from cdc_hooks.web import create_app

PARTS = ("kiwi7Qx", "mango3Zy", "51627")
TOKEN = "dsn-test-token-0123456789"

# Each parses (if at all) into something else than meant: part of the password
# lands in the host, port or database name, or in psycopg's parse error.
MALFORMED = {
    "url, @ in the password": "postgresql://alice:kiwi7Qx@mango3Zy@127.0.0.1:1/app",
    "url, / in the password": "postgresql://alice:kiwi7Qx/mango3Zy@127.0.0.1:1/app",
    "url, digits and / in the password": "postgresql://alice:51627/mango3Zy@127.0.0.1:1/app",
    "url, ? and @ in the password": "postgresql://alice:kiwi7Qx?x@mango3Zy@127.0.0.1:1/app",
    "url, space in the password": "postgresql://alice:kiwi7Qx mango3Zy@127.0.0.1:1/app",
    "keywords, unquoted space": "host=127.0.0.1 port=1 user=alice password=kiwi7Qx mango3Zy "
                                "dbname=app",
    "keywords, unquoted space and =": "host=127.0.0.1 port=1 user=alice password=kiwi7Qx "
                                      "mango3Zy=x",
    "keywords, unterminated quote": "host=127.0.0.1 port=1 password='kiwi7Qx mango3Zy",
}
# Well-formed, to a port where nothing listens: named as 127.0.0.1:1/app.
REFUSED = {
    "url": "postgresql://alice:kiwi7Qxmango3Zy@127.0.0.1:1/app",
    "url, percent-encoded @ / and space": "postgresql://alice:kiwi7Qx%40%2F%20mango3Zy"
                                          "@127.0.0.1:1/app",
    "url, password in the query": "postgresql://alice@127.0.0.1:1/app?password=kiwi7Qx%20mango3Zy",
    "keywords, quoted": "host=127.0.0.1 port=1 user=alice password='kiwi7Qx mango3Zy' dbname=app",
    "keywords, quoted quote": r"host=127.0.0.1 port=1 user=alice password='kiwi7Qx\' mango3Zy'"
                              " dbname=app",
    "keywords, escaped space": r"host=127.0.0.1 port=1 user=alice password=kiwi7Qx\ mango3Zy"
                               " dbname=app",
}
ALL = {**MALFORMED, **REFUSED}
# What the processes below run on (each costs a Python start-up).
SOME = ["url, @ in the password", "keywords, unquoted space", "url, percent-encoded @ / and space"]
COMMANDS = [["status"], ["install"], ["check"], ["listeners", "list"]]


def assert_hidden(text: str, parts: tuple[str, ...] = PARTS) -> None:
    shown = [part for part in parts if part in text]
    assert not shown, f"password parts {shown} in: {text}"


def expected_message(dsn: str) -> str:
    return "is malformed" if dsn in MALFORMED.values() else \
        "cannot connect to PostgreSQL at 127.0.0.1:1/app"


def toml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(path: Path, dsn: str) -> Path:
    path.write_text(f"[database]\ndsn = {toml_string(dsn)}\n", encoding="utf-8")
    return path


# The helper, as pure logic -------------------------------------------------------


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_dsn_is_not_described(case):
    assert parse_dsn(MALFORMED[case]) is None
    assert describe_dsn(MALFORMED[case]) == "(malformed DSN)"


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_well_formed_dsn_is_described_by_its_target_alone(case):
    assert describe_dsn(REFUSED[case]) == "127.0.0.1:1/app"
    assert_hidden(without_password(REFUSED[case]))


# CLI ---------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["config", "env"])
@pytest.mark.parametrize("case", sorted(ALL))
def test_cli_commands_never_show_the_password(case, source, cli, tmp_path, monkeypatch, caplog):
    dsn = ALL[case]
    if source == "env":
        monkeypatch.setenv("CDC_HOOKS_DSN", dsn)
        config = write_config(tmp_path / "c.toml", "host=127.0.0.1 port=1 dbname=other")
    else:
        config = write_config(tmp_path / "c.toml", dsn)
    for args in COMMANDS:
        result = cli(config, *args)
        lines = result.stderr.splitlines()
        assert result.exit_code == (2 if dsn in MALFORMED.values() else 1), (args, result.output)
        assert len(lines) == 1 and expected_message(dsn) in lines[0], (args, result.stderr)
        if dsn in MALFORMED.values():
            assert ("CDC_HOOKS_DSN" if source == "env" else "[database] dsn") in lines[0]
        assert_hidden(result.output)
    assert_hidden(caplog.text)


@pytest.mark.parametrize("case", SOME)
def test_the_relay_never_logs_the_password(case, tmp_path):
    """A malformed DSN stops `run` at once (it is no outage to wait out); a refused
    connection is logged, named by its target, and retried until SIGTERM."""
    dsn = ALL[case]
    relay = RelayProcess(write_config(tmp_path / "c.toml", "dbname=unused"), tmp_path / "run.log",
                         env={"CDC_HOOKS_DSN": dsn}).start()
    try:
        if dsn in MALFORMED.values():
            assert relay.proc is not None and relay.proc.wait(60) == 2, relay.log()
            assert relay.log().startswith("error: the database DSN (CDC_HOOKS_DSN) is malformed")
        else:
            wait_until(lambda: "unavailable" in relay.log() or not relay.running)
            assert relay.terminate() == 0, relay.log()
            assert "database at 127.0.0.1:1/app unavailable" in relay.log()
        assert "Traceback" not in relay.log()
        assert_hidden(relay.log())
    finally:
        relay.cleanup()


def test_demo_refuses_a_malformed_dsn_naming_its_option(cli, tmp_path):
    result = cli(write_config(tmp_path / "c.toml", "dbname=unused"), "demo", "--dsn",
                 MALFORMED["keywords, unquoted space"])
    assert result.exit_code == 2 and "the database DSN (--dsn) is malformed" in result.stderr
    assert_hidden(result.output)


def test_demo_keep_running_shows_a_psql_line_without_the_password(clean_db, tmp_path):
    """Trust auth here: the password is never asked for, but would have been printed."""
    dsn = make_conninfo(clean_db, password="kiwi7Qx mango3Zy")
    log = tmp_path / "demo.log"
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cdc_hooks", "demo", "--dsn", dsn,
                                 "--keep-running"], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=tmp_path)
    try:
        wait_until(lambda: "Ctrl-C to stop" in log.read_text() or proc.poll() is not None,
                   timeout=120)
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert "psql 'user=postgres " in log.read_text(), log.read_text()
    assert_hidden(log.read_text())


# Web ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(ALL))
def test_readyz_and_the_api_never_show_the_password(case, caplog):
    caplog.set_level(logging.DEBUG)
    with TestClient(create_app(Config(dsn=ALL[case]), token=TOKEN, db_wait=1)) as client:
        ready = client.get("/readyz")
        api = client.get("/api/hooks", headers={"Authorization": f"Bearer {TOKEN}"})
    assert ready.status_code == 503 and expected_message(ALL[case]) in ready.json()["problems"][0]
    assert api.status_code == 503
    for answer in (ready, api):
        assert_hidden(answer.text)
        assert_hidden(str(answer.headers))
    assert_hidden(caplog.text)


@pytest.fixture
def web_process(tmp_path: Path) -> Iterator[Any]:
    """start(dsn) -> (port, log path) of a `cdc-hooks web` process, stopped at teardown."""
    started: list[subprocess.Popen[bytes]] = []

    def start(dsn: str) -> tuple[int, Path]:
        port, log = free_port(), tmp_path / f"web-{len(started)}.log"
        config = write_config(tmp_path / "c.toml", "dbname=unused")
        with log.open("ab") as out:
            started.append(subprocess.Popen(
                [sys.executable, "-m", "cdc_hooks", "--config", str(config), "web", "--bind",
                 f"127.0.0.1:{port}"], stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "CDC_HOOKS_DSN": dsn, "CDC_HOOKS_WEB_TOKEN": TOKEN}))
        wait_until(lambda: "web interface" in log.read_text() or started[-1].poll() is not None)
        return port, log

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)


@pytest.mark.parametrize("case", SOME)
def test_the_web_server_never_shows_the_password(case, web_process):
    port, log = web_process(ALL[case])
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
        ready = http.get("/readyz")
    assert ready.status_code == 503 and expected_message(ALL[case]) in ready.json()["problems"][0]
    assert_hidden(ready.text + log.read_text())


# A failed login, on a server of the test's own that asks for a password ------------------

PASSWORD = "kiwi7Qx mango3Zy"
WRONG = ("papaya5Wv", "guava8Rt")


@pytest.fixture
def password_server() -> Iterator[OwnPostgres]:
    """A PostgreSQL server where alice logs in with PASSWORD (scram-sha-256)."""
    skip_without_postgres_user()
    server = OwnPostgres()
    (server.data / "pg_hba.conf").write_text(
        "local all all trust\nhost all alice 127.0.0.1/32 scram-sha-256\n"
        "host all all 127.0.0.1/32 trust\n", encoding="utf-8")
    server.start()
    with psycopg.connect(server.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE alice LOGIN PASSWORD '{PASSWORD}'")
    yield server
    server.destroy()


def test_a_failed_login_never_shows_the_password(password_server, cli, tmp_path, caplog):
    port = password_server.port
    right = [f"postgresql://alice:kiwi7Qx%20mango3Zy@127.0.0.1:{port}/postgres",
             f"host=127.0.0.1 port={port} user=alice password='{PASSWORD}' dbname=postgres"]
    wrong = [f"postgresql://alice:papaya5Wv%20guava8Rt@127.0.0.1:{port}/postgres",
             f"host=127.0.0.1 port={port} user=alice password='papaya5Wv guava8Rt' "
             "dbname=postgres"]
    for dsn in right:  # the forms work: the login succeeds, cdc_hooks is not installed
        result = cli(write_config(tmp_path / "c.toml", dsn), "status")
        assert result.exit_code == 1 and "not installed" in result.stderr, result.output
        assert_hidden(result.output)
    for dsn in wrong:
        result = cli(write_config(tmp_path / "c.toml", dsn), "status")
        assert result.exit_code == 1, result.output
        assert 'password authentication failed for user "alice"' in result.stderr
        assert f"127.0.0.1:{port}/postgres" in result.stderr
        assert_hidden(result.output, WRONG)
        with TestClient(create_app(Config(dsn=dsn), token=TOKEN, db_wait=1)) as client:
            ready = client.get("/readyz")
        assert ready.status_code == 503 and "password authentication failed" in ready.text
        assert_hidden(ready.text, WRONG)
    assert_hidden(caplog.text, PARTS + WRONG)
