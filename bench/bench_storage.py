"""Storage benchmark: bytes per delivered event in the cdc_hooks schema.

    python bench/bench_storage.py [--dsn DSN] [--events 20000] [--body-bytes 160]

On a scratch database (created from the DSN's server, dropped at the end): a hook
on a table bench_items (id, name), one listener on a loopback receiver answering 200 "ok",
a relay (`cdc-hooks run`, its own process, no pruning). --events single-row
INSERTs (one statement each, so one event each), whose event bodies are
--body-bytes long on average (a name column of random hex pads them), are
committed and delivered. Once every delivery is recorded it prints, for each
cdc_hooks table and each of its indexes, the bytes per delivered event: first
as the relay left them (steady state: dead tuples and bloat included, after a
plain VACUUM, as autovacuum would leave them), then after VACUUM FULL (the
packed size). Tables count heap + TOAST (pg_table_size), indexes
pg_relation_size.
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
from bench_retention import Receiver, write_config
from benchkit import scratch_database

from cdc_hooks import install as installer
from cdc_hooks.config import load_config

SIZES = """
SELECT c.relname::text, coalesce(t.relname, '')::text,
       CASE WHEN c.relkind = 'i' THEN pg_relation_size(c.oid) ELSE pg_table_size(c.oid) END
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_index i ON i.indexrelid = c.oid
LEFT JOIN pg_class t ON t.oid = i.indrelid
WHERE n.nspname = 'cdc_hooks' AND c.relkind IN ('r', 'i')
ORDER BY coalesce(t.relname, c.relname), c.relkind DESC, c.relname
"""
HISTORY = ("events", "deliveries", "attempts")


def sizes(conn: psycopg.Connection[Any]) -> list[tuple[str, str, int]]:
    return [(name, table, int(size)) for name, table, size in conn.execute(SIZES)]


def report(label: str, rows: list[tuple[str, str, int]], events: int) -> int:
    """Prints bytes per event of each relation; returns the schema's total."""
    print(f"\n{label}: bytes per delivered event")
    totals: dict[str, int] = {}
    for name, table, size in rows:
        owner = table or name
        totals[owner] = totals.get(owner, 0) + size
        if size and (owner in HISTORY or not table):
            print(f"  {'  ' + name if table else name:34} {size / events:8.1f}")
    for owner in HISTORY:
        print(f"  {owner + ' with its indexes':34} {totals.get(owner, 0) / events:8.1f}")
    total = sum(totals.values())
    print(f"  {'schema cdc_hooks, all':34} {total / events:8.1f}")
    return total


def posted_body(conn: psycopg.Connection[Any]) -> str:
    """SQL for the body POSTed of a row of cdc_hooks.events (stored whole before
    schema version 14, without its envelope since)."""
    compact = conn.execute("SELECT to_regproc('cdc_hooks.event_body') IS NOT NULL").fetchone()
    return ("cdc_hooks.event_body(events.id, events.hook, events.kind, events.occurred_at, body)"
            if compact and compact[0] else "body::text")


def envelope_bytes(conn: psycopg.Connection[Any]) -> int:
    """An event body's length without its name, for the row with id 1 (delivered)."""
    probe = conn.execute(
        f"SELECT octet_length({posted_body(conn)}) - length(name) FROM cdc_hooks.events, bench_items "
        "WHERE bench_items.id = 1 ORDER BY events.id LIMIT 1").fetchone()
    assert probe is not None
    return int(probe[0])


def padded_rows(events: int, body_bytes: int, envelope: int) -> list[tuple[str]]:
    """Rows 2..events, with names that bring their bodies to body_bytes: the row's
    id is in the body twice (event id, key)."""
    return [(secrets.token_hex(body_bytes)[:max(1, body_bytes - envelope - 2 * (len(str(i)) - 1))],)
            for i in range(2, events + 1)]


def wait(predicate: Any, timeout: float, what: str, relay: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if relay.poll() is not None:
            raise SystemExit(f"the relay exited ({relay.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.2)


def delivered(conn: psycopg.Connection[Any]) -> int:
    return int(conn.execute("SELECT count(*) FROM cdc_hooks.deliveries "
                            "WHERE status = 'delivered'").fetchone()[0])  # type: ignore[index]


def bench(dsn: str, events: int, body_bytes: int) -> int:
    receiver = Receiver()
    folder = Path(tempfile.mkdtemp(prefix="cdc-hooks-storage-bench-"))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE bench_items (id bigserial PRIMARY KEY, name text)")
        write_config(folder / "cdc_hooks.toml", dsn, None)
        installer.install(load_config(folder / "cdc_hooks.toml"))
        conn.execute("INSERT INTO cdc_hooks.listeners (hook, url, secret) VALUES ('items', %s, "
                     "'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw')",
                     (f"http://127.0.0.1:{receiver.port}/hook",))
        with (folder / "relay.log").open("wb") as log:
            relay = subprocess.Popen([sys.executable, "-m", "cdc_hooks", "--config",
                                      str(folder / "cdc_hooks.toml"), "run"],
                                     stdout=log, stderr=subprocess.STDOUT)
        try:
            conn.execute("INSERT INTO bench_items (name) VALUES ('x')")
            wait(lambda: delivered(conn) == 1, 60, "the calibration event", relay)
            rows = padded_rows(events, body_bytes, envelope_bytes(conn))
            start = time.monotonic()
            with conn.transaction(), conn.cursor() as cur:  # one statement, one event each
                cur.executemany("INSERT INTO bench_items (name) VALUES (%s)", rows)
            wait(lambda: delivered(conn) >= events, 600, f"{events} deliveries", relay)
            print(f"{events} events delivered in {time.monotonic() - start:.1f} s; receiver got "
                  f"{receiver.count}; body bytes: "
                  + str(conn.execute(f"SELECT round(avg(octet_length({posted_body(conn)})), 1) "
                                     "FROM cdc_hooks.events").fetchone()[0]))  # type: ignore[index]
        finally:
            relay.terminate()
            relay.wait(30)
        conn.execute("VACUUM cdc_hooks.events, cdc_hooks.deliveries, cdc_hooks.attempts, "
                     "cdc_hooks.outbox")
        report("steady state (as the relay left them, after a plain VACUUM)", sizes(conn), events)
        conn.execute("VACUUM FULL cdc_hooks.events, cdc_hooks.deliveries, cdc_hooks.attempts, "
                     "cdc_hooks.outbox")
        report("after VACUUM FULL", sizes(conn), events)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dsn", default=os.environ.get("CDC_HOOKS_DSN")
                        or "postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--body-bytes", type=int, default=160)
    args = parser.parse_args()
    with scratch_database(args.dsn, "cdc_hooks_storage_bench") as dsn:
        return bench(dsn, args.events, args.body_bytes)


if __name__ == "__main__":
    sys.exit(main())
