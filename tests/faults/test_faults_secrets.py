"""Secrets stay secret through everything a deployment does.

Every scenario of this suite ends with World.assert_no_leaks(): the value of
the never-provided column (a canary) and every listener secret appear nowhere
in the cdc_hooks schema but listeners.secret, in no NOTIFY payload, no relay
log, no receiver body. This scenario runs the widest path in one go: inserts,
updates (of provided columns, and of the secret column alone), deletes, a
bulk statement, custom events, a backfill, retries, dead letters,
redelivery, a 410, pause and resume, a rotated secret, and the capture's
fallback path after a provided column is renamed; the CLI's listings are
searched too.
"""

from __future__ import annotations

import psycopg
import pytest
from faultkit import answer, delivery, flaky, record
from psycopg import sql
from psycopg.conninfo import make_conninfo
from receivers import wait_until

from cdc_hooks.db import Database
from cdc_hooks.services import listeners

pytestmark = pytest.mark.faults


def test_no_secret_leaks_anywhere(world, relays):
    config = world.setup(delivery(retry_schedule=[0.2, 0.2]))
    receiver = world.receiver()
    receiver.on("/all", answer())
    receiver.on("/flaky", flaky(0.5, seed=3))
    receiver.on("/rejects", answer(400, body="no thanks"))
    receiver.on("/gone", answer(410))
    receiver.on("/custom", answer())
    world.add_listener(receiver.url("/all"))
    world.add_listener(receiver.url("/flaky"), "--secret", "whsec_" + "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0")
    rejects = world.add_listener(receiver.url("/rejects"), "--match", "name=startswith:p1")
    world.add_listener(receiver.url("/gone"), "--match", "name=startswith:p2")
    world.add_listener(receiver.url("/custom"), hook="myhook")
    paused = world.add_listener(receiver.url("/paused"))
    assert world.cli("listeners", "pause", str(paused)).exit_code == 0
    relay = relays(world)

    world.stream(300)  # inserts and updates, 100 rows a statement
    world.conn.execute("UPDATE person SET secret = secret || '-changed'")  # no provided column
    world.conn.execute("INSERT INTO person (id, name) SELECT i, 'bulk' FROM generate_series(1001, 3500) i")
    world.conn.execute("DELETE FROM person WHERE id BETWEEN 250 AND 300")
    world.conn.execute("SELECT cdc_hooks.send('myhook', '{\"message\": \"hello\", \"n\": 1}')")
    assert world.cli("send", "myhook", "message=from the cli", "n:=2").exit_code == 0
    assert world.cli("backfill", "person", "--where", "id < 50").exit_code == 0
    with Database.connect(config.dsn) as db:
        rotated = listeners.update_listener(db, config, 1, rotate_secret=True)
    assert rotated is not None
    world.listener_secrets.append(rotated)
    world.conn.execute("ALTER TABLE person RENAME COLUMN address TO street")  # fallback path
    world.insert(4001, 4100)
    world.conn.execute("UPDATE person SET secret = 'still ' || secret WHERE id > 4000")
    assert world.cli("listeners", "resume", str(paused)).exit_code == 0
    world.wait_settled(timeout=180)
    assert world.cli("redeliver", "--listener", str(rejects)).exit_code == 0
    world.wait_settled(timeout=180)

    # 300 inserts + 300 updates + 2,500 bulk + 51 deletes + 49 backfilled + 100 after the rename
    assert len(receiver.ok_hits("/all")) >= 3300 and receiver.hits("/gone")
    assert world.scalar("SELECT count(*) FROM cdc_hooks.outbox") == 0
    assert relay.running and "Traceback" not in relay.log()
    outputs = [world.cli(*args).output for args in (
        ["listeners", "list"], ["deliveries", "--limit", "10000"], ["deliveries", "--failed"],
        ["status"], ["check"])]
    needles = [world.canary, *world.listener_secrets]
    assert not [n for n in needles for text in outputs if n in text], "a listing shows a secret"
    world.assert_no_leaks()
    rows = world.scalar("SELECT count(*) FROM cdc_hooks.events")
    record("Secrets", "canary in an unprovided column; 6 listener secrets (one chosen, one "
           "rotated); every path above", events=rows, faults=0, lost=0,
           notes="found in none of: the cdc_hooks schema (but listeners.secret), "
                 f"{len(world.notifies.payloads)} NOTIFY payloads, relay logs, receiver bodies, "
                 "CLI listings; every other scenario checks the same at its end")


