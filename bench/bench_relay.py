"""Relay benchmark: how fast cdc-hooks delivers, against baselines of the same run.

    python bench/bench_relay.py [--dsn DSN] [--quick] [--only NAME,...] [--rev REV]
                                [--backlog N] [--profile DIR]

The DSN (--dsn, else CDC_HOOKS_DSN, else postgresql://postgres@127.0.0.1:5432/test)
is only used to create a scratch database ``cdc_hooks_relay_bench_<pid>_<random>``,
dropped at the end. The hook is installed with cdc_hooks.install.install on a
table ``bench_items`` (key id; provides region, name, amount, qty, created).
Three kinds of processes run side by side, each on its own, as in production:

- the relay: ``python -m cdc_hooks --config FILE run`` ([delivery]
  allow_private_networks = true, concurrency = listener_concurrency = 64),
  so its CPU (/proc/PID/stat utime+stime) and memory (/proc/PID/status
  VmHWM, VmRSS) are its own;
- a receiver: an aiohttp server on 127.0.0.1 that counts requests, stamps their
  arrival (CLOCK_MONOTONIC, shared by all processes), and can answer after a
  fixed delay;
- for the baseline, a bare aiohttp client POSTing as many bodies of the same
  shape (jsonb text like the relay's events; both sizes are printed) to the same
  receiver at the same concurrency, once just before and once just after each
  burst: the machine may be shared, so the baseline is the mean of the two.

Scenarios (names for --only):

  throughput  a 20,000-row INSERT (one statement, one commit) delivered to one
              listener by a relay waiting for work: deliveries/s from the commit
              to the last receipt, ÷ the bare client's POSTs/s (from its start to
              the last receipt). Bar >= 0.5.
  fanout      the same burst, 10 listeners of which 5 match (on region):
              100,000 deliveries; deliveries/s ÷ the same baseline. Bar >= 0.5.
  slow        1 listener, the receiver answers after 50 ms: deliveries/s ÷
              (concurrency ÷ 0.05 s), the most 64 requests in flight allow. Bar >= 0.5.
  latency     a writer commits single-row INSERTs at 200/s for 15 s and stamps
              each commit (after COMMIT returns, by row id); the receiver stamps
              arrival by the body's key: p50 <= 10 ms, p99 <= 50 ms.
  backlog     N events queued with no relay running (1,000,000; --quick 100,000),
              then a relay started and the backlog drained: its peak RSS (VmHWM,
              bar <= 200 MB), drain rate at N ÷ at 20,000 (first to last receipt,
              bar >= 0.8), and table sizes after draining.
  idle        CPU of a relay with nothing to do for 30 s (--quick 10 s), % of
              one core. Bar <= 1%.
  listeners   L listeners on the hook, each matching one name exactly (name=n<i>,
              as a service registers one endpoint per tenant), and a 5,000-row
              INSERT whose names are spread over them (each row reaches one
              listener), for L = 10, 100, 1,000, 2,000 and 10,000: deliveries/s from
              the commit to the last receipt, each ÷ the 10-listener rate of the same
              run. Bars: 2,000 >= 0.7, 10,000 >= 0.8.

--quick (a smoke test, ~3 minutes): 5,000-event bursts, 8 s of latency, a
100,000-event backlog (drains limited to 150 s), 10 s idle.
--rev REV: measure cdc_hooks/ and sql/ as committed at REV (exported to a
temporary directory put first on PYTHONPATH), not the work tree, so edits made
during a long run cannot change the relay under test.
Every scenario has time limits (a stuck relay fails its scenario with the
relay's log tail; a slow drain is reported as partial), and every process the
benchmark starts is stopped at the end, also on failure, Ctrl-C or SIGTERM.
--profile DIR: during the bursts, the latency run and the big backlog drain,
samples the relay with py-spy (pip install py-spy; collapsed stacks in
DIR/relay-<scenario>.txt, top functions printed) and what the relay's
PostgreSQL backends run (pg_stat_statements if the server preloads it, else
pg_stat_activity every 10 ms). Profiling slows the relay: take figures without it.

Exit status: 0 all bars met, 1 a bar missed, 2 a scenario failed to run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import functools
import io
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
from array import array
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
from aiohttp import web
from benchkit import CLK_TCK, cpu_seconds, named_statements, scratch_database, with_identifiers

import cdc_hooks
from cdc_hooks.config import Config, load_config, parse_config
from cdc_hooks.db import Database, queries
from cdc_hooks.install import install
from cdc_hooks.services.listeners import add_listener

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"
APP = "cdc_hooks_bench"  # application_name of the benchmark's own connections
HOOK = "bench_items"
CONCURRENCY = 64
RELAY_CONNECTIONS = 4  # a relay process's sessions: listen, dispatch, claim, record (relay.py)
SLOW_DELAY = 0.05
LATENCY_RATE = 200
REFERENCE_BACKLOG = 20_000
FILL_CHUNK = 50_000  # rows per INSERT ... SELECT generate_series when queueing a backlog
NO_PROGRESS = 60.0  # seconds without a new receipt before a scenario is declared stuck
SCENARIOS = ("throughput", "fanout", "slow", "latency", "backlog", "idle", "listeners")
LISTENER_COUNTS = (10, 100, 1_000, 2_000, 10_000)  # the listeners scenario; the first is its baseline
LISTENER_BARS = {2_000: 0.7, 10_000: 0.8}
LISTENER_EVENTS = 5_000
LISTENER_LIMIT = 300.0  # seconds for one count's deliveries (main took 44 s for 10,000)
REPO = Path(__file__).resolve().parent.parent
CODE_ENV, CODE_DIR_ENV = "CDC_HOOKS_BENCH_CODE", "CDC_HOOKS_BENCH_CODE_DIR"  # set by --rev


class BenchError(Exception):
    """A scenario could not run to the end (its message says why)."""


class TooSlow(BenchError):
    """The deliveries did not all arrive before the scenario's deadline."""

    def __init__(self, message: str, stats: dict[str, Any]) -> None:
        super().__init__(message)
        self.stats = stats


# Receiver process ----------------------------------------------------------------

