"""The application is never broken by cdc-hooks' own troubles.

- The relay stopped (SIGKILLed, so its waiter row is stale) while the app
  writes on: every write succeeds, the outbox grows, no NOTIFY is sent (no
  relay waits), and the next relay delivers the backlog. The writes' speed is
  bench/bench_capture.py's business.
- The cdc_hooks schema dropped by mistake: the triggers go with it, so the
  app's writes go on, uncaptured; a running relay stops with one loud line,
  `check`, `run` and the other commands say that cdc_hooks is not installed.
- A capture that fails while the schema is there (here: the outbox refuses
  rows): the app's statement fails, so no change is ever committed
  uncaptured. (A dropped or renamed captured column is not a failure: the
  capture records what is left, see tests/test_capture.py.)
"""

from __future__ import annotations

import time

import psycopg
import pytest
from faultkit import answer, delivery, record, scaled
from receivers import wait_until

pytestmark = pytest.mark.faults


def test_writes_keep_working_while_the_relay_is_down(world, relays):
    writes = scaled(500, 20000)
    world.setup(delivery())
    receiver = world.receiver()
    receiver.on("/hook", answer())
    world.add_listener(receiver.url())
    relay = relays(world)
    world.insert(1, 1)
    receiver.wait_ok(1)
    wait_until(lambda: world.scalar("SELECT count(*) FROM cdc_hooks.waiters") == 1,
               message="the relay waits for work")
    relay.kill()  # its waiter row stays, its lock is gone
    notified = len([p for p in world.notifies.payloads if p[0] == "cdc_hooks"])
    failures = 0
    with psycopg.connect(world.dsn, autocommit=True) as app:
        for i in range(2, writes + 2):  # one row per transaction: the app's usual write
            try:
                app.execute("INSERT INTO person (id, name) VALUES (%s, 'w')", (i,))
            except psycopg.Error:
                failures += 1
    assert failures == 0
    assert world.scalar("SELECT count(*) FROM person") == writes + 1
    backlog = world.scalar("SELECT count(*) FROM cdc_hooks.outbox")
    assert backlog == writes, "every write captured, none dispatched"
    time.sleep(0.5)  # a NOTIFY would have arrived by now
    assert len([p for p in world.notifies.payloads if p[0] == "cdc_hooks"]) == notified, \
        "writers notified with no relay waiting"
    started = time.monotonic()
    relays(world)
    receiver.wait_ok(writes + 1, timeout=300)
    drained = time.monotonic() - started
    world.wait_settled()
    assert {h.json["key"]["id"] for h in receiver.ok_hits()} == set(range(1, writes + 2))
    world.assert_no_leaks()
    record("Relay down, app writing", f"relay SIGKILLed, {writes:,} single-row transactions",
           events=writes, faults=1, lost=0, recovery=drained,
           notes=f"0 failed writes, outbox grew to {backlog:,} rows, no NOTIFY sent; "
                 "recovery: the next relay's drain")


def test_dropping_the_schema_by_mistake(world, relays):
    world.setup(delivery())
    receiver = world.receiver()
    receiver.on("/hook", answer())
    world.add_listener(receiver.url())
    relay = relays(world)
    world.insert(1, 1)
    receiver.wait_ok(1)

    world.conn.execute("DROP SCHEMA cdc_hooks CASCADE")
    world.insert(2, 100)  # the app goes on, uncaptured
    world.move(1, 100)
    world.conn.execute("DELETE FROM person WHERE id > 50")
    assert world.scalar("SELECT count(*) FROM person") == 50
    assert world.scalar("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'cdc\\_hooks\\_%%'") == 0

    # A running relay says so and stops: loud, one line, no traceback.
    wait_until(lambda: not relay.running, timeout=30, message="the relay stops")
    assert relay.proc.returncode == 1, relay.log()
    log = relay.log()
    assert "Traceback" not in log, log
    (line,) = [x for x in log.splitlines() if x.startswith("error:")]
    assert "cdc_hooks" in line and "run cdc-hooks install" in line, line
    check = world.cli("check")
    assert check.exit_code == 1 and "schema cdc_hooks is not installed" in check.stdout
    for args in (["status"], ["listeners", "list"], ["deliveries"], ["listeners", "pause", "1"]):
        result = world.cli(*args)
        assert result.exit_code == 1, (args, result.output)
        assert result.stderr.startswith("error: cdc_hooks is not installed"), (args, result.stderr)
        assert len(result.stderr.splitlines()) == 1, result.stderr
    rerun = relays(world, wait_connected=False)
    assert rerun.proc.wait(30) == 1 and "not installed" in rerun.log(), rerun.log()

    assert world.cli("install").exit_code == 0  # captured again from here on
    world.insert(101, 101)
    assert world.scalar("SELECT count(*) FROM cdc_hooks.outbox") == 1
    record("cdc_hooks schema dropped by mistake", "DROP SCHEMA cdc_hooks CASCADE under a "
           "running relay, app writing on", events=199, faults=1, lost=0,
           notes="app writes go on uncaptured (the triggers went with the schema); the relay "
                 "exits 1 with one line; check, run, status say it is not installed")


def test_a_failing_capture_fails_the_write(world):
    world.setup(delivery())
    world.insert(1, 1)
    world.conn.execute("ALTER TABLE cdc_hooks.outbox ADD CONSTRAINT broken CHECK (false) NOT VALID")
    failed = 0
    for statement in ("INSERT INTO person (id, name) VALUES (2, 'x')",
                      "UPDATE person SET name = 'x'", "DELETE FROM person"):
        with pytest.raises(psycopg.errors.CheckViolation):
            world.conn.execute(statement)
        failed += 1
    assert world.conn.execute("SELECT id, name FROM person").fetchall() == [(1, "p1")], \
        "no change committed uncaptured"
    world.conn.execute("ALTER TABLE cdc_hooks.outbox DROP CONSTRAINT broken")
    world.insert(2, 2)
    assert world.scalar("SELECT count(*) FROM cdc_hooks.outbox") == 2
    record("Capture failing", "the outbox refuses rows (a CHECK constraint)", events=failed,
           faults=failed, lost=0, notes="the app's statement fails with PostgreSQL's error: a "
                                        "change is never committed uncaptured")
