"""Tools of the fault-injection suite (tests/faults): hostile receivers, the
scenario's world (database, config, listeners, secrets to look for), figures.

``FaultReceiver``
    An aiohttp server on loopback (its own thread and loop) whose answer per
    path is a *behaviour*: ``answer`` (a status, after a delay), ``flaky``
    (500 on a fraction of requests), ``hang``, ``drip`` (slowloris: a byte at
    a time), ``endless`` (a body that never ends), ``retry_after_once``. It
    records every request (``Hit``), how many were in flight at once per path,
    and how many body bytes it managed to push.

``World``
    One scenario's database: the ``person`` table, whose ``secret`` column is
    never provided and holds a canary value; its hooks installed; listeners
    added through the CLI (their secrets kept); NOTIFY payloads recorded;
    relay logs and receivers registered. ``assert_no_leaks()`` looks for the
    canary and every listener secret in the whole cdc_hooks schema (but
    listeners.secret), in NOTIFY payloads, relay logs and receiver bodies.

``Figure`` / ``record``
    What a scenario injected and measured; the suite prints them as a table at
    the end and, in the full run, writes bench/RESULTS-faults.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import secrets
import ssl
import subprocess
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from aiohttp import web
from click.testing import CliRunner
from psycopg import sql
from receivers import wait_until

from cdc_hooks import install as installer
from cdc_hooks.cli import main
from cdc_hooks.config import Config, load_config

# CDC_HOOKS_FAULTS=full: the published figures (10,000+ events, 10 kills, ...).
# Otherwise the short form that runs with the default suite.
FULL = os.environ.get("CDC_HOOKS_FAULTS", "").lower() == "full"
RESULTS_FILE = Path(__file__).resolve().parents[2] / "bench" / "RESULTS-faults.md"


def scaled(short: int, full: int) -> int:
    return full if FULL else short


# Figures ---------------------------------------------------------------------


@dataclass(frozen=True)
class Figure:
    scenario: str
    injected: str
    events: int
    faults: int
    lost: int
    duplicates: int
    recovery: str  # e.g. "3.1 s", "-" when nothing had to recover
    notes: str = ""


FIGURES: list[Figure] = []


def record(scenario: str, injected: str, *, events: int, faults: int, lost: int,
           duplicates: int = 0, recovery: float | str | None = None, notes: str = "") -> Figure:
    shown = recovery if isinstance(recovery, str) else "-" if recovery is None else f"{recovery:.1f} s"
    figure = Figure(scenario, injected, events, faults, lost, duplicates, shown, notes)
    FIGURES.append(figure)
    print(figure)
    return figure


def figures_table(figures: Iterable[Figure]) -> str:
    lines = ["| Scenario | Injected | Events | Faults | Lost | Duplicates | Recovery | Notes |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for f in figures:
        cells = [f.scenario, f.injected, f"{f.events:,}", f"{f.faults:,}", str(f.lost),
                 str(f.duplicates), f.recovery, f.notes]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


# Hostile receivers --------------------------------------------------------------


@dataclass
class Hit:
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    at: float  # time.monotonic() at arrival
    done: float | None = None  # when the answer was written (None: never finished)
    status: int | None = None  # what was answered

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]

    @property
    def json(self) -> Any:
        import json

        return json.loads(self.body)

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


Behaviour = Callable[["FaultReceiver", web.Request, Hit], Awaitable[web.StreamResponse]]


def answer(status: int = 200, delay: float = 0.0, headers: dict[str, str] | None = None,
           body: str = "ok") -> Behaviour:
    async def handle(receiver: FaultReceiver, request: web.Request, hit: Hit) -> web.StreamResponse:
        if delay:
            await asyncio.sleep(delay)
        return web.Response(status=status, text=body, headers=headers)

    return handle


def flaky(fraction: float, seed: int, delay: float = 0.0) -> Behaviour:
    """500 on about `fraction` of the requests, 200 on the others."""
    rng = random.Random(seed)

    async def handle(receiver: FaultReceiver, request: web.Request, hit: Hit) -> web.StreamResponse:
        if delay:
            await asyncio.sleep(delay)
        return web.Response(status=500 if rng.random() < fraction else 200, text="flaky")

    return handle


def flaky_hanging(fraction: float, hanging: float, seconds: float, seed: int) -> Behaviour:
    """500 on about `fraction` of the requests, an answer only after `seconds` (past the
    relay's timeout) on about `hanging` of them, 200 at once on the others."""
    rng = random.Random(seed)

    async def handle(receiver: FaultReceiver, request: web.Request, hit: Hit) -> web.StreamResponse:
        draw = rng.random()
        if draw < hanging:
            await asyncio.sleep(seconds)
        return web.Response(status=500 if hanging <= draw < hanging + fraction else 200,
                            text="flaky")

    return handle


def hang(seconds: float) -> Behaviour:
    """Answers 200 only after `seconds`: past any sane timeout."""
    return answer(200, delay=seconds)


def drip(interval: float, seconds: float) -> Behaviour:
    """Slowloris: status and headers at once, then one body byte every `interval`
    for `seconds`. Each read gets a byte in time: only a total deadline ends it."""

    async def handle(receiver: FaultReceiver, request: web.Request, hit: Hit) -> web.StreamResponse:
        response = web.StreamResponse(status=200)
        response.enable_chunked_encoding()
        await response.prepare(request)
        deadline = time.monotonic() + seconds
        with contextlib.suppress(ConnectionError, RuntimeError):
            while time.monotonic() < deadline:
                await response.write(b".")
                receiver.pushed[hit.path] += 1
                await asyncio.sleep(interval)
        return response

    return handle


def endless(chunk: int = 1 << 16, limit: int = 8 << 30) -> Behaviour:
    """A 200 whose body never ends (up to `limit` bytes, 8 GB): written as fast as
    the client reads it, so what gets pushed shows how much the client read."""
    block = b"x" * chunk

    async def handle(receiver: FaultReceiver, request: web.Request, hit: Hit) -> web.StreamResponse:
        response = web.StreamResponse(status=200)
        response.content_length = limit
        await response.prepare(request)
        with contextlib.suppress(ConnectionError, RuntimeError):
            while receiver.pushed[hit.path] < limit:
                await response.write(block)
                receiver.pushed[hit.path] += chunk
        return response

    return handle


def retry_after_once(seconds: int) -> Behaviour:
    """429 with Retry-After on the first attempt of each webhook-id, then 200."""
    seen: set[str] = set()

    async def handle(receiver: FaultReceiver, request: web.Request, hit: Hit) -> web.StreamResponse:
        if hit.webhook_id in seen:
            return web.Response(status=200, text="ok")
        seen.add(hit.webhook_id)
        return web.Response(status=429, headers={"Retry-After": str(seconds)}, text="slow down")

    return handle


class FaultReceiver:
    """A loopback HTTP(S) server answering each path with a behaviour."""

    def __init__(self, host: str = "127.0.0.1", ssl_context: ssl.SSLContext | None = None) -> None:
        self.host = host
        self.ssl_context = ssl_context
        self.port = 0
        self._lock = threading.Condition()
        self._hits: list[Hit] = []
        self._behaviours: dict[str, Behaviour] = {}
        self._in_flight: Counter[str] = Counter()
        self.max_in_flight: Counter[str] = Counter()
        self.pushed: Counter[str] = Counter()  # streamed body bytes written, per path
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    def start(self, port: int = 0) -> FaultReceiver:
        if not self._thread.is_alive():
            self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._serve(port), self._loop).result(10)
        return self

    async def _serve(self, port: int) -> int:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # shutdown_timeout: hanging handlers must not hold up close().
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                     shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, port, ssl_context=self.ssl_context,
                           reuse_address=True)
        await site.start()
        return int(self._runner.addresses[0][1])

    def stop_listening(self) -> None:
        """Closes the server (connections are refused) but keeps the records."""
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
            self._runner = None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stop_listening()
        if self._thread.is_alive():  # hung handlers end here, quietly
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(_cancel_others(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()

    def url(self, path: str = "/hook", scheme: str | None = None) -> str:
        scheme = scheme or ("https" if self.ssl_context else "http")
        return f"{scheme}://{self.host}:{self.port}{path}"

    def on(self, path: str, behaviour: Behaviour) -> None:
        with self._lock:
            self._behaviours[path] = behaviour

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        hit = Hit(request.path, {k.lower(): v for k, v in request.headers.items()},
                  await request.read(), time.monotonic())
        with self._lock:
            self._hits.append(hit)
            self._in_flight[hit.path] += 1
            self.max_in_flight[hit.path] = max(self.max_in_flight[hit.path],
                                               self._in_flight[hit.path])
            behaviour = self._behaviours.get(hit.path, answer())
        try:
            response = await behaviour(self, request, hit)
            with self._lock:
                hit.status = response.status
            return response
        finally:
            with self._lock:
                hit.done = time.monotonic()
                self._in_flight[hit.path] -= 1
                self._lock.notify_all()

    def hits(self, path: str | None = None) -> list[Hit]:
        with self._lock:
            return [h for h in self._hits if path is None or h.path == path]

    def ok_hits(self, path: str | None = None) -> list[Hit]:
        return [h for h in self.hits(path) if h.ok and h.done is not None]

    def wait_ok(self, count: int, path: str | None = None, timeout: float = 60.0) -> list[Hit]:
        """At least count answered 2xx on path; fails after timeout."""
        return wait_until(lambda: len(self.ok_hits(path)) >= count and self.ok_hits(path),
                          timeout, interval=0.02,
                          message=f"{count} deliveries on {path or 'any path'}")


async def _cancel_others() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)  # hung-up clients, by design


def self_signed_context(directory: Path) -> ssl.SSLContext | None:
    """A TLS server context with a fresh self-signed certificate (openssl CLI);
    None when openssl is missing."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    try:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                        str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost"],
                       check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.CalledProcessError):
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


def refusing_port() -> tuple[Any, int]:
    """A socket bound to a loopback port and never listening: connections are
    refused. Keep the socket open for as long as the port must stay refused."""
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock, int(sock.getsockname()[1])


# Processes ------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory of a process (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


class NotifyRecorder:
    """LISTENs on cdc_hooks' channels from a thread and keeps every payload."""

    CHANNELS = ("cdc_hooks", "cdc_hooks_listeners")

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.payloads: list[tuple[str, str]] = []
        self.pid: int | None = None  # its backend, spared by scenarios that kill the relay's
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> NotifyRecorder:
        self._thread.start()
        self._ready.wait(10)
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.dsn, autocommit=True) as conn:
                    self.pid = conn.info.backend_pid
                    for channel in self.CHANNELS:
                        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                    self._ready.set()
                    while not self._stop.is_set():
                        for notify in conn.notifies(timeout=0.2):
                            self.payloads.append((notify.channel, notify.payload))
            except psycopg.Error:  # a database fault of the scenario: listen again
                self._ready.set()
                self._stop.wait(0.2)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)