def receiver_main(port_file: str) -> None:
    """Counts and stamps requests; /_ctl/* lets the benchmark reset and read it."""
    state: dict[str, Any] = {}

    def reset(delay: float = 0.0, stamp: bool = False) -> None:
        state.update(arrivals=array("d"), ids=set(), paths=Counter(), stamps={},
                     delay=delay, stamp=stamp)

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        now = time.monotonic()
        state["arrivals"].append(now)
        state["ids"].add(request.headers.get("webhook-id"))
        state["paths"][request.path] += 1
        if state["stamp"]:  # only the latency scenario pays for parsing
            state["stamps"].setdefault(json.loads(body)["key"]["id"], now)
        if state["delay"]:
            await asyncio.sleep(state["delay"])
        return web.Response(text="ok")

    async def control(request: web.Request) -> web.Response:
        action = request.match_info["action"]
        if action == "reset":
            reset(float(request.query.get("delay", 0)), request.query.get("stamp") == "1")
            return web.json_response({})
        if action == "stamps":
            return web.json_response({str(k): v for k, v in state["stamps"].items()})
        arrivals = state["arrivals"]
        marks = [int(m) for m in request.query.get("marks", "").split(",") if m]
        return web.json_response({
            "count": len(arrivals), "unique": len(state["ids"]),
            "first": arrivals[0] if arrivals else None, "last": arrivals[-1] if arrivals else None,
            "paths": dict(state["paths"]),
            "marks": {str(m): arrivals[m - 1] for m in marks if 0 < m <= len(arrivals)},
        })

    async def serve() -> None:
        reset()
        app = web.Application()
        app.router.add_get("/_ctl/{action}", control)
        app.router.add_post("/_ctl/{action}", control)
        app.router.add_post("/{tail:.*}", hook)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        Path(port_file).write_text(str(runner.addresses[0][1]), encoding="utf-8")
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await runner.cleanup()

    asyncio.run(serve())


# Baseline client process ------------------------------------------------------------

def client_main(url: str, bodies_file: str, count: int, concurrency: int) -> None:
    """POSTs count bodies with concurrency requests in flight; prints its start time."""
    bodies = [line.encode() for line in Path(bodies_file).read_text(encoding="utf-8").splitlines()]

    async def run() -> dict[str, Any]:
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(
                connector=connector, headers={"Content-Type": "application/json"}) as session:
            sent, failed = 0, 0

            async def worker() -> None:
                nonlocal sent, failed
                while sent < count:
                    i = sent
                    sent += 1
                    async with session.post(url, data=bodies[i % len(bodies)],
                                            headers={"webhook-id": f"msg_{i}"}) as resp:
                        await resp.read()
                        failed += resp.status != 200

            start, cpu = time.monotonic(), time.process_time()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return {"start": start, "end": time.monotonic(), "failed": failed,
                    "cpu": time.process_time() - cpu, "cpu_total": time.process_time()}

    print(json.dumps(asyncio.run(run())), flush=True)


# Statements ---------------------------------------------------------------------------

SQL = named_statements(Path(__file__).with_name("bench_relay.sql"))


def q(name: str, **identifiers: str) -> Any:
    return with_identifiers(SQL[name], **identifiers)


def rows(conn: Any, name: str, **params: Any) -> list[tuple[Any, ...]]:
    cur = conn.execute(q(name), params or None)
    return cur.fetchall() if cur.description else []


def scalar(conn: Any, name: str, **params: Any) -> Any:
    found = rows(conn, name, **params)
    return found[0][0] if found else None


# Processes --------------------------------------------------------------------------------

