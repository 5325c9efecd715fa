"""All database access: named queries from sql/, migrations, and the two stores.

``Database`` (synchronous) serves install, the CLI, the Python API and the web
interface; ``RelayStore`` (asynchronous) serves the relay's hot loop. Both run
only the named queries of sql/queries.sql and the files of sql/migrations.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime
from importlib import resources
from typing import Any, TypeVar

import psycopg
from psycopg import sql
from psycopg.rows import RowFactory, args_row, class_row, kwargs_row, scalar_row, tuple_row

from . import jsoncodec
from .capturing import HookCapture
from .dsn import check_dsn, connect_error, describe_dsn
from .errors import DatabaseUnavailable
from .rows import (
    Attempt,
    Delivery,
    DisabledListener,
    FailingListener,
    HeldListener,
    HookActivity,
    InstalledHook,
    ListenerBacklog,
    ListenerCounts,
    ListenerMatch,
    ListenerRow,
    Minute,
    RecentEvent,
    StatusFigures,
    StoredDelivery,
    UnfinishedBackfill,
)
from .urls import redact_url

SCHEMA = "cdc_hooks"
# What statements raise once the cdc_hooks schema (or part of it) is dropped.
SCHEMA_GONE = (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedFunction,
               psycopg.errors.InvalidSchemaName)
_QUERY_HEADER = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)
T = TypeVar("T")
Statement = str | sql.SQL | sql.Composed  # a query's name in sql/queries.sql, or a composed statement


def sql_text(name: str) -> str:
    """The text of a file in sql/ (shipped as package data)."""
    return resources.files("cdc_hooks.sql").joinpath(name).read_text(encoding="utf-8")


@functools.cache
def named_queries(file: str) -> dict[str, str]:
    """The blocks of a file in sql/, each under its ``-- name: NAME`` line, by name."""
    parts = _QUERY_HEADER.split(sql_text(file))
    return {name: body.strip().rstrip(";") for name, body in zip(parts[1::2], parts[2::2], strict=True)}


def queries() -> dict[str, str]:
    """The named queries of sql/queries.sql."""
    return named_queries("queries.sql")


def query(name: str, file: str = "queries.sql") -> sql.SQL:
    """A named query of a file in sql/ (default queries.sql)."""
    return sql.SQL(named_queries(file)[name])


@functools.cache
def migrations() -> list[tuple[int, str]]:
    """(version, SQL) of each file in sql/migrations, in order."""
    folder = resources.files("cdc_hooks.sql").joinpath("migrations")
    found = []
    for entry in folder.iterdir():
        match = re.fullmatch(r"(\d+)_\w+\.sql", entry.name)
        if match:
            found.append((int(match.group(1)), entry.read_text(encoding="utf-8")))
    return sorted(found)


def session_options(*, autocommit: bool = True) -> dict[str, Any]:
    """psycopg's connection options for every connection but the relay's.

    No server-side prepared statements (psycopg prepares a query run 5 times):
    behind a transaction-mode pooler (PgBouncer before 1.21) each transaction
    may run on another server session, where the statement is missing or another
    client's of the same name exists (DuplicatePreparedStatement)."""
    return {"autocommit": autocommit, "connect_timeout": 10, "prepare_threshold": None}


def required_dsn(dsn: str | None) -> str:
    if not dsn:
        raise DatabaseUnavailable(
            "no database configured: set [database] dsn in the config or CDC_HOOKS_DSN"
        )
    return dsn


def connect(dsn: str | None, *, autocommit: bool = True) -> psycopg.Connection[Any]:
    dsn = required_dsn(dsn)
    check_dsn(dsn)
    try:
        return psycopg.connect(dsn, **session_options(autocommit=autocommit))
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(
            f"cannot connect to PostgreSQL at {describe_dsn(dsn)}: {connect_error(dsn, exc)}"
        ) from None