# The scenario's world ---------------------------------------------------------------

HOOKS = """
[[hooks]]
name = "person"
table = "person"
events = ["insert", "update", "delete"]
provides = ["name", "address"]

[[hooks]]
name = "myhook"
provides = ["message", "n"]
"""


def delivery(timeout: float = 0.5, retry_schedule: Iterable[float] = (0.2, 0.2),
             concurrency: int = 64, listener_concurrency: int = 16,
             allow_private: bool = True, extra: str = "") -> str:
    schedule = ", ".join(f"{s:g}" for s in retry_schedule)
    return (f"[delivery]\ntimeout = {timeout:g}\nretry_schedule = [{schedule}]\n"
            f"concurrency = {concurrency}\nlistener_concurrency = {listener_concurrency}\n"
            + ("allow_private_networks = true\n" if allow_private else "") + extra)


class World:
    """A scenario's database, config and listeners, and the secrets that must not leak."""

    def __init__(self, dsn: str, directory: Path) -> None:
        self.dsn = dsn
        self.directory = directory
        self.canary = f"cnry{secrets.token_hex(8)}"  # the never-provided column's value
        self.listener_secrets: list[str] = []
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.notifies = NotifyRecorder(dsn)
        self.logs: list[Path] = []
        self.receivers: list[FaultReceiver] = []
        self.config: Config | None = None

    def setup(self, delivery_toml: str, *, install: bool = True) -> Config:
        """The person table (secret: the canary), the config file, hooks installed."""
        self.conn.execute("CREATE TABLE person (id int PRIMARY KEY, name text, address text,"
                          " secret text NOT NULL)")
        self.conn.execute(sql.SQL("ALTER TABLE person ALTER secret SET DEFAULT {}").format(
            sql.Literal(self.canary)))
        config = self.configure(delivery_toml)
        if install:
            installer.install(config)
            self.notifies.start()
        return config

    def configure(self, delivery_toml: str) -> Config:
        path = self.directory / "cdc_hooks.toml"
        dsn = self.dsn.replace("\\", "\\\\").replace('"', '\\"')
        path.write_text(f'[database]\ndsn = "{dsn}"\n{HOOKS}\n{delivery_toml}', encoding="utf-8")
        self.config = load_config(path)
        return self.config

    def cli(self, *args: str) -> Any:
        assert self.config is not None and self.config.path is not None
        return CliRunner().invoke(main, ["--config", str(self.config.path), *args],
                                  catch_exceptions=False)

    def add_listener(self, url: str, *options: str, hook: str = "person") -> int:
        result = self.cli("listeners", "add", hook, url, *options)
        assert result.exit_code == 0, result.output
        listener_id = int(re.search(r"listener (\d+) added", result.stdout).group(1))  # type: ignore[union-attr]
        if "--secret" in options:
            self.listener_secrets.append(options[options.index("--secret") + 1])
        else:
            self.listener_secrets.append(
                re.search(r"secret: (whsec_\S+)", result.stdout).group(1))  # type: ignore[union-attr]
        return listener_id

    def receiver(self, **kwargs: Any) -> FaultReceiver:
        server = FaultReceiver(**kwargs).start()
        self.receivers.append(server)
        return server

    # Writes ----------------------------------------------------------------

    def insert(self, first: int, last: int, name: str = "p", conn: psycopg.Connection[Any] | None = None
               ) -> None:
        (conn or self.conn).execute(
            "INSERT INTO person (id, name) SELECT i, %s || i FROM generate_series(%s::int, %s::int) i",
            (name, first, last))

    def move(self, first: int, last: int, conn: psycopg.Connection[Any] | None = None) -> None:
        (conn or self.conn).execute(
            "UPDATE person SET address = 'moved ' || id WHERE id BETWEEN %s AND %s", (first, last))

    def stream(self, rows: int, per_statement: int = 100, pace: float = 0.0,
               conn: psycopg.Connection[Any] | None = None) -> int:
        """rows inserts then one update of each, in statements of per_statement rows,
        `pace` seconds apart. Returns the number of events (2 * rows)."""
        for start in range(1, rows + 1, per_statement):
            self.insert(start, min(rows, start + per_statement - 1), conn=conn)
            time.sleep(pace)
        for start in range(1, rows + 1, per_statement):
            self.move(start, min(rows, start + per_statement - 1), conn=conn)
            time.sleep(pace)
        return 2 * rows

    # What the database says --------------------------------------------------

    def scalar(self, query: str, *params: Any) -> Any:
        row = self.conn.execute(query, params).fetchone()  # type: ignore[arg-type]
        return None if row is None else row[0]

    def settled(self) -> bool:
        """Nothing left to dispatch or deliver (dead letters count as settled, and so
        do deliveries held for a disabled listener, or by an open circuit: they wait
        for its probe)."""
        return self.scalar(
            "SELECT (SELECT count(*) FROM cdc_hooks.outbox) + (SELECT count(*)"
            " FROM cdc_hooks.deliveries d JOIN cdc_hooks.listeners l ON l.id = d.listener_id"
            " WHERE d.status = 'pending' AND l.state <> 'disabled' AND NOT EXISTS ("
            "  SELECT FROM cdc_hooks.circuits c WHERE c.listener_id = l.id"
            "  AND c.open_until IS NOT NULL))") == 0

    def circuit_open(self, listener_id: int) -> bool:
        return bool(self.scalar("SELECT EXISTS (SELECT FROM cdc_hooks.circuits WHERE"
                                " listener_id = %s AND open_until IS NOT NULL)", listener_id))

    def wait_settled(self, timeout: float = 120.0) -> None:
        wait_until(self.settled, timeout, interval=0.1,
                   message="all changes dispatched and delivered")

    def deliveries(self, listener_id: int) -> list[tuple[Any, ...]]:
        """(id, event_id, status, attempts, last_status, last_error) of a listener."""
        return self.conn.execute(
            "SELECT id, event_id, status, attempts, last_status, last_error"
            " FROM cdc_hooks.deliveries WHERE listener_id = %s ORDER BY id",
            (listener_id,)).fetchall()

    def attempts(self, listener_id: int) -> dict[int, list[tuple[Any, ...]]]:
        """Per delivery: (attempted_at epoch, status_code, error, duration_ms), in order."""
        found: dict[int, list[tuple[Any, ...]]] = defaultdict(list)
        for row in self.conn.execute(
                "SELECT a.delivery_id, extract(epoch FROM a.attempted_at)::float8, a.status_code,"
                " a.error, a.duration_ms FROM cdc_hooks.attempt_log a"
                " JOIN cdc_hooks.deliveries d ON d.id = a.delivery_id"
                " WHERE d.listener_id = %s ORDER BY a.attempted_at", (listener_id,)):
            found[row[0]].append(row[1:])
        return found

    # Secrets ------------------------------------------------------------------

    def leaks(self) -> list[str]:
        """Where the canary or a listener secret shows up outside the listeners' own
        secret columns (secret, and previous_secret: a rotated-out one still signing)."""
        needles = [self.canary, *self.listener_secrets]
        found = []
        tables = [r[0] for r in self.conn.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = 'cdc_hooks' AND c.relkind IN ('r', 'p') ORDER BY 1")]
        for table in tables:
            strip = sql.SQL(" - 'secret' - 'previous_secret'") if table == "listeners" \
                else sql.SQL("")
            rows = self.conn.execute(sql.SQL("SELECT (to_jsonb(t){})::text FROM {} t").format(
                strip, sql.Identifier("cdc_hooks", table)))
            found += [f"cdc_hooks.{table}" for (text,) in rows if any(n in text for n in needles)]
        found += [f"NOTIFY {channel}" for channel, payload in self.notifies.payloads
                  if any(n in payload for n in needles)]
        for log in self.logs:
            text = log.read_text(errors="replace") if log.exists() else ""
            found += [f"log {log.name}" for n in needles if n in text]
        for server in self.receivers:
            found += [f"receiver body {h.path}" for h in server.hits()
                      if any(n.encode() in h.body for n in needles)]
        return sorted(set(found))

    def assert_no_leaks(self) -> None:
        assert self.listener_secrets or self.canary, "nothing to look for"
        assert self.leaks() == []

    def close(self) -> None:
        self.notifies.stop()
        for server in self.receivers:
            server.close()
        self.conn.close()


def check_delivered(hits: list[Hit], expected: set[tuple[str, int]]) -> tuple[int, int]:
    """(lost, duplicates) of (event kind, row id) pairs among 2xx hits; asserts that
    every duplicate carries the webhook-id and body of its original."""
    ok = [h for h in hits if h.ok]
    got = {(h.json["event"], h.json["key"]["id"]) for h in ok}
    assert got <= expected, f"unexpected events: {sorted(got - expected)[:5]}"
    by_event: dict[str, set[tuple[str, bytes]]] = defaultdict(set)
    for h in ok:
        by_event[h.json["id"]].add((h.webhook_id, h.body))
    differing = [e for e, copies in by_event.items() if len(copies) > 1]
    assert not differing, f"duplicates that differ from their original: {differing[:5]}"
    duplicates = len(ok) - len(by_event)
    return len(expected - got), duplicates


def stream_events(rows: int) -> set[tuple[str, int]]:
    return {(kind, i) for kind in ("insert", "update") for i in range(1, rows + 1)}


def assert_row_order(hits: list[Hit]) -> None:
    """Per row, the first arrivals of its events come in event order."""
    first: dict[str, tuple[float, int, int]] = {}
    for h in sorted((h for h in hits if h.ok), key=lambda h: h.at):
        body = h.json
        first.setdefault(body["id"], (h.at, body["key"]["id"], int(body["id"][4:])))
    by_row: dict[int, list[int]] = defaultdict(list)
    for _, row, event in sorted(first.values()):
        by_row[row].append(event)
    out_of_order = {row: events for row, events in by_row.items() if events != sorted(events)}
    assert not out_of_order, f"rows delivered out of order: {list(out_of_order.items())[:3]}"