def _die_with_parent() -> None:
    """Runs in the child: SIGTERM it if the benchmark dies without cleaning up."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def machine_busy() -> float:
    """CPU seconds all processes of the machine used so far (/proc/stat: not idle, not iowait)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(values) - values[3] - values[4]) / CLK_TCK


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in kB."""
    found = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0])
    return found


class Process:
    """A child process with its output in a log file; stop() always ends it."""

    def __init__(self, name: str, argv: list[str], log: Path) -> None:
        self.name, self.log_path = name, log
        with log.open("ab") as out:
            self.popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True,
                                          preexec_fn=_die_with_parent,
                                          cwd=os.environ.get(CODE_DIR_ENV) or REPO)
        self.pid = self.popen.pid
        self.stopped_in: float | None = 0.0  # seconds SIGTERM took; None: it had to be killed

    def alive(self) -> bool:
        return self.popen.poll() is None

    def pids(self) -> list[int]:
        """This process and its children (a relay's other workers)."""
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                text = stat.read_text()
                if int(text[text.rindex(")") + 2:].split()[1]) == self.pid:
                    children.append(int(stat.parent.name))
        return [self.pid, *children]

    def cpu(self) -> float:
        return sum(map(cpu_seconds, self.pids()))

    def memory_kb(self, key: str) -> int:
        """VmRSS or VmHWM, summed over pids()."""
        return sum(memory_kb(pid).get(key, 0) for pid in self.pids())

    def check(self) -> None:
        if not self.alive():
            raise BenchError(f"{self.name} exited with status {self.popen.returncode}\n"
                             f"{self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        try:
            tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return "\n".join(f"    | {line}" for line in tail)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (a graceful stop), then SIGKILL after timeout."""
        if not self.alive():
            return
        began = time.monotonic()
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
            self.stopped_in = time.monotonic() - began
        except subprocess.TimeoutExpired:
            log(f"  {self.name} ignored SIGTERM for {timeout:g} s: killing it")
            self.popen.kill()
            self.popen.wait(10)
            self.stopped_in = None


class Receiver:
    """The receiver process and its control endpoints."""

    def __init__(self, workdir: Path) -> None:
        port_file = workdir / "receiver.port"
        self.process = Process("receiver", [sys.executable, __file__, "--role", "receiver",
                                            str(port_file)], workdir / "receiver.log")
        deadline = time.monotonic() + 20
        while not port_file.exists() or not port_file.read_text():
            self.process.check()
            if time.monotonic() > deadline:
                raise BenchError("the receiver did not start within 20 s")
            time.sleep(0.05)
        self.port = int(port_file.read_text())

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _get(self, action: str, method: str = "GET", **query: Any) -> Any:
        self.process.check()
        params = "&".join(f"{k}={v}" for k, v in query.items())
        request = urllib.request.Request(self.url(f"/_ctl/{action}?{params}"), method=method)
        with urllib.request.urlopen(request, timeout=30) as resp:
            return json.loads(resp.read())

    def reset(self, delay: float = 0.0, stamp: bool = False) -> None:
        self._get("reset", "POST", delay=delay, stamp=int(stamp))

    def stats(self, marks: tuple[int, ...] = ()) -> dict[str, Any]:
        return self._get("stats", marks=",".join(map(str, marks)))

    def stamps(self) -> dict[int, float]:
        return {int(k): v for k, v in self._get("stamps").items()}


# The benchmark's state ----------------------------------------------------------------

@dataclass
class Row:
    figure: str
    value: str
    baseline: str = "-"
    ratio: str = "-"
    bar: str = ""
    ok: bool | None = None


@dataclass
class Burst:
    """Where a burst's time went, measured around it."""

    deliveries: int
    seconds: float
    rate: float
    relay_cpu: float  # seconds
    backends_cpu: float
    receiver_cpu: float
    machine_cpu: float  # every process of the machine (others share it)
    duplicates: int
    first_receipt: float  # seconds from the commit


class Bench:
    def __init__(self, args: argparse.Namespace, dsn: str, workdir: Path, receiver: Receiver) -> None:
        self.args, self.dsn, self.workdir, self.receiver = args, dsn, workdir, receiver
        self.conn = psycopg.connect(dsn, autocommit=True, application_name=APP)
        self.config_dict = {
            "database": {"dsn": dsn},
            "hooks": [{"name": HOOK, "table": f"public.{HOOK}"}],
            "delivery": {"allow_private_networks": True, "concurrency": CONCURRENCY,
                         "listener_concurrency": CONCURRENCY},
        }
        self.config_file = workdir / "cdc_hooks.toml"
        self.config_file.write_text(toml(self.config_dict), encoding="utf-8")
        self._relays = self._clients = 0
        self.baseline_body_length = 0.0
        self.profiles: list[str] = []  # lines of the profiles taken (--profile)
        self.stops: list[float | None] = []  # how long each relay took to stop on SIGTERM

    def config(self) -> Config:
        return parse_config(self.config_dict)

    def install(self) -> None:
        rows(self.conn, "create_table")
        install(self.config())
        # The relay reads the file: it must say what the installed config says.
        loaded = load_config(self.config_file)
        if (loaded.dsn, loaded.hooks, loaded.delivery) != (self.dsn, self.config().hooks,
                                                           self.config().delivery):
            raise BenchError(f"{self.config_file} does not load as the installed config")

    def reset(self, listeners: list[dict[str, Any]], *, delay: float = 0.0,
              stamp: bool = False) -> None:
        """Empty tables, these listeners (/l/1, /l/2, ... by match), a receiver reset."""
        rows(self.conn, "reset")
        db = Database(self.conn)  # not closed: it wraps the benchmark's connection
        config = self.config()
        with self.conn.transaction():  # one commit: 10,000 listeners are added in seconds
            for i, match in enumerate(listeners, 1):
                add_listener(db, config, HOOK, self.receiver.url(f"/l/{i}"), match)
        self.receiver.reset(delay=delay, stamp=stamp)

    @contextmanager
    def relay(self, *, wait_ready: bool = True, workers: int | None = None) -> Iterator[Process]:
        """A relay (`run --workers`, by default --workers of the command line); ready =
        every worker connected (RELAY_CONNECTIONS each, so that backends() finds them
        all) and one registered as waiter (idle on LISTEN)."""
        self._relays += 1
        workers = workers or self.args.workers
        relay = Process("relay", [sys.executable, "-m", "cdc_hooks", "--config",
                                  str(self.config_file), "run", "--workers", str(workers)],
                        self.workdir / f"relay-{self._relays}.log")
        try:
            if wait_ready:
                self.until(lambda: len(self.backends()) >= RELAY_CONNECTIONS * workers
                           and scalar(self.conn, "relay_waiting") > 0, 30,
                           "the relay to connect and wait for work", relay)
            yield relay
        finally:
            relay.stop()
            self.stops.append(relay.stopped_in)

    def until(self, predicate: Callable[[], Any], timeout: float, what: str,
              relay: Process | None = None) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if relay is not None:
                relay.check()
            if time.monotonic() > deadline:
                tail = f"\n  relay log:\n{relay.log_tail()}" if relay else ""
                raise BenchError(f"timed out after {timeout:g} s waiting for {what}{tail}")
            time.sleep(0.1)

    def backends(self) -> list[int]:
        return [r[0] for r in rows(self.conn, "other_backends", ours=APP)]

    def insert(self, first: int, last: int, names: int = 0) -> float:
        """Rows first..last in one autocommit statement, named n1..n<names> in turn if
        names (else 'item number <i>'); returns when it committed."""
        if names:
            rows(self.conn, "insert_named_rows", first=first, last=last, names=names)
        else:
            rows(self.conn, "insert_rows", first=first, last=last)
        return time.monotonic()

    def wait_receipts(self, count: int, relay: Process, limit: float,
                      on_poll: Callable[[], None] | None = None) -> dict[str, Any]:
        """Polls the receiver until count requests arrived; fails after limit seconds
        (TooSlow), or if receipts stop for NO_PROGRESS seconds once they began (before
        the first one, the relay may still be dispatching a large backlog)."""
        seen, progress_at = -1, time.monotonic()
        deadline = progress_at + limit
        while True:
            stats = self.receiver.stats()
            if stats["unique"] >= count:  # duplicates (a timed-out request sent again) aside
                return stats
            relay.check()
            if on_poll:
                on_poll()
            now = time.monotonic()
            if now > deadline:
                raise TooSlow(f"only {stats['count']:,} of {count:,} deliveries arrived within "
                              f"{limit:.0f} s", stats)
            if stats["count"] != seen:
                seen, progress_at = stats["count"], now
            elif seen > 0 and now - progress_at > NO_PROGRESS:
                pending, delivered, dead, outbox = rows(self.conn, "delivery_counts")[0]
                raise BenchError(
                    f"no delivery for {NO_PROGRESS:g} s: receiver got {seen:,} of {count:,}; "
                    f"deliveries pending {pending:,}, delivered {delivered:,}, dead {dead:,}; "
                    f"outbox rows {outbox:,}\n  relay log:\n{relay.log_tail()}")
            time.sleep(0.1 if count - seen < 5000 else 0.25)

    def wait_recorded(self, count: int, relay: Process) -> None:
        """Every delivery recorded as delivered (results are written in batches)."""
        def done() -> bool:
            pending, delivered, dead, _ = rows(self.conn, "delivery_counts")[0]
            if dead:
                raise BenchError(f"{dead} deliveries are dead\n{relay.log_tail()}")
            return pending == 0 and delivered >= count
        self.until(done, 60, f"{count:,} deliveries to be recorded as delivered", relay)

    # Baseline --------------------------------------------------------------------------

    def baseline_run(self, count: int) -> BaselineRun:
        """One run of the bare aiohttp client: count POSTs, CONCURRENCY in flight."""
        body_file = self.workdir / "bodies.txt"
        if not body_file.exists():
            bodies = [r[0] for r in rows(self.conn, "baseline_bodies", count=count)]
            body_file.write_text("\n".join(bodies) + "\n", encoding="utf-8")
            self.baseline_body_length = statistics.mean(len(b.encode()) for b in bodies)
        self.receiver.reset()
        self._clients += 1
        receiver_before, machine_before, launched = (
            self.receiver.process.cpu(), machine_busy(), time.monotonic())
        client = Process("baseline client", [
            sys.executable, __file__, "--role", "client", self.receiver.url("/l/1"),
            str(body_file), str(count), str(CONCURRENCY)],
            self.workdir / f"client-{self._clients}.log")
        try:
            client.popen.wait(max(120, count / 100))
        except subprocess.TimeoutExpired:
            client.stop()
            raise BenchError("the baseline client did not finish in time") from None
        if client.popen.returncode != 0:
            raise BenchError(f"the baseline client failed\n{client.log_tail()}")
        result = json.loads(client.log_path.read_text().splitlines()[-1])
        stats = self.receiver.stats()
        if result["failed"] or stats["count"] < count:
            raise BenchError(f"baseline: {result['failed']} failed POSTs, "
                             f"{stats['count']} of {count} received")
        seconds = stats["last"] - result["start"]
        receiver = self.receiver.process.cpu() - receiver_before
        others = machine_busy() - machine_before - receiver - result["cpu_total"]
        run = BaselineRun(count / seconds, result["cpu"] / seconds, receiver / seconds,
                          max(0.0, others) / (time.monotonic() - launched))
        log(f"  baseline: {run.rate:,.0f} POSTs/s")
        return run


@dataclass
class BaselineRun:
    rate: float  # POSTs/s from the client's start to the last receipt
    client_cpu: float  # fractions of a core
    receiver_cpu: float
    others: float  # every other process of the machine


def toml(config: dict[str, Any]) -> str:
    """The config dict as the TOML file the relay reads (strings as JSON = TOML basic strings)."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        return json.dumps(v)

    lines = ["[database]", f"dsn = {value(config['database']['dsn'])}", ""]
    for hook in config["hooks"]:
        lines += ["[[hooks]]", *(f"{k} = {value(v)}" for k, v in hook.items()), ""]
    lines += ["[delivery]", *(f"{k} = {value(v)}" for k, v in config["delivery"].items())]
    return "\n".join(lines) + "\n"


# Profiling -------------------------------------------------------------------------------

class Profiler:
    """py-spy on the relay, plus what its PostgreSQL backends run."""

    def __init__(self, bench: Bench, relay: Process, name: str) -> None:
        self.bench, self.name = bench, name
        self.out = Path(bench.args.profile) / f"relay-{name}.txt"
        self.pyspy: subprocess.Popen[bytes] | None = None
        spy = Path(sys.executable).with_name("py-spy")
        spy_cmd = str(spy) if spy.exists() else shutil.which("py-spy")
        self.notes: list[str] = []
        if spy_cmd:
            self.pyspy = subprocess.Popen(
                [spy_cmd, "record", "--pid", str(relay.pid), "--subprocesses", "--rate", "200",
                 "--nonblocking", "--format", "raw", "--output", str(self.out)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        else:
            self.notes.append("py-spy not found: pip install py-spy")
        self.statements = self._reset_pg_stat_statements()
        self.samples: Counter[tuple[str, str]] = Counter()
        self.sample_count = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if not self.statements:
            self._thread = threading.Thread(target=self._sample_activity, daemon=True)
            self._thread.start()
        time.sleep(0.5)  # py-spy attaches

    def _reset_pg_stat_statements(self) -> bool:
        try:
            rows(self.bench.conn, "create_pg_stat_statements")
            rows(self.bench.conn, "reset_pg_stat_statements")
            return True
        except psycopg.Error as exc:
            self.notes.append("pg_stat_statements unavailable "
                              f"({str(exc).strip().splitlines()[0]}); sampled pg_stat_activity")
            return False

    def _sample_activity(self) -> None:
        with psycopg.connect(self.bench.dsn, autocommit=True, application_name=APP) as conn:
            while not self._stop.is_set():
                for state, wait, query in rows(conn, "activity_sample", ours=APP):
                    # idle in transaction: the relay holds a transaction open while it works
                    what = "in transaction, after" if state.startswith("idle") else "running"
                    self.samples[(f"{what} {query_name(query)}", wait)] += 1
                self.sample_count += 1
                time.sleep(0.01)

    def finish(self) -> list[str]:
        self._stop.set()
        if self._thread:
            self._thread.join(5)
        lines = [f"profile of the relay during {self.name}:"]
        if self.pyspy is not None:
            self.pyspy.send_signal(signal.SIGINT)
            try:
                _, err = self.pyspy.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                self.pyspy.kill()
                err = b"py-spy did not stop"
            if self.out.exists():
                lines += summarize_stacks(self.out)
                lines.append(f"  (collapsed stacks: {self.out})")
            else:
                lines.append(f"  py-spy wrote nothing: {err.decode(errors='replace').strip()[-300:]}")
        lines += self._sql_lines()
        return lines + [f"  note: {n}" for n in self.notes]

    def _sql_lines(self) -> list[str]:
        if self.statements:
            top = rows(self.bench.conn, "top_statements")
            total = sum(r[1] for r in top) or 1
            out = ["  SQL by total execution time (pg_stat_statements):",
                   f"  {'ms':>9} {'%':>5} {'calls':>8} {'rows':>9}  statement"]
            out += [f"  {t:9.0f} {100 * t / total:5.1f} {c:8,} {n:9,}  {query_name(text)}"
                    for c, t, n, text in top]
            return out
        if not self.sample_count:
            return []
        out = [f"  relay backends, pg_stat_activity sampled {self.sample_count:,} times "
               "(% of samples a backend ran it):"]
        for (name, wait), n in self.samples.most_common(15):
            out.append(f"  {100 * n / self.sample_count:6.1f}%  {name:<40} {wait}")
        return out


def _normalized(text: str) -> str:
    """Comments dropped; parameters and constants (pg_stat_statements shows $n for
    both) made ?; whitespace collapsed: so a statement's text matches its named query."""
    text = re.sub(r"--[^\n]*", " ", text)
    text = re.sub(r"%\(\w+\)s|\$\d+|'(?:[^']|'')*'|\b\d+(?:\.\d+)?\b", "?", text)
    return re.sub(r"\s+", " ", text).strip()[:100]


@functools.cache
def _known_queries() -> dict[str, str]:
    return {_normalized(body): name for name, body in queries().items()}


def query_name(text: str) -> str:
    """The name in sql/queries.sql of a statement the relay ran, else its start."""
    key = _normalized(text)
    for known, name in _known_queries().items():
        if known and (key.startswith(known) or known.startswith(key)):
            return name
    return key[:60]


def summarize_stacks(path: Path, top: int = 20) -> list[str]:
    """From py-spy raw output: where the relay's CPU went, by function (own time),
    by package (own time), and by relay function (inclusive time)."""
    own: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    relay: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        frames = [re.sub(r"\(.*/(site-packages|python3\.\d+)/", "(", f) for f in frames]
        total += count
        own[frames[-1]] += count
        packages[re.sub(r"^.*\(([^/)]+).*$", r"\1", frames[-1])] += count
        for frame in {f for f in frames if "(cdc_hooks/" in f}:
            relay[frame] += count
    if not total:
        return ["  py-spy recorded no samples"]
    out = [f"  {total:,} samples of the relay on CPU (idle waits excluded); by function, own time:"]
    out += [f"  {100 * n / total:6.1f}%  {f}" for f, n in own.most_common(top)]
    out.append("  by package, own time:")
    out += [f"  {100 * n / total:6.1f}%  {f}" for f, n in packages.most_common(10)]
    out.append("  by relay function, inclusive time:")
    out += [f"  {100 * n / total:6.1f}%  {f}" for f, n in relay.most_common(top)
            if not re.search(r"\((cdc_hooks/(cli|__main__)\.py)\)|run_forever", f)]
    return out


# Scenarios -----------------------------------------------------------------------------------

def burst(bench: Bench, name: str, listeners: list[dict[str, Any]], events: int,
          matching: int, delay: float = 0.0, names: int = 0, limit: float = 0.0) -> Burst:
    """One INSERT of `events` rows with a ready relay; waits for every delivery (at most
    limit seconds, by default 1 s per 50). names: rows named n1..n<names> in turn, each
    for the listener matching its name."""
    bench.reset(listeners, delay=delay)
    expected = events * matching
    with bench.relay() as relay:
        backends = bench.backends()
        profiler = Profiler(bench, relay, name) if bench.args.profile else None
        try:
            before = (relay.cpu(), sum(map(cpu_seconds, backends)), bench.receiver.process.cpu(),
                      machine_busy())
            committed = bench.insert(1, events, names)
            stats = bench.wait_receipts(expected, relay, limit or max(60, expected / 50))
            after = (relay.cpu(), sum(map(cpu_seconds, backends)), bench.receiver.process.cpu(),
                     machine_busy())
        finally:
            if profiler:
                bench.profiles += profiler.finish()
        bench.wait_recorded(expected, relay)
    want = {f"/l/{i}": events for i, m in enumerate(listeners, 1) if m.get("region", "eu") == "eu"}
    if names:
        want = {f"/l/{n}": count for n, count in Counter(i % names + 1 for i in range(1, events + 1)).items()}
    # A duplicate (a request that timed out, sent again) is counted below, not an error.
    if stats["paths"].keys() != want.keys() or any(stats["paths"][p] < n for p, n in want.items()):
        raise BenchError(f"deliveries reached {_short(stats['paths'])}, expected {_short(want)}")
    seconds = stats["last"] - committed
    relay_cpu, backends_cpu, receiver_cpu, machine = (
        a - b for a, b in zip(after, before, strict=True))
    return Burst(expected, seconds, expected / seconds, relay_cpu, backends_cpu, receiver_cpu,
                 machine, stats["count"] - stats["unique"], stats["first"] - committed)


def _short(paths: dict[str, int]) -> str:
    text = str(paths)
    return text if len(text) < 300 else f"{text[:300]}... ({len(paths):,} paths)"


def cpu_row(label: str, b: Burst) -> Row:
    ours = b.relay_cpu + b.backends_cpu + b.receiver_cpu
    return Row(f"  CPU during {label} (% of a core)",
               f"relay {100 * b.relay_cpu / b.seconds:.0f}% "
               f"({1e6 * b.relay_cpu / b.deliveries:.0f} us per delivery), its PG backends "
               f"{100 * b.backends_cpu / b.seconds:.0f}%, receiver {100 * b.receiver_cpu / b.seconds:.0f}%; "
               f"other processes {100 * max(0.0, b.machine_cpu - ours) / b.seconds:.0f}%")


def throughput_rows(bench: Bench, label: str, b: Burst, runs: tuple[BaselineRun, BaselineRun],
                    bar: float = 0.5) -> list[Row]:
    """The burst against the bare client's mean of the runs just before and just after
    it: the machine is shared, so the baseline is taken as close to the burst as can be."""
    base = statistics.mean(r.rate for r in runs)
    ratio = b.rate / base
    relay_body = scalar(bench.conn, "body_length") or 0
    return [Row(label, f"{b.rate:,.0f}/s", f"{base:,.0f}/s", f"{ratio:.2f}", f">= {bar}",
                ratio >= bar),
            Row(f"  {b.deliveries:,} deliveries in", f"{b.seconds:.2f} s; first receipt "
                f"{1000 * b.first_receipt:.0f} ms after the commit"
                + (f"; {b.duplicates} duplicates" if b.duplicates else "")),
            Row("  baseline before / after the burst",
                f"{runs[0].rate:,.0f}/s / {runs[1].rate:,.0f}/s (bodies {bench.baseline_body_length:.0f} B, "
                f"relay's {float(relay_body):.0f} B)"),
            cpu_row("the burst", b),
            Row("  CPU during the baseline (% of a core)",
                f"client {100 * statistics.mean(r.client_cpu for r in runs):.0f}% "
                f"({1e6 * statistics.mean(r.client_cpu / r.rate for r in runs):.0f} us per POST), receiver "
                f"{100 * statistics.mean(r.receiver_cpu for r in runs):.0f}%; other processes "
                f"{100 * statistics.mean(r.others for r in runs):.0f}%")]


def scenario_throughput(bench: Bench) -> list[Row]:
    n = bench.args.events
    before = bench.baseline_run(n)
    b = burst(bench, "throughput", [{}], n, 1)
    runs = (before, bench.baseline_run(n))
    return throughput_rows(bench, f"throughput: {n:,} events, 1 listener (deliveries/s)", b, runs)


def scenario_fanout(bench: Bench) -> list[Row]:
    n = bench.args.events
    listeners = [{"region": "eu"} if i % 2 == 0 else {"region": "us"} for i in range(10)]
    before = bench.baseline_run(n)
    b = burst(bench, "fanout", listeners, n, 5)
    runs = (before, bench.baseline_run(n))
    return throughput_rows(bench, f"fan-out: {n:,} events, 10 listeners, 5 match", b, runs)


def scenario_slow(bench: Bench) -> list[Row]:
    n = bench.args.slow_events
    b = burst(bench, "slow", [{}], n, 1, delay=SLOW_DELAY)
    ideal = CONCURRENCY / SLOW_DELAY
    ratio = b.rate / ideal
    return [Row(f"slow receiver (50 ms): {n:,} events, 1 listener", f"{b.rate:,.0f}/s",
                f"{ideal:,.0f}/s", f"{ratio:.2f}", ">= 0.5", ratio >= 0.5),
            Row("  (baseline: concurrency 64 / 0.05 s)", f"{b.seconds:.2f} s; first receipt "
                f"{1000 * b.first_receipt:.0f} ms after the commit"),
            cpu_row("the slow run", b)]


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(len(ordered) * p / 100 + 0.5) - 1))]


