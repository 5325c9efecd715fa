"""cdc-hooks demo, run as a user runs it: a subprocess, to completion."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import psycopg

from cdc_hooks import demo
from cdc_hooks.receiver import Delivery


def run_demo(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # No config file in cwd and no CDC_HOOKS_* variables: what a newcomer has.
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDC_HOOKS_")}
    return subprocess.run([sys.executable, "-m", "cdc_hooks", "demo", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def assert_succeeded(result: subprocess.CompletedProcess[str]) -> None:
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "all 11 expected deliveries arrived" in out
    assert "ok    nothing else arrived" in out
    assert "ok    every signature verifies with its listener's secret" in out
    assert "ok    the secret column never left the database" in out
    assert "FAIL" not in out
    # What each of durian's filters let through, as the demo reports it.
    assert re.search(r'name is "Joe"\s+2 of 2: insert Joe, update Joe\n', out)
    assert re.search(r'name starts with "J"\s+3 of 3: insert Joe, insert Jane, update Joe\n', out)
    assert "5 of 5: insert Joe, insert Jane, insert Bob, update Joe, delete Bob" in out
    assert "1 of 1: myhook George Costanza" in out


def test_demo_on_a_given_database_succeeds_and_leaves_it_as_found(clean_db, tmp_path):
    result = run_demo("--dsn", clean_db, cwd=tmp_path)
    assert_succeeded(result)
    with psycopg.connect(clean_db) as conn:
        schemas = {r[0] for r in conn.execute("SELECT nspname FROM pg_namespace")}
    assert "cdc_hooks" not in schemas and demo.SCHEMA not in schemas


def test_demo_refuses_a_database_with_hooks_of_its_own(make_config, cli, conn, tmp_path):
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, total numeric)")
    config = make_config('[[hooks]]\nname = "orders"\ntable = "orders"\n')
    assert cli(config, "install").exit_code == 0
    result = run_demo("--dsn", config.dsn or "", cwd=tmp_path)
    assert result.returncode == 1
    assert "already has cdc_hooks installed with hooks orders" in result.stderr
    assert [r[0] for r in conn.execute(
        "SELECT name FROM cdc_hooks.hooks WHERE name NOT LIKE 'cdc\\_hooks.%'")] == ["orders"]
    assert conn.execute("SELECT to_regclass('cdc_hooks_demo.person')").fetchone() == (None,)


def test_demo_with_embedded_postgresql_by_default(tmp_path):
    result = run_demo(cwd=tmp_path)
    assert_succeeded(result)
    assert "starts an embedded one (pgserver)" in result.stdout
    folder = re.search(r"^ +in (\S+) \(removed at the end\)$", result.stdout, re.MULTILINE)
    assert folder and not Path(folder.group(1)).exists(), "the temporary server is removed"


# The checks themselves (pure logic): a missing delivery or a leaked secret fails the demo.

def fake_run() -> demo.Run:
    secrets = {lsn.path: demo.generate_secret() for lsn in demo.LISTENERS}
    return demo.Run("http://127.0.0.1:1", secrets, {"joe": "joe-secret-1234"},
                    {lsn.path: i for i, lsn in enumerate(demo.LISTENERS, 1)})


def delivery(run: demo.Run, path: str, event: str, name: str, n: int, **more: str) -> Delivery:
    from cdc_hooks.signing import headers, secret_key

    body = demo.jsoncodec.dumps({"event": event, "data": {"name": name, **more}}).encode()
    signed = headers(secret_key(run.secrets[path]), f"msg_{n}", 1_700_000_000, body)
    return Delivery(path, signed["webhook-id"], signed["webhook-timestamp"],
                    signed["webhook-signature"], body, demo.jsoncodec.loads(body), "verified", 0.0)


def everything(run: demo.Run) -> list[Delivery]:
    expected = [(lsn.path, e, n) for lsn in demo.LISTENERS for e, n in lsn.expected]
    return [delivery(run, p, e, n, i) for i, (p, e, n) in enumerate(expected)]


def test_report_passes_when_all_arrived(capsys):
    run = fake_run()
    run.received = everything(run)
    assert demo._report(run) is True
    assert "FAIL" not in capsys.readouterr().out


def test_report_fails_on_a_missing_delivery(capsys):
    run = fake_run()
    run.received = everything(run)[1:]
    assert demo._report(run) is False
    assert "FAIL  missing: insert Joe to /joe" in capsys.readouterr().out


def test_report_fails_on_a_leaked_secret_or_an_unexpected_delivery(capsys):
    run = fake_run()
    run.received = [*everything(run),
                    delivery(run, "/joe", "insert", "Bob", 99, secret="joe-secret-1234")]
    assert demo._report(run) is False
    out = capsys.readouterr().out
    assert "FAIL  unexpected: insert Bob to /joe" in out
    assert "FAIL  secret values found in bodies: joe-secret-1234" in out


def test_report_fails_on_a_bad_signature(capsys):
    run = fake_run()
    run.received = everything(run)
    first = run.received[0]
    run.received[0] = Delivery(first.path, first.webhook_id, first.timestamp, "v1,AAAA",
                               first.body, first.payload, first.signature, 0.0)
    assert demo._report(run) is False
    assert "FAIL  bad signatures: msg_0" in capsys.readouterr().out
