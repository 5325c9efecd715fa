"""``cdc-hooks demo``: durian's Person example end to end, in one command.

With no database configured it starts an embedded PostgreSQL (pgserver) in a
temporary directory; given one (--dsn, the config file or CDC_HOOKS_DSN) it
works in a schema of its own there (``cdc_hooks_demo``) and removes what it
added at the end. Then: a ``person`` table with a secret column, a ``person``
hook providing name and address plus a custom ``myhook``, a debug receiver on
loopback, durian's three listeners, the relay in-process, a few writes, and
checks that every expected delivery arrived and the secret never did.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import signal
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from . import install as installer
from . import jsoncodec
from .config import BUILTIN_PREFIX, Config, DeliveryConfig, HookConfig, TableName
from .db import Database, query
from .dsn import describe_dsn, without_password
from .errors import CdcHooksError
from .extras import needs
from .receiver import Delivery, Receiver
from .relay.relay import Relay
from .rows import InstalledHook
from .services.listeners import add_listener, remove_listener
from .signing import generate_secret, secret_key, verify

SCHEMA = "cdc_hooks_demo"
PERSON = HookConfig("person", TableName(SCHEMA, "person"), ("insert", "update", "delete"),
                    ("name", "address"))
MYHOOK = HookConfig("myhook", provides=("name", "address"))  # durian's custom Hook example
DEMO_HOOKS = (PERSON, MYHOOK)
WAIT_FOR_DELIVERIES = 10.0  # seconds after the writes; a local relay needs well under one
WAIT_FOR_IDLE = 3.0


@dataclass(frozen=True)
class DemoListener:
    path: str
    hook: str
    label: str
    match: dict[str, Any]
    expected: tuple[tuple[str, str], ...]  # (event, name) this filter lets through


LISTENERS = (
    DemoListener("/joe", "person", 'name is "Joe"', {"name": "Joe"},
                 (("insert", "Joe"), ("update", "Joe"))),
    DemoListener("/starts-with-j", "person", 'name starts with "J"', {"name": {"$startswith": "J"}},
                 (("insert", "Joe"), ("insert", "Jane"), ("update", "Joe"))),
    DemoListener("/everything", "person", "everything (no filter)", {},
                 (("insert", "Joe"), ("insert", "Jane"), ("insert", "Bob"), ("update", "Joe"),
                  ("delete", "Bob"))),
    DemoListener("/myhook", "myhook", "everything (no filter)", {},
                 (("myhook", "George Costanza"),)),
)

# (query in sql/demo.sql or "send", what it shows, the events it should make)
WRITES = (
    ("insert_people", "INSERT Joe, Jane and Bob (one statement)", "3 insert events"),
    ("move_joe", "UPDATE Joe's address", "1 update event"),
    ("change_jane_secret", "UPDATE Jane's secret only", "no event: secret is not provided"),
    ("delete_bob", "DELETE Bob", "1 delete event"),
    ("send", "cdc_hooks.send('myhook', George Costanza)", "1 custom event"),
)


def say(text: str = "") -> None:
    print(text, flush=True)


def run_demo(dsn: str | None, *, keep_running: bool = False) -> int:
    """Runs the demo and returns the exit code: 0 if every check passed."""
    # SIGTERM unwinds like Ctrl-C, so the embedded server and the demo's tables go too.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _run_demo(dsn, keep_running=keep_running)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _run_demo(dsn: str | None, *, keep_running: bool) -> int:
    started = time.monotonic()
    say("cdc-hooks demo: durian's Person example, from table writes to signed webhooks.")
    say("Triggers record each change of a table; the relay POSTs it to every listener whose")
    say("filter matches. A debug receiver in this process prints what arrives.\n")
    if dsn:
        say(f"[1/6] PostgreSQL at {describe_dsn(dsn)} (the demo works in schema {SCHEMA} "
            "and removes what it adds)")
        ok = _run_in(dsn, embedded=False, keep_running=keep_running)
    else:
        say("[1/6] PostgreSQL: none configured, so the demo starts an embedded one (pgserver)")
        with embedded_server() as (server_dsn, folder):
            say(f"        in {folder} (removed at the end)")
            ok = _run_in(server_dsn, embedded=True, keep_running=keep_running)
    say(f"\n{'Done' if ok else 'FAILED'} in {time.monotonic() - started:.1f} s.")
    if ok and not keep_running:
        say("Next: cdc-hooks demo --keep-running to write rows yourself; "
            "cdc-hooks debug-receiver --port 8000 to watch your own listeners.")
    return 0 if ok else 1


@contextlib.contextmanager
def embedded_server() -> Iterator[tuple[str, Path]]:
    """An embedded PostgreSQL in a temporary directory, stopped and deleted afterwards."""
    with warnings.catch_warnings(), needs("embedded", "the demo without --dsn"):
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        import pgserver
    folder = Path(tempfile.mkdtemp(prefix="cdc-hooks-demo-"))
    try:
        try:
            # pgserver exports get_server without declaring it (no __all__).
            server = pgserver.get_server(folder / "pgdata", cleanup_mode="stop")  # type: ignore[attr-defined]
        except Exception as exc:  # pgserver raises whatever initdb/pg_ctl raised
            raise CdcHooksError(
                f"could not start an embedded PostgreSQL (pgserver): {exc}; "
                "give --dsn to run the demo on a server of yours") from None
        try:
            yield server.get_uri("postgres"), folder
        finally:
            _stop_immediately(server)
            server.cleanup()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _stop_immediately(server: Any) -> None:
    """SIGQUIT: immediate shutdown, no shutdown checkpoint to write and fsync, since the
    data directory is deleted next (pgserver's own stop waits for the checkpoint)."""
    import psutil  # a dependency of pgserver

    with contextlib.suppress(psutil.Error, AssertionError):
        process = server.get_postmaster_info().process
        process.send_signal(signal.SIGQUIT)
        process.wait(10)


def _run_in(dsn: str, *, embedded: bool, keep_running: bool) -> bool:
    config = Config(dsn=dsn, hooks=DEMO_HOOKS, delivery=DeliveryConfig(
        retry_schedule=(0.5, 1.0, 2.0),  # a demo should not wait minutes for a retry
        allow_private_networks=True,  # the receiver is on loopback
    ))
    had_schema = _check_database(config)
    try:
        _prepare(config)
        return asyncio.run(_live(config, keep_running=keep_running))
    finally:
        if not embedded:  # an embedded server is deleted whole
            _clean_up(config, drop_cdc_hooks=not had_schema)


def _check_database(config: Config) -> bool:
    """Refuses a database with hooks of its own; returns whether cdc_hooks existed before."""
    with Database.connect(config.dsn) as db:
        version = db.conn.execute(query("server_version", "demo.sql")).fetchone()
        say(f"        PostgreSQL {version[0] if version else '?'}")
        had_schema = db.schema_exists()
        foreign = [h.name for h in db.installed_hooks() if not _is_demo_hook(h)]
        if foreign:
            raise CdcHooksError(
                f"{describe_dsn(config.dsn or '')} already has cdc_hooks installed with hooks "
                f"{', '.join(foreign)}; the demo would replace them. Run it without --dsn "
                "(embedded PostgreSQL) or on an empty database.")
        if had_schema:  # listeners a killed demo left behind would get deliveries too
            _remove_demo_listeners(db)
    return had_schema


def _prepare(config: Config) -> None:
    with Database.connect(config.dsn) as db:
        db.run(query("create_schema", "demo.sql"))
    say(f"[2/6] Table {SCHEMA}.person (id, name, address, secret) created")
    plan = installer.install(config)
    say("[3/6] cdc-hooks install: statement-level triggers record the provided columns only")
    for line in plan.changes:
        say(f"        {line}")


def _is_demo_hook(hook: InstalledHook) -> bool:
    if hook.name.startswith(BUILTIN_PREFIX):  # installed with every config
        return True
    if hook.name == PERSON.name:
        return (hook.table_schema, hook.table_name) == (SCHEMA, "person")
    return hook.name == MYHOOK.name and hook.table_name is None


def _clean_up(config: Config, *, drop_cdc_hooks: bool) -> None:
    with Database.connect(config.dsn) as db:
        if db.schema_exists():
            _remove_demo_listeners(db)
    # Every installed hook is the demo's (checked at the start): remove them all.
    installer.uninstall(config, drop_schema=drop_cdc_hooks)
    with Database.connect(config.dsn) as db:
        db.run(query("drop_schema", "demo.sql"))


def _remove_demo_listeners(db: Database) -> None:
    rows = db.conn.execute(query("demo_listeners", "demo.sql"),
                           {"hooks": [h.name for h in DEMO_HOOKS]}).fetchall()
    for (listener_id,) in rows:
        remove_listener(db, listener_id)


# The live part: receiver, listeners, relay, writes, deliveries -------------


@dataclass
class Run:
    """What one demo run set up and saw."""

    url: str
    secrets: dict[str, str]  # listener path -> its signing secret
    hidden: dict[str, str]  # values written to the secret column
    ids: dict[str, int]  # listener path -> listener id
    first_write: float = 0.0
    received: list[Delivery] = field(default_factory=list)
    duplicates: int = 0
    clock: bool = False  # show arrival as time of day (--keep-running), not since the writes


async def _live(config: Config, *, keep_running: bool) -> bool:
    arrivals: asyncio.Queue[Delivery] = asyncio.Queue()
    secret_of = {listener.path: generate_secret() for listener in LISTENERS}
    receiver = Receiver(list(secret_of.values()), arrivals.put_nowait)
    url = await receiver.start("127.0.0.1", 0)
    try:
        hidden = {who: f"{who}-secret-{secrets.token_hex(4)}" for who in ("joe", "jane", "bob", "jane2")}
        ids = await asyncio.to_thread(_add_listeners, config, url, secret_of)
        run = Run(url, secret_of, hidden, ids)
        relay = Relay(config)
        relay_task = asyncio.create_task(relay.run())
        try:
            await _write(config.dsn or "", run)
            await _collect(config.dsn or "", run, arrivals, relay_task)
            ok = _report(run)
            if keep_running:
                await _keep_running(config.dsn or "", run, receiver)
            return ok
        finally:
            relay.stop()
            # Bounded: in-flight requests get their timeout; a crash was reported by _collect.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(relay_task, config.delivery.timeout + 5)
    finally:
        await receiver.stop()


def _add_listeners(config: Config, url: str, secret_of: dict[str, str]) -> dict[str, int]:
    ids = {}
    with Database.connect(config.dsn) as db:
        for listener in LISTENERS:
            ids[listener.path] = add_listener(db, config, listener.hook, url + listener.path,
                                              listener.match, secret_of[listener.path]).id
    say(f"[4/6] Debug receiver on {url}; durian's listeners added, each with its own secret:")
    for listener in LISTENERS:
        say(f"        #{ids[listener.path]} {listener.hook:<7} {listener.label:<23} -> {listener.path}")
    return ids


async def _write(dsn: str, run: Run) -> None:
    say("[5/6] Relay started; now the application writes:")
    params: dict[str, dict[str, Any]] = {
        "insert_people": {k: run.hidden[k] for k in ("joe", "jane", "bob")},
        "change_jane_secret": {"secret": run.hidden["jane2"]},
        "send": {"hook": MYHOOK.name,
                 "payload": jsoncodec.dumps({"name": "George Costanza", "address": "New York City"})},
    }
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        run.first_write = time.monotonic()
        for name, what, expect in WRITES:
            statement = query("send") if name == "send" else query(name, "demo.sql")
            await conn.execute(statement, params.get(name))
            say(f"        {what:<43} -> {expect}")


async def _collect(dsn: str, run: Run, arrivals: asyncio.Queue[Delivery],
                   relay_task: asyncio.Task[None]) -> None:
    """Shows deliveries until every expected one arrived (or time is up), then the stragglers."""
    say("[6/6] Deliveries, as the receiver gets them (seconds after the first write):")
    deadline = time.monotonic() + WAIT_FOR_DELIVERIES
    while _missing(run) and time.monotonic() < deadline:
        if relay_task.done():
            relay_task.result()  # raises what stopped it
            raise CdcHooksError("the relay stopped unexpectedly")
        with contextlib.suppress(TimeoutError):
            _take(run, await asyncio.wait_for(arrivals.get(), 0.5))
    await _wait_idle(dsn)
    while not arrivals.empty():  # anything unexpected arrives before the relay is idle
        _take(run, arrivals.get_nowait())


def _expected() -> Counter[tuple[str, str, str]]:
    return Counter((lsn.path, event, name) for lsn in LISTENERS for event, name in lsn.expected)


def _what(delivery: Delivery) -> tuple[str, str, str]:
    payload = delivery.payload if isinstance(delivery.payload, dict) else {}
    data = payload["data"] if isinstance(payload.get("data"), dict) else {}
    return delivery.path, str(payload.get("event")), str(data.get("name"))


def _missing(run: Run) -> Counter[tuple[str, str, str]]:
    return _expected() - Counter(_what(d) for d in run.received)


def _take(run: Run, delivery: Delivery) -> None:
    if any(d.webhook_id == delivery.webhook_id for d in run.received):
        run.duplicates += 1  # at least once: a receiver drops a webhook-id it has seen
        say(f"        (a repeat of {delivery.webhook_id}: receivers deduplicate by webhook-id)")
        return
    run.received.append(delivery)
    payload = delivery.payload if isinstance(delivery.payload, dict) else {}
    changes = f"  changes {jsoncodec.dumps_spaced(payload['changes'])}" if "changes" in payload else ""
    signed = "signed ok" if _signed(run, delivery) else "BAD SIGNATURE"
    when = (time.strftime("%H:%M:%S") if run.clock
            else f"+{delivery.received_at - run.first_write:.2f}s")
    say(f"        {when}  "
        f"#{run.ids.get(delivery.path, '?')} {delivery.path:<15} {payload.get('event', '?'):<7} "
        f"{jsoncodec.dumps_spaced(payload.get('data'))}{changes}  ({signed})")


def _signed(run: Run, delivery: Delivery) -> bool:
    secret = run.secrets.get(delivery.path)
    if secret is None or not delivery.signature_header:
        return False
    return verify(secret_key(secret), delivery.webhook_id or "", delivery.timestamp or "",
                  delivery.body, delivery.signature_header)


async def _wait_idle(dsn: str) -> None:
    """Until the outbox is empty and no delivery is pending (or a few seconds pass)."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        deadline = time.monotonic() + WAIT_FOR_IDLE
        while time.monotonic() < deadline:
            row = await (await conn.execute(query("pending_counts"))).fetchone()
            if row is not None and row[0] == 0 and row[1] == 0:
                return
            await asyncio.sleep(0.05)


def _report(run: Run) -> bool:
    got = Counter(_what(d) for d in run.received)
    say("\nPer listener, what its filter let through:")
    for lsn in LISTENERS:
        mine = [(e, n) for p, e, n in (_what(d) for d in run.received) if p == lsn.path]
        say(f"  #{run.ids[lsn.path]} {lsn.hook:<7} {lsn.label:<23} "
            f"{sum(1 for item in lsn.expected if (lsn.path, *item) in got)} of {len(lsn.expected)}: "
            f"{', '.join(f'{e} {n}' for e, n in mine) or '(nothing)'}")
    missing = _missing(run)
    unexpected = Counter(_what(d) for d in run.received) - _expected()
    bodies = [d.body for d in run.received]
    leaked = [v for v in run.hidden.values() if any(v.encode() in body for body in bodies)]
    unsigned = [d.webhook_id for d in run.received if not _signed(run, d)]
    last = max((d.received_at for d in run.received), default=run.first_write) - run.first_write
    checks = [
        (not missing, f"all {sum(_expected().values())} expected deliveries arrived, "
                      f"the last {last:.2f} s after the first write",
         f"missing: {_describe(missing)}"),
        (not unexpected, "nothing else arrived", f"unexpected: {_describe(unexpected)}"),
        (not unsigned, "every signature verifies with its listener's secret",
         f"bad signatures: {', '.join(str(i) for i in unsigned)}"),
        (not leaked, f"the secret column never left the database: none of its {len(run.hidden)} "
                     f"values is in any of the {len(bodies)} bodies",
         f"secret values found in bodies: {', '.join(leaked)}"),
    ]
    say("\nChecks:")
    for ok, good, bad in checks:
        say(f"  {'ok  ' if ok else 'FAIL'}  {good if ok else bad}")
    return all(ok for ok, _, _ in checks)


def _describe(items: Counter[tuple[str, str, str]]) -> str:
    return ", ".join(f"{event} {name} to {path}" + (f" (x{n})" if n > 1 else "")
                     for (path, event, name), n in items.items())


async def _keep_running(dsn: str, run: Run, receiver: Receiver) -> None:
    say("\nStill running (--keep-running): write to the table and watch deliveries arrive.")
    insert = f"INSERT INTO {SCHEMA}.person (name, address) VALUES ('Jill', '5 Bay Road')"
    say(f"  psql '{without_password(dsn)}' -c \"{insert}\"")
    say("Ctrl-C to stop.\n")
    run.clock = True
    receiver.on_delivery = lambda delivery: _take(run, delivery)
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopped.set)
    await stopped.wait()