def scenario_latency(bench: Bench) -> list[Row]:
    total = LATENCY_RATE * bench.args.latency_seconds
    bench.reset([{}], stamp=True)
    commits: dict[int, float] = {}
    with bench.relay() as relay, psycopg.connect(bench.dsn, autocommit=True,
                                                 application_name=APP) as writer:
        time.sleep(1.0)
        profiler = Profiler(bench, relay, "latency") if bench.args.profile else None
        try:
            achieved, behind = steady_writer(writer, total, commits)
            bench.wait_receipts(total, relay, 60)
        finally:
            if profiler:
                bench.profiles += profiler.finish()
        stamps = bench.receiver.stamps()
        bench.wait_recorded(total, relay)
    missing = set(commits) - set(stamps)
    if missing:
        raise BenchError(f"{len(missing)} events never arrived (e.g. row {min(missing)})")
    ms = [1000 * (stamps[k] - t) for k, t in commits.items()]
    p50, p99 = percentile(ms, 50), percentile(ms, 99)
    return [Row(f"latency p50, commit to receipt ({LATENCY_RATE}/s for "
                f"{bench.args.latency_seconds} s)", f"{p50:.1f} ms", bar="<= 10 ms", ok=p50 <= 10),
            Row("latency p99", f"{p99:.1f} ms", bar="<= 50 ms", ok=p99 <= 50),
            Row("  latency mean / max", f"{statistics.mean(ms):.1f} / {max(ms):.1f} ms; "
                f"{sum(1 for m in ms if m > 500)} of {len(ms):,} over 500 ms (a missed wake-up "
                "waits for the relay's fallback poll)"),
            *latency_split(bench, commits, stamps),
            Row("  writer's achieved rate", f"{achieved:.0f} commits/s"
                + (f" (lagged up to {1000 * behind:.0f} ms)" if behind > 0.05 else ""))]