def disabled_event(listener_id: int, hook: str, url: str, reason: str) -> dict[str, Any]:
    """The cdc_hooks.listener_disabled payload of a disabled listener: other receivers
    get its URL without credentials."""
    return {"id": listener_id, "hook": hook, "url": redact_url(url), "reason": reason}


def _statement(statement: Statement) -> sql.SQL | sql.Composed:
    return query(statement) if isinstance(statement, str) else statement


class Database:
    """A synchronous session with the database: one autocommit connection;
    ``transaction()`` groups statements that must land together.

    Four ways to run a statement (a query's name in sql/queries.sql, or a statement
    composed from a file of sql/): ``rows`` reads every row, ``row`` the first (or
    None), ``value`` the first column of the first row, ``run`` none (for its effect).
    A row is read into the type ``row_type`` makes (psycopg's row factories:
    ``class_row(rows.Delivery)``, ``scalar_row``), never by position."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn

    @classmethod
    def connect(cls, dsn: str | None) -> Database:
        return cls(connect(dsn))

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self.conn.transaction():
            yield

    def rows(self, statement: Statement, params: dict[str, Any] | None = None, *,
             row_type: RowFactory[T]) -> list[T]:
        with self.conn.cursor(row_factory=row_type) as cur:
            cur.execute(_statement(statement), params)
            return cur.fetchall()

    def row(self, statement: Statement, params: dict[str, Any] | None = None, *,
            row_type: RowFactory[T]) -> T | None:
        found = self.rows(statement, params, row_type=row_type)
        return found[0] if found else None

    def value(self, statement: Statement, params: dict[str, Any] | None = None) -> Any:
        """The first column of the first row; None if there is no row."""
        return self.row(statement, params, row_type=scalar_row)

    def run(self, statement: Statement, params: dict[str, Any] | None = None) -> None:
        """Runs a statement for its effect; what it returns is not read."""
        self.conn.execute(_statement(statement), params)

    # Schema -------------------------------------------------------------

    def schema_exists(self) -> bool:
        return bool(self.value("schema_exists"))

    def schema_version(self) -> int:
        if not self.schema_exists():
            return 0
        return int(self.value("schema_version"))

    def pending_migrations(self) -> list[tuple[int, str]]:
        current = self.schema_version()
        return [(v, text) for v, text in migrations() if v > current]

    def migrate(self) -> list[int]:
        """Brings the cdc_hooks schema to the newest version; call inside a transaction."""
        self.run("lock_install")
        pending = self.pending_migrations()
        if pending and not self.schema_exists():
            self.run(sql.SQL(sql_text("bootstrap.sql")))
        for version, text in pending:
            self.run(sql.SQL(text))
            self.run("record_schema_version", {"version": version})
        return [v for v, _ in pending]

    # Hooks --------------------------------------------------------------

    def installed_hooks(self) -> list[InstalledHook]:
        if not self.schema_exists():
            return []
        return self.rows("installed_hooks", row_type=kwargs_row(InstalledHook.from_row))

    def save_hook(self, hook: InstalledHook) -> None:
        self.run("save_hook", hook.params())

    def current_user(self) -> str:
        return str(self.value("current_user"))

    def missing_roles(self, roles: Iterable[str]) -> list[str]:
        return self.rows("missing_roles", {"roles": list(roles)}, row_type=scalar_row)

    def grant_relay(self, role: str) -> None:
        self.run(query("grant_relay").format(role=sql.Identifier(role)))

    def forget_hook(self, name: str) -> None:
        self.run("forget_hook", {"name": name})

    def table_triggers(self, schema: str, table: str) -> list[str]:
        return self.rows("table_triggers", {"schema": schema, "table": table}, row_type=scalar_row)

    def table_partitions(self, schema: str, table: str) -> list[tuple[str, str]]:
        """(schema, name) of each partition below the table."""
        return self.rows("table_partitions", {"schema": schema, "table": table},
                         row_type=args_row(lambda schema, name: (schema, name)))

    def table_columns(self, schema: str, table: str) -> list[str] | None:
        columns = self.value("table_columns", {"schema": schema, "table": table})
        return None if columns is None else list(columns)

    def function_comment(self, function: str) -> str | None:
        return self.value("function_comment", {"function": function})  # type: ignore[no-any-return]

    def function_exists(self, function: str) -> bool:
        return bool(self.value("function_exists", {"function": function}))

    def pending_counts(self) -> tuple[int, int]:
        """(outbox rows, pending deliveries)."""
        return self.row("pending_counts", row_type=args_row(lambda outbox, deliveries: (
            int(outbox), int(deliveries)))) or (0, 0)

    def send(self, hook: str, payload_json: str) -> int:
        return int(self.value("send", {"hook": hook, "payload": payload_json}))

    # Listeners ----------------------------------------------------------

    def add_listener(self, hook: str, url: str, match_json: str, config_json: str,
                     secret: str, headers_json: str = "{}", events: list[str] | None = None,
                     changed: list[str] | None = None, rate: float | None = None) -> int:
        return int(self.value("add_listener", {"hook": hook, "url": url, "match": match_json,
                                               "config": config_json, "secret": secret,
                                               "headers": headers_json, "events": events,
                                               "changed": changed, "rate": rate}))

    def list_listeners(self) -> list[ListenerRow]:
        return self.rows("list_listeners", row_type=class_row(ListenerRow))

    def get_listener(self, listener_id: int) -> ListenerRow | None:
        return self.row("get_listener", {"id": listener_id}, row_type=class_row(ListenerRow))

    def hook_listeners(self) -> list[ListenerMatch]:
        """Every listener's hook, match and state."""
        return self.rows("hook_listeners", row_type=class_row(ListenerMatch))

    def listener_stats(self, listener_id: int | None = None) -> list[ListenerCounts]:
        """Outcomes of each listener's last 1000 deliveries (of one listener if given)."""
        return self.rows("listener_stats", {"id": listener_id}, row_type=class_row(ListenerCounts))

    def remove_listener(self, listener_id: int) -> bool:
        with self.transaction():
            self.run("remove_listener_deliveries", {"id": listener_id})
            return self.value("remove_listener", {"id": listener_id}) is not None

    def set_listener_state(self, listener_id: int, state: str, reason: str | None = None) -> bool:
        return self.value("set_listener_state",
                          {"id": listener_id, "state": state, "reason": reason}) is not None

    def update_listener(self, listener_id: int, *, url: str | None = None,
                        match_json: str | None = None, secret: str | None = None,
                        overlap: float = 0.0, headers_json: str | None = None,
                        backfill: bool | None = None, events: list[str] | None = None,
                        changed: list[str] | None = None, set_rate: bool = False,
                        rate: float | None = None) -> bool:
        """events/changed: None keeps them, [] resets them to their default; the
        rate changes (to ``rate``, None: no limit) only with set_rate."""
        return self.value("update_listener", {
            "id": listener_id, "url": url, "match": match_json, "secret": secret,
            "overlap": overlap, "headers": headers_json, "backfill": backfill,
            "events": events, "changed": changed, "set_rate": set_rate,
            "rate": rate}) is not None

    # Deliveries ---------------------------------------------------------

    def deliveries(self, *, status: str | None = None, listener_id: int | None = None,
                   hook: str | None = None, since: datetime | None = None,
                   until: datetime | None = None, before: int | None = None,
                   limit: int = 50) -> list[Delivery]:
        """Newest first; ``before`` (a delivery id) is the cursor of the next page."""
        return self.rows("deliveries", {
            "status": status, "listener_id": listener_id, "hook": hook, "since": since,
            "until": until, "before": before, "limit": limit,
        }, row_type=class_row(Delivery))

    def delivery(self, delivery_id: int) -> StoredDelivery | None:
        return self.row("delivery", {"id": delivery_id}, row_type=class_row(StoredDelivery))

    def delivery_attempts(self, delivery_id: int) -> list[Attempt]:
        return self.rows("delivery_attempts", {"id": delivery_id}, row_type=class_row(Attempt))

    def redeliver(self, *, delivery_id: int | None = None, listener_id: int | None = None,
                  since: datetime | None = None, only_dead: bool = True) -> list[int]:
        """Ids of the finished deliveries queued again."""
        return self.rows("redeliver", {"id": delivery_id, "listener_id": listener_id,
                                       "since": since, "only_dead": only_dead},
                         row_type=scalar_row)

    # Status -------------------------------------------------------------

    def status(self, minutes: int = 5) -> StatusFigures:
        figures = self.row("status", {"minutes": minutes}, row_type=class_row(StatusFigures))
        assert figures is not None  # one row of aggregates
        return figures

    def failing_listeners(self) -> list[FailingListener]:
        return self.rows("failing_listeners", row_type=class_row(FailingListener))

    def held_listeners(self) -> list[HeldListener]:
        """Each listener paused or disabled, with why."""
        return self.rows("held_listeners", row_type=class_row(HeldListener))

    def hooks_capturing(self) -> list[HookCapture]:
        """Whether each table hook's triggers are in place (capturing.py)."""
        if not self.schema_exists():
            return []
        return self.rows("hooks_capturing", row_type=kwargs_row(HookCapture.from_row))

    def hook_activity(self) -> list[HookActivity]:
        """Per installed hook: its listeners and what they were delivered in the last hour."""
        if not self.schema_exists():
            return []
        return self.rows("hook_activity", row_type=class_row(HookActivity))

    def timeline(self, minutes: int = 60) -> list[Minute]:
        """Delivered and failed attempts for each of the last `minutes` minutes."""
        return self.rows("timeline", {"minutes": minutes}, row_type=class_row(Minute))

    def recent_events(self, hook: str, limit: int = 10) -> list[RecentEvent]:
        return self.rows("recent_events", {"hook": hook, "limit": limit},
                         row_type=class_row(RecentEvent))

    # Web sessions (cdc_hooks/web/sessions.py) ----------------------------

    def web_session(self, id_hash: bytes, login: str) -> tuple[str, str | None] | None:
        """(csrf, flash) of a live session logged in with this token's tag, else None."""
        return self.row("web_session", {"id_hash": id_hash, "login": login},
                        row_type=args_row(lambda csrf, flash: (csrf, flash)))

    def start_web_session(self, id_hash: bytes, login: str, csrf: str, seconds: int) -> None:
        self.run("start_web_session", {"id_hash": id_hash, "login": login, "csrf": csrf,
                                       "seconds": seconds})

    def end_web_session(self, id_hash: bytes) -> None:
        self.run("end_web_session", {"id_hash": id_hash})

    def set_web_session_flash(self, id_hash: bytes, flash: str | None) -> None:
        self.run("set_web_session_flash", {"id_hash": id_hash, "flash": flash})

    def prune_web_sessions(self) -> None:
        self.run("prune_web_sessions")

    # Metrics ------------------------------------------------------------

    def metrics_backlog(self) -> list[ListenerBacklog]:
        """Per listener, with the outbox's figures; one row of None listener columns if
        there are none."""
        return self.rows("metrics_backlog", row_type=class_row(ListenerBacklog))

    # Operations: retention, listener health, backfill --------------------
    # (cdc_hooks/retention.py, health.py, backfill.py; schema version 2)

    def try_lock_maintenance(self) -> bool:
        return bool(self.value("try_lock_maintenance"))

    def unlock_maintenance(self) -> None:
        self.run("unlock_maintenance")

    def listener_ids(self) -> list[int]:
        return self.rows("listener_ids", row_type=scalar_row)

    def prune_deliveries(self, listener_id: int, status: str, seconds: float, batch: int) -> int:
        return int(self.value("prune_deliveries", {"listener_id": listener_id, "status": status,
                                                   "seconds": seconds, "batch": batch}))

    def prune_attempts(self, seconds: float, batch: int) -> int:
        return int(self.value("prune_attempts", {"seconds": seconds, "batch": batch}))

    def prune_events(self, after: int, seconds: float, batch: int) -> tuple[int | None, int, int]:
        """(last id scanned, events deleted, old events scanned) of one window."""
        row = self.row("prune_events", {"after": after, "seconds": seconds, "batch": batch},
                       row_type=tuple_row)
        return row[0], int(row[1]), int(row[2])  # type: ignore[index]

    def check_listener_health(self) -> None:
        with self.transaction():
            self.run("forget_listener_health")
            self.run("forget_circuits")
            self.run("check_listener_health")

    def disable_failing_listeners(self, seconds: float, reason: str) -> list[DisabledListener]:
        """Each listener disabled (by id; its URL as shown), with its
        cdc_hooks.listener_disabled event."""
        with self.transaction():
            found = self.rows("disable_failing_listeners", {"seconds": seconds, "reason": reason},
                              row_type=class_row(DisabledListener))
            disabled = []
            for row in sorted(found, key=lambda r: r.id):
                event = disabled_event(row.id, row.hook, row.url, row.disabled_reason)
                disabled.append(replace(row, url=event["url"],
                                        event_id=self.value("send_listener_disabled", event)))
            return disabled

    def resume_listener_deliveries(self, listener_id: int) -> None:
        self.run("resume_listener_deliveries", {"id": listener_id})
        self.reset_circuit(listener_id)

    def reset_circuit(self, listener_id: int) -> None:
        """Closes the listener's circuit (relay/circuit.py): resumed, or a new URL."""
        self.run("reset_circuit", {"id": listener_id})

    def wake_relay(self) -> None:
        self.run("wake_relay")

    def autovacuum_on(self) -> bool:
        return bool(self.value("autovacuum_on"))

    def backfill_find(self, hook: str, condition: str | None,
                      listener_id: int | None) -> UnfinishedBackfill | None:
        """The unfinished backfill of this hook, condition and listener, if any."""
        return self.row("backfill_find", {"hook": hook, "condition": condition,
                                          "listener_id": listener_id},
                        row_type=class_row(UnfinishedBackfill))

    def backfill_start(self, hook: str, condition: str | None, listener_id: int | None,
                       key_columns: Sequence[str]) -> int:
        return int(self.value("backfill_start", {"hook": hook, "condition": condition,
                                                 "listener_id": listener_id,
                                                 "key_columns": list(key_columns)}))

    def backfill_progress(self, backfill_id: int, last_key: Sequence[str], rows: int) -> None:
        self.run("backfill_progress", {"id": backfill_id, "last_key": list(last_key),
                                       "rows": rows})

    def backfill_finish(self, backfill_id: int) -> None:
        self.run("backfill_finish", {"id": backfill_id})

    def backfill_forget(self, backfill_id: int) -> None:
        self.run("backfill_forget", {"id": backfill_id})


