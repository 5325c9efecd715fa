"""Capture benchmark: what cdc-hooks' triggers cost the application's writes.

    python bench/bench_capture.py [--dsn DSN] [--quick] [--seconds N] [--repeats N]

The DSN (--dsn, else CDC_HOOKS_DSN, else postgresql://postgres@127.0.0.1:5432/test)
is only used to create a scratch database ``cdc_hooks_bench_<pid>_<random>``,
dropped at the end: user data is never touched. Hooks are installed with
cdc_hooks.install.install, as ``cdc-hooks install`` does, so this measures what
users get. Every figure is printed beside its baseline measured in the same run
(medians of --repeats runs, alternating with and without hooks, since the
machine is shared and noisy):

1. Write overhead: 8 concurrent writers (pgbench -c 8 -j 2 -T N, or threads if
   pgbench is missing) committing single-row INSERTs into a 5-column table; TPS
   with hooks / TPS without, in each state a relay can leave the wake-up path in:
   - no relay: cdc_hooks.waiters is empty;
   - relay waiting: a connection did LISTEN cdc_hooks and registered its pid
     (sql/queries.sql register_waiter); at the first notification it
     unregisters, as the relay does when it wakes;
   - waiter stays: the same, but it never unregisters, so every commit
     notifies (the worst case, not a state the relay stays in);
   - relay killed: the waiter's backend was terminated, its row left behind.
   "notified" counts the commits that sent NOTIFY (seen by a plain listener).
   Also, when the server runs on this host: the backends' CPU per write (8
   connections, no relay), with hooks / without, which other work on a shared
   machine moves far less than TPS.
2. Bulk: one 200,000-row UPDATE; seconds with hooks / without.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from benchkit import named_statements, scratch_database, with_identifiers
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from cdc_hooks.config import Config, parse_config
from cdc_hooks.db import Database
from cdc_hooks.install import install

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"
CLIENTS, THREADS = 8, 2
BULK_ROWS = 200_000
WRITE_BAR, BULK_BAR = 0.75, 2.0

BASELINE = "baseline"
# (state, label, bar): the wake-up states measured with hooks installed.
STATES = (
    ("no_relay", "write TPS, no relay", WRITE_BAR),
    ("waiting", "write TPS, relay waiting (wakes, leaves)", None),
    ("stays", "write TPS, waiter stays (every commit notifies)", None),
    ("killed", "write TPS, relay killed (stale waiter row)", WRITE_BAR),
)


SQL = named_statements(Path(__file__).with_name("bench_capture.sql"))


def q(name: str, **identifiers: str) -> sql.Composed:
    return with_identifiers(SQL[name], **identifiers)


def scalar(conn: psycopg.Connection[Any], name: str, **params: Any) -> Any:
    row = conn.execute(q(name), params or None).fetchone()
    return row[0] if row else None


def hook_config(dsn: str, *, with_hooks: bool) -> Config:
    """The config a user would write: the two tables, default events and provides."""
    hooks = [{"name": "bench_writes", "table": "public.bench_writes"},
             {"name": "bench_bulk", "table": "public.bench_bulk"}]
    return parse_config({"database": {"dsn": dsn}, "hooks": hooks if with_hooks else []})


@dataclass
class Hooks:
    """Installs or removes the hooks through the project's own install."""

    dsn: str
    installed: bool | None = None

    def set(self, on: bool) -> None:
        if self.installed != on:
            install(hook_config(self.dsn, with_hooks=on))
            self.installed = on


# Relay simulation -------------------------------------------------------------