def steady_writer(writer: Any, total: int, commits: dict[int, float]) -> tuple[float, float]:
    """Commits `total` single-row INSERTs at LATENCY_RATE, stamping each commit by row id.
    Returns the achieved rate and how far behind schedule it fell at worst."""
    behind = 0.0
    start = time.monotonic()
    for i in range(total):
        target = start + i / LATENCY_RATE
        now = time.monotonic()
        if target > now:
            time.sleep(target - now)
        else:
            behind = max(behind, now - target)
        row_id = rows(writer, "insert_one")[0][0]
        commits[row_id] = time.monotonic()
    return total / (time.monotonic() - start), behind


def latency_split(bench: Bench, commits: dict[int, float], stamps: dict[int, float]) -> list[Row]:
    """Commit -> the relay's dispatch transaction began (deliveries.created_at, a wall
    clock time, moved to the monotonic clock) -> receipt: where the latency goes."""
    offset = time.time() - time.monotonic()
    dispatched = {k: t - offset for k, t in rows(bench.conn, "dispatch_times")}
    keys = [k for k in commits if k in dispatched]
    if not keys:
        return []
    wake = [1000 * (dispatched[k] - commits[k]) for k in keys]
    send = [1000 * (stamps[k] - dispatched[k]) for k in keys]
    return [Row("  split p50 / p99: commit -> dispatch began",
                f"{percentile(wake, 50):.1f} / {percentile(wake, 99):.1f} ms"),
            Row("  split p50 / p99: dispatch began -> receipt",
                f"{percentile(send, 50):.1f} / {percentile(send, 99):.1f} ms")]