def test_the_leak_check_finds_a_planted_secret(world):
    """The check above would see a leak: a canary in a provided column, in a NOTIFY."""
    world.setup(delivery())
    world.conn.execute("INSERT INTO person (id, name) VALUES (1, %s)", (world.canary,))
    world.conn.execute("SELECT pg_notify('cdc_hooks', %s)", (world.canary,))
    wait_until(lambda: world.notifies.payloads, message="the NOTIFY recorded")
    assert world.leaks() == ["NOTIFY cdc_hooks", "cdc_hooks.outbox"]


HOSTILE_CAST = """
CREATE TYPE tag AS ENUM ('t', 'u');
CREATE TABLE loot (what text);
CREATE FUNCTION tag_json(value tag) RETURNS json LANGUAGE plpgsql AS $$
BEGIN
    BEGIN
        INSERT INTO loot SELECT secret FROM cdc_hooks.listeners;
    EXCEPTION WHEN OTHERS THEN NULL;
    END;
    BEGIN
        EXECUTE format('ALTER ROLE %I SUPERUSER', session_user);
    EXCEPTION WHEN OTHERS THEN NULL;
    END;
    RETURN to_json(value::text);
END
$$;
CREATE CAST (tag AS json) WITH FUNCTION tag_json(tag);
ALTER TABLE person ADD COLUMN tag tag;
"""


def test_a_hostile_application_role_reads_no_secret(world, relays):
    """The application's role owns person and converts its columns with code of its
    own (a cast to json), on the trigger's normal and fallback paths."""
    config = world.setup(delivery())
    receiver = world.receiver()
    receiver.on("/all", answer())
    world.add_listener(receiver.url("/all"))
    app = f"cdc_hostile_{world.canary[-6:]}"
    world.conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(app)))
    try:
        world.conn.execute(sql.SQL("ALTER TABLE person OWNER TO {}").format(sql.Identifier(app)))
        world.conn.execute(sql.SQL("GRANT CREATE ON SCHEMA public TO {}").format(sql.Identifier(app)))
        relay = relays(world)
        with psycopg.connect(make_conninfo(config.dsn, user=app), autocommit=True) as as_app:
            as_app.execute(HOSTILE_CAST)
            as_app.execute("ALTER TABLE person ALTER COLUMN name TYPE tag USING NULL")
            as_app.execute("INSERT INTO person (id, name, tag) "
                           "SELECT i, 't', 't' FROM generate_series(1, 50) i")
            as_app.execute("ALTER TABLE person RENAME COLUMN address TO street")  # fallback path
            as_app.execute("UPDATE person SET name = 'u', tag = 'u'")
        world.wait_settled()
        assert len(receiver.ok_hits("/all")) == 100 and relay.running
        stolen = world.scalar("SELECT count(*) FROM loot")
        superuser = world.scalar("SELECT rolsuper FROM pg_roles WHERE rolname = %s", app)
        assert (stolen, superuser) == (0, False)
        world.assert_no_leaks()
    finally:
        world.conn.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(app)))
        world.conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(app)))
    record("Secrets: hostile application role", "the table's owner converts columns with its "
           "own cast to json (provided and unprovided, normal and fallback paths), which tries "
           "to read listener secrets and become superuser", events=100, faults=2, lost=0,
           notes="the cast ran with the writer's rights: 0 secrets read, not superuser; "
                 "all 100 events delivered")