class Listener:
    """A LISTEN cdc_hooks connection, optionally registered as a waiting relay.

    A registered listener that ``leaves_on_wake`` unregisters at its first
    notification, as the relay does when it wakes to work.
    """

    def __init__(self, dsn: str, *, register: bool, leaves_on_wake: bool = False) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.db = Database(self.conn)
        self.conn.execute(q("listen"))
        self.registered = register
        if register:
            self.db.run("register_waiter")
        self.leaves_on_wake = leaves_on_wake
        self.notified = 0
        self.pid = int(scalar(self.conn, "backend_pid"))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._stop.is_set():
            # Not in the loop body: notifies() holds the connection's lock.
            batch = list(self.conn.notifies(timeout=0.2, stop_after=1))
            self.notified += len(batch)
            if batch and self.registered and self.leaves_on_wake:
                self.db.run("unregister_waiter")
                self.registered = False

    def close(self) -> int:
        self._stop.set()
        self._thread.join()
        self.conn.close()
        return self.notified


def leave_killed_waiter(conn: psycopg.Connection[Any], dsn: str) -> None:
    """Registers a waiter, then terminates its backend: its row stays behind."""
    with psycopg.connect(dsn, autocommit=True) as victim:
        victim.execute(q("listen"))
        Database(victim).run("register_waiter")
        pid = int(scalar(victim, "backend_pid"))
        scalar(conn, "terminate_backend", pid=pid)
        while scalar(conn, "backend_alive", pid=pid):
            time.sleep(0.05)
    assert scalar(conn, "waiter_rows") == 1, "the killed waiter's row should stay"


# Writers ---------------------------------------------------------------------------

def pgbench_tps(dsn: str, script: Path, seconds: int) -> float:
    """TPS of 8 pgbench clients running the script (password via the environment)."""
    info = conninfo_to_dict(dsn)
    env = dict(os.environ)
    if "password" in info:
        env["PGPASSWORD"] = str(info.pop("password"))
    command = ["pgbench", "-n", "-c", str(CLIENTS), "-j", str(THREADS), "-T", str(seconds),
               "-f", str(script), make_conninfo("", **info)]
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    match = re.search(r"^tps = ([\d.]+)", out.stdout, re.MULTILINE)
    if out.returncode != 0 or not match:
        raise RuntimeError(f"pgbench failed:\n{out.stdout}\n{out.stderr}")
    return float(match.group(1))


def thread_tps(dsn: str, seconds: int) -> float:
    """The fallback without pgbench: 8 threads, each with its own connection."""
    conns = [psycopg.connect(dsn, autocommit=True) for _ in range(CLIENTS)]
    counts = [0] * CLIENTS
    start = threading.Barrier(CLIENTS + 1)
    deadline = [0.0]

    def write(i: int) -> None:
        start.wait()
        while time.monotonic() < deadline[0]:
            conns[i].execute(q("thread_insert"))
            counts[i] += 1

    workers = [threading.Thread(target=write, args=(i,)) for i in range(CLIENTS)]
    for w in workers:
        w.start()
    began = time.monotonic()
    deadline[0] = began + seconds
    start.wait()
    for w in workers:
        w.join()
    elapsed = time.monotonic() - began
    for c in conns:
        c.close()
    return sum(counts) / elapsed


@dataclass
class WriteRun:
    tps: list[float] = field(default_factory=list)
    notified: list[int] = field(default_factory=list)


def write_run(conn: psycopg.Connection[Any], dsn: str, state: str,
              writers: Callable[[], float]) -> tuple[float, int]:
    """One timed run of the writers in a wake-up state: (TPS, commits that notified)."""
    conn.execute(q("reset_writes"))
    conn.execute(q("checkpoint"))
    if state == "killed":
        leave_killed_waiter(conn, dsn)
    waiter = None
    if state in ("waiting", "stays"):
        waiter = Listener(dsn, register=True, leaves_on_wake=state == "waiting")
    counter = Listener(dsn, register=False)
    try:
        tps = writers()
    finally:
        time.sleep(0.3)  # let the last notifications arrive
        notified = counter.close()
        if waiter is not None:
            waiter.close()
    written, captured = conn.execute(q("writes_captured")).fetchone()  # type: ignore[misc]
    expected = 0 if state == BASELINE else written
    assert captured == expected, f"{state}: {written} rows written, {captured} captured"
    return tps, notified