@dataclass
class Drain:
    events: int
    arrived: int  # < events: the drain hit its time limit
    first_receipt: float  # seconds from the relay's start
    rate: float  # first to last receipt
    peak_rss_kb: int
    head_rate: float  # first 10% of the receipts
    tail_rate: float  # last 10%
    sizes: tuple[int, ...]
    seconds: float


def fill(bench: Bench, events: int) -> None:
    began = time.monotonic()
    for first in range(1, events + 1, FILL_CHUNK):
        bench.insert(first, min(events, first + FILL_CHUNK - 1))
        if events > 200_000 and (first - 1) % 200_000 == 0:
            log(f"    queued {first - 1 + FILL_CHUNK:,} of {events:,}")
    log(f"    queued {events:,} events in {time.monotonic() - began:.1f} s")


def drain(bench: Bench, events: int) -> Drain:
    """Queues events with no relay running, then times a relay draining them."""
    bench.reset([{}])
    fill(bench, events)
    rss = [0]
    complete = True
    began = time.monotonic()
    with bench.relay(wait_ready=False) as relay:
        def sample() -> None:
            rss[0] = max(rss[0], relay.memory_kb("VmRSS"))
        profiler = (Profiler(bench, relay, f"backlog-{events}")
                    if bench.args.profile and events != REFERENCE_BACKLOG else None)
        try:
            bench.wait_receipts(events, relay, drain_limit(bench.args, events), on_poll=sample)
        except TooSlow as exc:
            complete = False
            log(f"    {exc}: reporting the partial drain")
        finally:
            if profiler:
                bench.profiles += profiler.finish()
        peak = max(rss[0], relay.memory_kb("VmHWM"))
        arrived = bench.receiver.stats()["count"]
        if arrived < 10:
            raise BenchError(f"only {arrived} deliveries arrived\n{relay.log_tail()}")
        tenth = arrived // 10
        marks = (1, tenth, arrived - tenth + 1, arrived)
        stats = bench.receiver.stats(marks)
        if complete:
            bench.wait_recorded(events, relay)
    t = {int(k): v for k, v in stats["marks"].items()}
    sizes = tuple(rows(bench.conn, "table_sizes")[0])
    seconds = t[arrived] - t[1]
    log(f"    {arrived:,} of {events:,} drained in {time.monotonic() - began:.1f} s "
        "since the relay started")
    return Drain(events, arrived, t[1] - began, (arrived - 1) / seconds, peak,
                 (tenth - 1) / (t[tenth] - t[1]), (tenth - 1) / (t[arrived] - t[arrived - tenth + 1]),
                 sizes, seconds)


