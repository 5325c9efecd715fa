"""Retention benchmark: table and index sizes under a steady load, with and without pruning.

    python bench/bench_retention.py [--dsn DSN | --own-server] [--rate 1000] [--minutes 4] [--keep 90]
                                    [--baseline-minutes M] [--sample-every S]

The long steady run in README: --own-server --minutes 60 --keep 300 --baseline-minutes 0
--sample-every 60 (retention only; an hour of baseline would only show linear growth).

Two runs in the same session, each on a scratch database (created from the DSN's
server, dropped at the end; --own-server: a PostgreSQL of its own, initdb'd in a
temp dir with default settings, autovacuum on, for a server whose autovacuum is
off, as test servers often are): a writer inserts --rate rows/s into a hooked table
(10 multi-row INSERTs a second), a relay (`cdc-hooks run`, its own process)
delivers every change to one listener, a loopback receiver answers 200.

- baseline: no pruning ([retention] interval = 0);
- retention: everything finished is kept --keep seconds ([retention] *_days =
  keep / 86400), relays prune every 15 s.

Every --sample-every s (default 15) it samples the size of cdc_hooks.events,
deliveries, attempts and outbox (heap + indexes, pg_total_relation_size), dead
tuples, the backlog and the relay's CPU (share of one core since the last sample).
It reports the samples and two ratios: retention's growth over the last third of
the run (≈ 1: the tables stopped growing, space is reused),
and retention's final total ÷ the baseline's (how much it saves at this length).
Autovacuum runs as configured by schema version 2 (migration 0002).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
from aiohttp import web
from benchkit import cpu_seconds, scratch_database

from cdc_hooks import install as installer
from cdc_hooks.config import load_config

TABLES = ("events", "deliveries", "attempts", "outbox")


class Receiver:
    """Answers 200 to everything, counting, on its own thread and loop."""

    def __init__(self) -> None:
        self.count = 0
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.port = asyncio.run_coroutine_threadsafe(self._serve(), self.loop).result(10)

    async def _serve(self) -> int:
        async def handle(request: web.Request) -> web.Response:
            await request.read()
            self.count += 1
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_post("/hook", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return int(runner.addresses[0][1])


def write_config(path: Path, dsn: str, keep: float | None) -> None:
    retention = "interval = 0\n" if keep is None else (
        "interval = 15\n" + "".join(f"{k} = {keep / 86400!r}\n" for k in (
            "delivered_days", "failed_days", "attempts_days", "events_days")))
    path.write_text(
        f'[database]\ndsn = "{dsn}"\n\n[[hooks]]\nname = "items"\ntable = "bench_items"\n\n'
        "[delivery]\nallow_private_networks = true\n\n[retention]\n" + retention)


def writer(dsn: str, rate: int, seconds: float, stop: threading.Event) -> None:
    per_tick = max(1, rate // 10)
    with psycopg.connect(dsn, autocommit=True) as conn:
        start = time.monotonic()
        tick = 0
        while not stop.is_set() and time.monotonic() - start < seconds:
            conn.execute("INSERT INTO bench_items (region, name, amount) "
                         "SELECT 'eu', 'item ' || i, i FROM generate_series(1, %s) i", (per_tick,))
            tick += 1
            time.sleep(max(0.0, start + tick * 0.1 - time.monotonic()))


def sample(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for table in TABLES:
        size, dead = conn.execute(
            "SELECT pg_total_relation_size(c.oid), coalesce(s.n_dead_tup, 0) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid "
            "WHERE n.nspname = 'cdc_hooks' AND c.relname = %s", (table,)).fetchone() or (0, 0)
        row[table] = size
        row[table + "_dead"] = dead
    row["pending"] = conn.execute(
        "SELECT (SELECT count(*) FROM cdc_hooks.deliveries WHERE status = 'pending')"
        " + (SELECT count(*) FROM cdc_hooks.outbox)").fetchone()[0]  # type: ignore[index]
    return row


def run(server: str, mode: str, keep: float | None, rate: int, seconds: float,
        receiver: Receiver, every: float) -> list[tuple[float, dict[str, Any]]]:
    folder = Path(tempfile.mkdtemp(prefix="cdc-hooks-retention-bench-"))
    relay = None
    with scratch_database(server, "cdc_hooks_retention_bench") as dsn:
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("CREATE TABLE bench_items (id bigserial PRIMARY KEY, region text, "
                             "name text, amount numeric)")
                write_config(folder / "cdc_hooks.toml", dsn, keep)
                config = load_config(folder / "cdc_hooks.toml")
                installer.install(config)
                conn.execute("INSERT INTO cdc_hooks.listeners (hook, url, secret) VALUES ('items', %s, "
                             "'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw')",
                             (f"http://127.0.0.1:{receiver.port}/hook",))
                log = (folder / "relay.log").open("wb")
                relay = subprocess.Popen([sys.executable, "-m", "cdc_hooks", "--config",
                                          str(folder / "cdc_hooks.toml"), "run"],
                                         stdout=log, stderr=subprocess.STDOUT)
                stop = threading.Event()
                thread = threading.Thread(target=writer, args=(dsn, rate, seconds, stop))
                start = time.monotonic()
                thread.start()
                samples = []
                cpu_before, at_before = 0.0, 0.0
                while thread.is_alive():
                    time.sleep(every - (time.monotonic() - start) % every)
                    at, cpu = time.monotonic() - start, cpu_seconds(relay.pid)
                    samples.append((at, sample(conn) | {"cpu": (cpu - cpu_before) / (at - at_before)}))
                    cpu_before, at_before = cpu, at
                    print(f"  {mode:9} {format_row(*samples[-1])}", flush=True)
                thread.join()
                return samples
        finally:
            if relay is not None:
                relay.terminate()
                relay.wait(30)


def mb(size: int) -> str:
    return f"{size / 1e6:8.1f}"


def format_row(at: float, row: dict[str, Any]) -> str:
    sizes = " ".join(mb(row[t]) for t in TABLES)
    dead = " ".join(f"{row[t + '_dead']:8d}" for t in TABLES[:3])
    return (f"{at:6.0f} s {sizes} {mb(sum(row[t] for t in TABLES))}   {dead} {row['pending']:8d}"
            f" {row['cpu']:7.0%}")


class OwnServer:
    """initdb + pg_ctl on a free port (as the postgres user when run as root)."""

    def __init__(self) -> None:
        self.bin = next(p for p in (Path("/usr/lib/postgresql/15/bin"),
                                    Path(shutil.which("pg_ctl") or "/").parent)
                        if (p / "pg_ctl").exists())
        self.dir = Path(tempfile.mkdtemp(prefix="cdc-hooks-retention-pg-"))
        self.user = "postgres" if os.geteuid() == 0 else None
        if self.user:
            shutil.chown(self.dir, self.user)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self._run("initdb", "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres",
                  "--no-sync")
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-l", str(self.dir / "log"), "-o",
                  f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1", "-w", "start")
        self.dsn = f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run([str(self.bin / tool), *args], check=True, user=self.user,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)

    def close(self) -> None:
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dsn", default=os.environ.get("CDC_HOOKS_DSN")
                        or "postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--own-server", action="store_true",
                        help="run on a PostgreSQL of its own (default settings)")
    parser.add_argument("--rate", type=int, default=1000, help="rows per second")
    parser.add_argument("--minutes", type=float, default=4.0)
    parser.add_argument("--keep", type=float, default=90.0, help="retention, seconds (>= 86.4)")
    parser.add_argument("--baseline-minutes", type=float,
                        help="length of the run without pruning (default --minutes; 0 skips it)")
    parser.add_argument("--sample-every", type=float, default=15.0, help="seconds")
    args = parser.parse_args()
    server = OwnServer() if args.own_server else None
    try:
        return bench(server.dsn if server else args.dsn, args)
    finally:
        if server is not None:
            server.close()


def bench(dsn: str, args: argparse.Namespace) -> int:
    with psycopg.connect(dsn) as conn:
        autovacuum = conn.execute("SHOW autovacuum").fetchone()[0]  # type: ignore[index]
    receiver = Receiver()
    print(f"server autovacuum: {autovacuum}")
    print(f"{args.rate} rows/s for {args.minutes:g} min; retention keeps {args.keep:g} s")
    print(f"  {'run':9} {'at':>8} {'events':>8} {'deliv':>8} {'attempts':>8} {'outbox':>8} "
          f"{'total MB':>8}   {'dead ev':>8} {'dead del':>8} {'dead att':>8} {'backlog':>8} "
          f"{'relay CPU':>8}")
    baseline_minutes = args.minutes if args.baseline_minutes is None else args.baseline_minutes
    results = {}
    for mode, keep, minutes in (("baseline", None, baseline_minutes),
                                ("retention", args.keep, args.minutes)):
        if minutes > 0:
            results[mode] = run(dsn, mode, keep, args.rate, minutes * 60, receiver,
                                args.sample_every)

    def total(row: dict[str, Any]) -> int:
        return sum(row[t] for t in TABLES)

    def growth(samples: list[tuple[float, dict[str, Any]]]) -> float:
        """Total size at the end of the writes ÷ two thirds into them."""
        end = samples[-1][0]
        two_thirds = min(samples, key=lambda s: abs(s[0] - end * 2 / 3))[1]
        last = next(r for at, r in samples if at == end)
        return total(last) / max(1, total(two_thirds))

    for mode, samples in results.items():
        print(f"{mode}: growth over the last third of the run (size at the end ÷ two thirds "
              f"in): {growth(samples):.2f}  (1.00: stopped growing; 1.50: linear)")
    if len(results) == 2 and baseline_minutes == args.minutes:
        print(f"retention ÷ baseline, size at the end: "
              f"{total(results['retention'][-1][1]) / max(1, total(results['baseline'][-1][1])):.2f}")
    rows = args.rate * 60 * (args.minutes + baseline_minutes)
    print(f"receiver got {receiver.count} requests for {rows:.0f} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