def measure_writes(conn: psycopg.Connection[Any], dsn: str, hooks: Hooks, seconds: int,
                   repeats: int) -> dict[str, WriteRun]:
    script = Path(tempfile.mkdtemp(prefix="cdc_hooks_bench_")) / "insert.sql"
    script.write_text(SQL["pgbench_insert"] + "\n", encoding="utf-8")
    if shutil.which("pgbench"):
        def writers() -> float:
            return pgbench_tps(dsn, script, seconds)
    else:
        def writers() -> float:
            return thread_tps(dsn, seconds)
    runs = {name: WriteRun() for name in (BASELINE, *(s[0] for s in STATES))}
    order = [BASELINE, *(s[0] for s in STATES)]
    for r in range(repeats):
        # ABBA order, so a drift of the machine weighs on both sides alike.
        for state in order if r % 2 == 0 else reversed(order):
            hooks.set(state != BASELINE)
            tps, notified = write_run(conn, dsn, state, writers)
            runs[state].tps.append(tps)
            runs[state].notified.append(notified)
            log(f"  writes {state:<9} {tps:9.0f} TPS  notified {notified}")
    shutil.rmtree(script.parent)
    return runs


# Server CPU per write -----------------------------------------------------------------

CPU_WRITES = 1000  # per connection and run


def backend_cpu_ns(pid: int) -> int | None:
    """CPU time a local PostgreSQL backend has used (None: not a backend of this host)."""
    try:
        if b"postgres" not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return None
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
    except OSError:
        return None


def cpu_per_write(dsn: str) -> float | None:
    """Backend CPU (us) per single-row write over 8 connections: unlike TPS, barely
    moved by other work on a shared machine. None when the server is not local."""
    conns = [psycopg.connect(dsn, autocommit=True) for _ in range(CLIENTS)]
    try:
        pids = [int(scalar(c, "backend_pid")) for c in conns]
        before = [backend_cpu_ns(p) for p in pids]
        if None in before:
            return None

        def write(c: psycopg.Connection[Any]) -> None:
            for _ in range(CPU_WRITES):
                c.execute(q("thread_insert"))

        workers = [threading.Thread(target=write, args=(c,)) for c in conns]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        after = [backend_cpu_ns(p) for p in pids]
        used = sum(a - b for a, b in zip(after, before, strict=True))  # type: ignore[operator]
        return used / (CLIENTS * CPU_WRITES) / 1000
    finally:
        for c in conns:
            c.close()


def measure_cpu(conn: psycopg.Connection[Any], dsn: str, hooks: Hooks,
                repeats: int) -> dict[bool, list[float]]:
    """Backend CPU per write without and with hooks (no relay), ABBA order."""
    cpu: dict[bool, list[float]] = {False: [], True: []}
    for r in range(repeats):
        for on in (False, True) if r % 2 == 0 else (True, False):
            hooks.set(on)
            conn.execute(q("reset_writes"))
            used = cpu_per_write(dsn)
            if used is None:
                return {}
            cpu[on].append(used)
            log(f"  cpu    {'hooks' if on else 'bare':<9} {used:9.1f} us per write")
    return cpu


# Bulk ------------------------------------------------------------------------------