def drain_limit(args: argparse.Namespace, events: int) -> float:
    """Seconds a drain may take before it is reported as partial: a slow relay
    cannot stall the run (--quick: 150 s; else at least 500 events/s)."""
    return 150.0 if args.quick else max(600.0, events / 500)


def partial(d: Drain) -> str:
    return "" if d.arrived == d.events else f" (partial: {d.arrived:,} in {d.seconds:.0f} s)"


def scenario_backlog(bench: Bench) -> list[Row]:
    n = bench.args.backlog
    log(f"  reference backlog of {REFERENCE_BACKLOG:,}")
    ref = drain(bench, REFERENCE_BACKLOG)
    log(f"  backlog of {n:,}")
    big = drain(bench, n)
    ratio = big.rate / ref.rate
    complete = big.arrived == big.events and ref.arrived == ref.events
    mb = 1024 * 1024
    out = [Row(f"backlog {n:,}: peak RSS of the relay (VmHWM)", f"{big.peak_rss_kb / 1024:.0f} MB",
               f"{ref.peak_rss_kb / 1024:.0f} MB", f"{big.peak_rss_kb / ref.peak_rss_kb:.2f}",
               "<= 200 MB", big.peak_rss_kb <= 200 * 1024),
           Row(f"backlog {n:,}: drain rate ÷ at {REFERENCE_BACKLOG:,}",
               f"{big.rate:,.0f}/s{partial(big)}", f"{ref.rate:,.0f}/s{partial(ref)}",
               f"{ratio:.2f}", ">= 0.8", ratio >= 0.8 and complete),
           Row(f"  drain of {n:,}: first 10% / last 10% of receipts",
               f"{big.head_rate:,.0f}/s / {big.tail_rate:,.0f}/s",
               ratio=f"{big.tail_rate / big.head_rate:.2f}"),
           Row(f"  drained {big.arrived:,} in", f"{big.seconds:.1f} s (first to last receipt); "
               f"first receipt {big.first_receipt:.1f} s after the relay started "
               f"({ref.first_receipt:.1f} s for {REFERENCE_BACKLOG:,})")]
    names = ("outbox", "events", "deliveries", "attempts")
    when = "draining" if big.arrived == big.events else "the partial drain"
    out.append(Row(f"  sizes after {when} (MB)", ", ".join(
        f"{name} {size / mb:.1f}" for name, size in zip(names, big.sizes, strict=True))))
    return out


def scenario_idle(bench: Bench) -> list[Row]:
    """The bar is for `cdc-hooks run` as it comes (one worker); each added worker
    is one more idle relay, shown beside it."""
    seconds = bench.args.idle_seconds
    bench.reset([{}])
    out = []
    for workers in sorted({1, bench.args.workers}):
        with bench.relay(workers=workers) as relay:
            time.sleep(2.0)  # past startup
            backends = bench.backends()
            before = (relay.cpu(), sum(map(cpu_seconds, backends)),
                      scalar(bench.conn, "transactions"))
            time.sleep(seconds)
            relay.check()
            after = (relay.cpu(), sum(map(cpu_seconds, backends)),
                     scalar(bench.conn, "transactions"))
            rss = relay.memory_kb("VmRSS")
        cpu = 100 * (after[0] - before[0]) / seconds
        name = "idle" if workers == 1 else f"idle, --workers {workers}"
        out += [Row(f"{name}: relay CPU over {seconds} s (% of a core)", f"{cpu:.2f}%",
                    bar="<= 1%" if workers == 1 else "", ok=cpu <= 1.0 if workers == 1 else None),
                Row(f"  {name}: its PG backends' CPU; transactions/s in the database",
                    f"{100 * (after[1] - before[1]) / seconds:.2f}%; "
                    f"{(after[2] - before[2]) / seconds:.1f}/s"),
                Row(f"  {name}: relay RSS", f"{rss / 1024:.0f} MB")]
    return out


def scenario_listeners(bench: Bench) -> list[Row]:
    """Many listeners on one hook, each matching one name: the rate should not fall
    with their number (dispatch finds an event's listeners by its values)."""
    n = LISTENER_EVENTS
    bursts = {}
    out = []
    for count in bench.args.listener_counts:
        log(f"  {count:,} listeners")
        listeners = [{"name": f"n{i}"} for i in range(1, count + 1)]
        try:
            bursts[count] = burst(bench, f"listeners-{count}", listeners, n, 1, names=count,
                                  limit=LISTENER_LIMIT)
        except TooSlow as exc:  # the larger counts may be that slow: the rest still run
            out.append(Row(f"listeners: {count:,} on one hook: TOO SLOW", f"{exc} (< "
                           f"{exc.stats['unique'] / LISTENER_LIMIT:,.0f}/s)", ok=False))
    base = bursts[bench.args.listener_counts[0]].rate
    for count, b in bursts.items():
        bar = LISTENER_BARS.get(count)
        ratio = b.rate / base
        out += [Row(f"listeners: {count:,} on one hook, each matching one name; {n:,} events",
                    f"{b.rate:,.0f}/s" + (f"; {b.duplicates} duplicates" if b.duplicates else ""),
                    f"{base:,.0f}/s", f"{ratio:.2f}", f">= {bar}" if bar else "",
                    None if bar is None else ratio >= bar),
                cpu_row(f"{count:,} listeners", b)]
    return out


RUNNERS: dict[str, Callable[[Bench], list[Row]]] = {
    "throughput": scenario_throughput, "fanout": scenario_fanout, "slow": scenario_slow,
    "latency": scenario_latency, "backlog": scenario_backlog, "idle": scenario_idle,
    "listeners": scenario_listeners,
}


# Scratch database, report, main ---------------------------------------------------------

def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def table(results: list[Row]) -> list[str]:
    headers = ("figure", "relay", "baseline", "ratio", "bar", "")
    cells = [(r.figure, r.value, r.baseline, r.ratio, r.bar,
              "" if r.ok is None else ("ok" if r.ok else "MISSED")) for r in results]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    out = []
    for row in (headers, *cells):
        out.append(" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if row is headers:
            out.append("-+-".join("-" * w for w in widths))
    return out


def git(*args: str) -> str:
    out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False)
    return out.stdout.rstrip()


def code_version() -> str:
    """The code the relay ran: a --rev snapshot, or the work tree's commit and
    whether cdc_hooks/ or sql/ had uncommitted changes."""
    where = f" (cdc_hooks imported from {Path(cdc_hooks.__file__).parent})"
    if os.environ.get(CODE_ENV):
        return os.environ[CODE_ENV] + where
    dirty = git("status", "--porcelain", "--", "cdc_hooks", "sql").splitlines()
    return (git("rev-parse", "--short", "HEAD") or "unknown") + (
        f" + uncommitted changes in {', '.join(line[3:] for line in dirty)}" if dirty else "") + where