class RelayStore:
    """The relay's asynchronous access: dispatch, claims, results, waiting."""

    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self.conn = conn

    @classmethod
    async def connect(cls, dsn: str, *, autocommit: bool = True) -> RelayStore:
        """A connection whose statements are prepared at once: the relay runs few, often.
        The relay calls backend_pid to know it has a session of its own, then tune_session."""
        conn = await psycopg.AsyncConnection.connect(
            dsn, autocommit=autocommit, connect_timeout=10, prepare_threshold=0)
        return cls(conn)

    async def backend_pid(self) -> int:
        """pg_backend_pid(), never prepared: asked before the relay knows that each of
        its connections keeps one server session."""
        async with self.conn.cursor() as cur:
            await cur.execute(query("backend_pid"), prepare=False)
            return int((await cur.fetchone())[0])  # type: ignore[index]

    async def tune_session(self) -> None:
        """synchronous_commit off: a commit lost in a server crash is redone (outbox
        rows come back and dispatch again under the same event ids; leases lapse;
        results are attempted again), so at-least-once holds without a WAL flush per
        claim and per batch. jit off: the relay's statements take milliseconds, and
        one whose plan is estimated at a scan of a large backlog (the take-over's
        probe, not run unless a relay session ended) spent 2 s compiling, every 2 s.
        Set here, not as the startup parameter "options", which PgBouncer refuses."""
        await self.run("relay_session_settings")

    async def close(self) -> None:
        await self.conn.close()

    async def run(self, name: str, params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        async with self.conn.cursor() as cur:
            await cur.execute(query(name), params)
            return await cur.fetchall() if cur.description else []

    async def installed_hooks(self) -> list[InstalledHook]:
        async with self.conn.cursor(row_factory=kwargs_row(InstalledHook.from_row)) as cur:
            await cur.execute(query("installed_hooks"))
            return await cur.fetchall()

    async def hooks_capturing(self) -> list[HookCapture]:
        async with self.conn.cursor(row_factory=kwargs_row(HookCapture.from_row)) as cur:
            await cur.execute(query("hooks_capturing"))
            return await cur.fetchall()

    async def active_listeners(self) -> list[tuple[Any, ...]]:
        return await self.run("active_listeners")

    async def take_outbox(self, limit: int) -> list[tuple[Any, ...]] | None:
        """Within the caller's transaction: outbox rows, or None if another relay dispatches."""
        locked = await self.run("try_lock_dispatch")
        if not locked[0][0]:
            return None
        return await self.run("take_outbox", {"limit": limit})

    async def insert_events(self, rows: Iterable[tuple[int, str, str, str, datetime]]) -> None:
        """(id, hook, kind, stored body, occurred_at) rows, by COPY: dumping
        large array parameters cost the dispatcher more than the rest of it."""
        async with self.conn.cursor() as cur, cur.copy(query("copy_events")) as copy:
            for row in rows:
                await copy.write_row(row)

    async def insert_deliveries(self, deliveries: Sequence[tuple[int, int, str | None, bool, bool]],
                                lease: float, session: int) -> list[tuple[Any, ...]]:
        """Inserts deliveries (event_id, listener_id, row_key, direct, first: the first
        of its row and listener in the batch); returns (id, event_id, listener_id,
        attempt) of those leased to this relay (claimed by its session)."""
        rows = await self.run("insert_deliveries", {
            "deliveries": jsoncodec.dumps_rows(deliveries), "lease": lease, "session": session})
        return [r for r in rows if r[3] == 1]

    async def refresh_statistics(self, min_changes: int) -> None:
        """ANALYZE the deliveries table if its statistics are far behind (see the query)."""
        if (await self.run("deliveries_statistics_stale", {"min_changes": min_changes}))[0][0]:
            await self.run("analyze_deliveries")

    async def outbox_nonempty(self) -> bool:
        return bool((await self.run("outbox_nonempty"))[0][0])

    async def claim_deliveries(self, slots: dict[int, int], total: int,
                               lease: float, session: int) -> list[tuple[Any, ...]]:
        return await self.run("claim_deliveries", {
            "listener_ids": list(slots), "slots": list(slots.values()), "total": total,
            "lease": lease, "session": session,
        })

    async def record_results(self, results: Sequence[Any]) -> None:
        rows = [[r.delivery_id, r.attempt, r.status, r.retry_in, r.code, r.error,
                 r.duration_ms, r.response, r.session] for r in results]
        await self.run("record_results", {"results": jsoncodec.dumps_rows(rows)})

    async def renew_leases(self, deliveries: Sequence[tuple[int, int]], lease: float,
                           session: int) -> None:
        """(id, attempt) of deliveries still held by this relay: leased `lease` s more."""
        await self.run("renew_leases", {"ids": [d for d, _ in deliveries],
                                        "attempts": [a for _, a in deliveries], "lease": lease,
                                        "session": session})

    async def release_deliveries(self, ids: Sequence[int], session: int) -> None:
        await self.run("release_deliveries", {"ids": list(ids), "session": session})

    async def register_session(self) -> int:
        """This connection's relay session (relay_sessions): its id, locked for the
        connection's life."""
        session, locked = (await self.run("register_relay_session"))[0]
        assert locked, "a new relay session's lock is free"
        return int(session)

    async def carry_over(self, old: int, session: int) -> bool:
        """Moves the claims of this relay's last session `old` to `session`, while
        nobody took it over: whether it did."""
        carried, _ = (await self.run("carry_over_session", {"old": old, "session": session}))[0]
        return bool(carried)

    async def take_over(self, session: int) -> tuple[int, int, int]:
        """Takes over the claims of relay sessions that ended: (live sessions,
        sessions ended, deliveries made due)."""
        live, ended, freed = (await self.run("take_over_sessions", {"session": session}))[0]
        return int(live), int(ended), int(freed)

    async def take_slots(self, session: int, wants: dict[int, tuple[int, int]],
                         cap: int) -> dict[int, int]:
        """Per listener, (slots wanted, floor) -> slots this session holds now."""
        rows = await self.run("take_slots", {
            "session": session, "listener_ids": list(wants),
            "wants": [w for w, _ in wants.values()], "floors": [f for _, f in wants.values()],
            "cap": cap})
        return {int(listener_id): int(slots) for listener_id, slots in rows}

    async def circuit_states(self, window: float) -> list[tuple[Any, ...]]:
        """The circuits a relay must know of (relay/circuit.py CircuitView.note)."""
        return await self.run("circuit_states", {"window": window})

    async def record_circuits(self, batch: Sequence[list[Any]], new: Sequence[int],
                              settings: dict[str, float]) -> list[tuple[Any, ...]]:
        """Counts a batch of results into the listeners' circuits (rows of
        relay/circuit.py tally); new: listeners that may have no row yet."""
        if new:
            await self.run("add_circuits", {"listener_ids": list(new)})
        return await self.run("record_circuits",
                              {"batch": jsoncodec.dumps_rows(batch), **settings})

    async def take_probes(self, listener_ids: Sequence[int], lease: float) -> set[int]:
        """Of these listeners' circuits, those whose probe this relay now holds."""
        rows = await self.run("take_probes", {"listener_ids": list(listener_ids), "lease": lease})
        return {r[0] for r in rows}

    async def release_probes(self, listener_ids: Sequence[int]) -> None:
        await self.run("release_probes", {"listener_ids": list(listener_ids)})

    async def disable_listener(self, listener_id: int, reason: str) -> None:
        async with self.conn.transaction():
            for row in await self.run("disable_listener_gone", {"id": listener_id, "reason": reason}):
                await self.run("send_listener_disabled", disabled_event(*row))

    async def seconds_until_due(self, listener_ids: Sequence[int],
                                within: float) -> tuple[float | None, bool]:
        """Seconds until the next delivery falls due (None: none within `within`
        seconds), and whether deliveries are due now yet unclaimed (waiting behind
        their row)."""
        rows = await self.run("next_due", {"listener_ids": list(listener_ids), "within": within})
        seconds, due_now = rows[0] if rows else (None, False)
        return (None if seconds is None else max(0.0, float(seconds))), bool(due_now)

    async def reserve_sends(self, seconds: Mapping[int, float]) -> dict[int, float] | None:
        """Reserves the next `seconds` of each rate-limited listener's sending for this
        relay (relay/pacing.py); returns in how many seconds each reservation ends,
        by listener (a removed listener has none), or None if nothing was reserved
        (one was removed as its first slots were being reserved)."""
        try:
            rows = await self.run("reserve_sends", {"ids": list(seconds),
                                                    "seconds": list(seconds.values())})
        except psycopg.errors.ForeignKeyViolation:
            return None
        return {listener_id: float(ends_in) for listener_id, ends_in in rows}