def bulk_run(conn: psycopg.Connection[Any], hooks: Hooks, on: bool) -> float:
    hooks.set(on)
    conn.execute(q("prepare_bulk"))
    conn.execute(q("vacuum_bulk"))
    conn.execute(q("checkpoint"))
    began = time.perf_counter()
    conn.execute(q("bulk_update"))
    elapsed = time.perf_counter() - began
    chunks, rows = conn.execute(q("outbox_rows")).fetchone()  # type: ignore[misc]
    expected = (BULK_ROWS // 1000, BULK_ROWS) if on else (0, 0)
    assert (chunks, rows) == expected, f"outbox holds {chunks} chunks, {rows} rows"
    return elapsed


def measure_bulk(conn: psycopg.Connection[Any], hooks: Hooks,
                 repeats: int) -> dict[bool, list[float]]:
    times: dict[bool, list[float]] = {False: [], True: []}
    for r in range(repeats):
        for on in (False, True) if r % 2 == 0 else (True, False):
            times[on].append(bulk_run(conn, hooks, on))
            log(f"  bulk   {'hooks' if on else 'bare':<9} {times[on][-1]:9.3f} s")
    return times


# Report ----------------------------------------------------------------------------

def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def verdict(ok: bool | None) -> str:
    return "" if ok is None else ("ok" if ok else "MISSED")


def report(writes: dict[str, WriteRun], bulk: dict[bool, list[float]],
           cpu: dict[bool, list[float]]) -> list[str]:
    base = statistics.median(writes[BASELINE].tps)
    lines = [f"{'measure':<50}{'hooks':>10}{'baseline':>10}{'ratio':>8}  {'bar':<8}"
             f"{'':<7}notified/run"]
    for state, label, bar in STATES:
        tps = statistics.median(writes[state].tps)
        ratio = tps / base
        ok = None if bar is None else ratio >= bar
        bar_text = f">= {bar}" if bar else "(info)"
        notified = int(statistics.median(writes[state].notified))
        lines.append(f"{label:<50}{tps:>10,.0f}{base:>10,.0f}{ratio:>8.2f}  {bar_text:<8}"
                     f"{verdict(ok):<7}{notified:,}")
    if cpu:
        hooked, bare = statistics.median(cpu[True]), statistics.median(cpu[False])
        lines.append(f"{'server CPU per write, no relay (us)':<50}{hooked:>10.1f}{bare:>10.1f}"
                     f"{hooked / bare:>7.2f}x  (info)")
    hooked, bare = statistics.median(bulk[True]), statistics.median(bulk[False])
    ratio = hooked / bare
    lines.append(f"{'bulk UPDATE of 200,000 rows (seconds)':<50}{hooked:>10.3f}{bare:>10.3f}"
                 f"{ratio:>7.2f}x  {'<= 2.0x':<8}{verdict(ratio <= BULK_BAR)}")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", help="server to use (a scratch database is created on it)")
    parser.add_argument("--quick", action="store_true", help="3 s runs, 1 repeat: a smoke test")
    parser.add_argument("--seconds", type=int, help="seconds per write run (default 6)")
    parser.add_argument("--repeats", type=int, help="runs of each measurement (default 5)")
    args = parser.parse_args(argv)
    args.dsn = args.dsn or os.environ.get("CDC_HOOKS_DSN") or DEFAULT_DSN
    args.seconds = args.seconds or (3 if args.quick else 6)
    args.repeats = args.repeats or (1 if args.quick else 5)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with scratch_database(args.dsn, "cdc_hooks_bench") as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        version = scalar(conn, "server_version")
        log(f"scratch database ready; creating tables ({BULK_ROWS:,} bulk rows)")
        conn.execute(q("create_tables"))
        hooks = Hooks(dsn)
        hooks.set(True)  # creates the cdc_hooks schema once, for the whole run
        writes = measure_writes(conn, dsn, hooks, args.seconds, args.repeats)
        cpu = measure_cpu(conn, dsn, hooks, args.repeats)
        bulk = measure_bulk(conn, hooks, args.repeats)
    writer = "pgbench" if shutil.which("pgbench") else "threads (pgbench missing)"
    print(f"PostgreSQL {version}, {os.cpu_count()} CPUs; {CLIENTS} writers via {writer}, "
          f"{args.seconds} s per run; medians of {args.repeats} run(s) each")
    print("\n".join(report(writes, bulk, cpu)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