def run_at_revision(rev: str, argv: list[str]) -> int:
    """Runs the benchmark (this file) against cdc_hooks and sql/ as committed at rev,
    exported to a temporary directory first on PYTHONPATH, so edits in the work tree
    during a long run cannot change the relay under test."""
    sha = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    if not sha:
        log(f"error: {rev!r} is not a commit of {REPO}")
        return 2
    code_dir = Path(tempfile.mkdtemp(prefix=f"cdc_hooks_relay_bench_code_{sha[:10]}_"))
    try:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", sha,
                                  "cdc_hooks", "sql"], capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(code_dir, filter="data")
        (code_dir / "sql").rename(code_dir / "cdc_hooks" / "sql")  # the package cdc_hooks.sql
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (str(code_dir), os.environ.get("PYTHONPATH")) if p),
            **{CODE_ENV: f"{rev} = {sha[:10]}", CODE_DIR_ENV: str(code_dir)})
        child = subprocess.Popen([sys.executable, __file__, *argv], env=env)
        try:
            return child.wait()
        except KeyboardInterrupt:
            child.send_signal(signal.SIGTERM)
            return child.wait()
    finally:
        shutil.rmtree(code_dir, ignore_errors=True)


def load_average() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def machine(server_version: str) -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (f"{os.cpu_count()} CPUs ({model}), PostgreSQL {server_version}, "
            f"Python {platform.python_version()}, Linux {platform.release()}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--dsn", help="server to use (a scratch database is created on it)")
    parser.add_argument("--quick", action="store_true", help="smaller runs: a ~3 minute smoke test")
    parser.add_argument("--only", help=f"comma-separated scenarios of: {', '.join(SCENARIOS)}")
    parser.add_argument("--backlog", type=int, help="events queued in the backlog scenario")
    parser.add_argument("--profile", metavar="DIR", help="profile the relay during the bursts")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="cdc-hooks run --workers N (default: the machine's CPUs); the "
                             "idle scenario also measures 1")
    parser.add_argument("--listener-counts", default=",".join(map(str, LISTENER_COUNTS)),
                        help="listeners scenario: the counts to run, the first the baseline "
                             "(default: %(default)s)")
    parser.add_argument("--rev", help="benchmark cdc_hooks as committed at REV (e.g. HEAD), "
                        "not the work tree")
    args = parser.parse_args(argv)
    args.dsn = args.dsn or os.environ.get("CDC_HOOKS_DSN") or DEFAULT_DSN
    try:
        args.listener_counts = [int(c) for c in args.listener_counts.split(",")]
    except ValueError:
        parser.error(f"--listener-counts {args.listener_counts!r}: expected numbers like 10,1000")
    args.only = [s.strip() for s in args.only.split(",")] if args.only else list(SCENARIOS)
    unknown = [s for s in args.only if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {', '.join(unknown)} (choose from {', '.join(SCENARIOS)})")
    quick = args.quick
    args.events = 5_000 if quick else 20_000
    args.slow_events = 5_000 if quick else 20_000
    args.latency_seconds = 8 if quick else 15
    args.backlog = args.backlog or (100_000 if quick else 1_000_000)
    args.idle_seconds = 10 if quick else 30
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    return args


def run(args: argparse.Namespace) -> tuple[list[Row], list[str], str, int]:
    results: list[Row] = []
    failed = 0
    workdir = Path(tempfile.mkdtemp(prefix="cdc_hooks_relay_bench_"))
    with ExitStack() as stack:
        dsn = stack.enter_context(scratch_database(args.dsn, "cdc_hooks_relay_bench"))
        receiver = Receiver(workdir)
        stack.callback(receiver.process.stop)
        bench = Bench(args, dsn, workdir, receiver)
        stack.callback(bench.conn.close)
        version = f"{scalar(bench.conn, 'server_version')} ({scalar(bench.conn, 'server_settings')})"
        bench.install()
        for name in args.only:
            log(f"{name} ...")
            began = time.monotonic()
            try:
                results += RUNNERS[name](bench)
            except KeyboardInterrupt:
                results.append(Row(f"{name}: INTERRUPTED", "(SIGINT/SIGTERM)"))
                failed += 1
                log(f"  {name} interrupted: cleaning up")
                break
            except (BenchError, psycopg.Error, OSError, ValueError, KeyError) as exc:
                failed += 1
                results.append(Row(f"{name}: FAILED", str(exc).splitlines()[0][:100]))
                log(f"  {name} FAILED: {type(exc).__name__}: {exc}")
            log(f"  {name} took {time.monotonic() - began:.0f} s")
        profiles = bench.profiles
        if bench.stops:
            killed = sum(1 for t in bench.stops if t is None)
            slowest = max((t for t in bench.stops if t is not None), default=0.0)
            results.append(Row("  relay stop on SIGTERM (graceful)",
                               f"{len(bench.stops) - killed} of {len(bench.stops)}, slowest {slowest:.1f} s"
                               + (f"; {killed} ignored it for 15 s (killed)" if killed else ""),
                               ok=None if not killed else False, bar="stops"))
    if failed:
        log(f"logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return results, profiles, version, failed


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] == ["--role"]:  # the helper processes
        role, rest = sys.argv[2], sys.argv[3:]
        if role == "receiver":
            receiver_main(rest[0])
        else:
            client_main(rest[0], rest[1], int(rest[2]), int(rest[3]))
        return 0
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # cleanup and the partial table on SIGTERM too
    given = list(argv if argv is not None else sys.argv[1:])
    if args.rev and not os.environ.get(CODE_DIR_ENV):  # not yet in the snapshot's process
        return run_at_revision(args.rev, given)
    command = "python " + shlex.join([sys.argv[0], *given])
    began, load_before, code = time.monotonic(), load_average(), code_version()
    results, profiles, version, failed = run(args)
    print(f"command: {command}")
    print(f"machine: {machine(version)}")
    print(f"code: {code}")
    print(f"relay: cdc-hooks run --workers {args.workers}, [delivery] concurrency = "
          f"listener_concurrency = {CONCURRENCY} (split among the workers); "
          f"baseline: bare aiohttp client at {CONCURRENCY} in flight, mean of a run just "
          f"before and one just after each burst; total {time.monotonic() - began:.0f} s")
    print(f"load average (1 min) before / after: {load_before} / {load_average()} "
          "(other work on the machine skews the figures)")
    print()
    print("\n".join(table(results)))
    if profiles:
        print()
        print("\n".join(profiles))
    if failed:
        return 2
    return 1 if any(r.ok is False for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
