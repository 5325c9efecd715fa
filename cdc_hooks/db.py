"""All database access: named queries from sql/, migrations, and the two stores.

``Database`` (synchronous) serves install, the CLI, the Python API and the web
interface; ``RelayStore`` (asynchronous) serves the relay's hot loop. Both run
only the named queries of sql/queries.sql and the files of sql/migrations.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any

import psycopg
from psycopg import sql

from . import capturing, jsoncodec
from .capturing import HookCapture
from .dsn import check_dsn, connect_error, describe_dsn
from .errors import DatabaseUnavailable
from .urls import redact_url

SCHEMA = "cdc_hooks"
_QUERY_HEADER = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def sql_text(name: str) -> str:
    """The text of a file in sql/ (shipped as package data)."""
    return resources.files("cdc_hooks.sql").joinpath(name).read_text(encoding="utf-8")


@functools.cache
def queries() -> dict[str, str]:
    """The named queries of sql/queries.sql."""
    text = sql_text("queries.sql")
    parts = _QUERY_HEADER.split(text)
    return {name: body.strip().rstrip(";") for name, body in zip(parts[1::2], parts[2::2], strict=True)}


def query(name: str) -> sql.SQL:
    return sql.SQL(queries()[name])  # type: ignore[arg-type]


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


def connect(dsn: str | None, *, autocommit: bool = True) -> psycopg.Connection[Any]:
    if not dsn:
        raise DatabaseUnavailable(
            "no database configured: set [database] dsn in the config or CDC_HOOKS_DSN"
        )
    check_dsn(dsn)
    try:
        return psycopg.connect(dsn, **session_options(autocommit=autocommit))
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(
            f"cannot connect to PostgreSQL at {describe_dsn(dsn)}: {connect_error(dsn, exc)}"
        ) from None


def disabled_event(row: Sequence[Any]) -> dict[str, Any]:
    """The cdc_hooks.listener_disabled payload of a disabled listener's (id, hook,
    url, reason): other receivers get its URL without credentials."""
    listener_id, hook, url, reason = row
    return {"id": listener_id, "hook": hook, "url": redact_url(url), "reason": reason}


@dataclass(frozen=True)
class InstalledHook:
    name: str
    table_schema: str | None
    table_name: str | None
    events: tuple[str, ...]
    provides: tuple[str, ...]
    key_columns: tuple[str, ...]
    when_changed: tuple[str, ...]
    senders: tuple[str, ...] = ()  # custom hooks: roles allowed to send it

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> InstalledHook:
        """From a row of the installed_hooks query."""
        name, schema, table, *arrays = row
        return cls(name, schema, table, *(tuple(a) for a in arrays))

    def params(self) -> dict[str, Any]:
        """The save_hook query's parameters."""
        return {"name": self.name, "table_schema": self.table_schema, "table_name": self.table_name,
                "events": list(self.events), "provides": list(self.provides),
                "key_columns": list(self.key_columns), "when_changed": list(self.when_changed),
                "senders": list(self.senders)}


@dataclass(frozen=True)
class ListenerRow:
    id: int
    hook: str
    url: str
    match: str
    state: str
    disabled_reason: str | None
    created_at: datetime
    updated_at: datetime
    backfill: bool  # takes backfill ('read') events (config {"backfill": false} opts out)
    header_names: list[str]  # its own headers' names: their values are never listed
    overlap_until: datetime | None  # the replaced secret also signs until then
    events: list[str] | None = None  # event kinds it takes (None: every event of its hook)
    changed: list[str] | None = None  # updates only if one of these columns changed
    last_status: str | None = None
    last_code: int | None = None
    last_error: str | None = None
    last_finished_at: datetime | None = None


class Database:
    """A synchronous session with the database: one autocommit connection;
    ``transaction()`` groups statements that must land together."""

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

    def run(self, name: str, params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        with self.conn.cursor() as cur:
            cur.execute(query(name), params)
            return cur.fetchall() if cur.description else []

    def one(self, name: str, params: dict[str, Any] | None = None) -> tuple[Any, ...] | None:
        rows = self.run(name, params)
        return rows[0] if rows else None

    def execute(self, statement: sql.Composable) -> None:
        self.conn.execute(statement)

    # Schema -------------------------------------------------------------

    def schema_exists(self) -> bool:
        return bool(self.one("schema_exists")[0])  # type: ignore[index]

    def schema_version(self) -> int:
        if not self.schema_exists():
            return 0
        return int(self.one("schema_version")[0])  # type: ignore[index]

    def pending_migrations(self) -> list[tuple[int, str]]:
        current = self.schema_version()
        return [(v, text) for v, text in migrations() if v > current]

    def migrate(self) -> list[int]:
        """Brings the cdc_hooks schema to the newest version; call inside a transaction."""
        self.run("lock_install")
        pending = self.pending_migrations()
        if pending and not self.schema_exists():
            self.execute(sql.SQL(sql_text("bootstrap.sql")))  # type: ignore[arg-type]
        for version, text in pending:
            self.execute(sql.SQL(text))  # type: ignore[arg-type]
            self.run("record_schema_version", {"version": version})
        return [v for v, _ in pending]

    # Hooks --------------------------------------------------------------

    def installed_hooks(self) -> list[InstalledHook]:
        if not self.schema_exists():
            return []
        return [InstalledHook.from_row(r) for r in self.run("installed_hooks")]

    def save_hook(self, hook: InstalledHook) -> None:
        self.run("save_hook", hook.params())

    def current_user(self) -> str:
        return str(self.one("current_user")[0])  # type: ignore[index]

    def missing_roles(self, roles: Iterable[str]) -> list[str]:
        return [r[0] for r in self.run("missing_roles", {"roles": list(roles)})]

    def grant_relay(self, role: str) -> None:
        self.execute(query("grant_relay").format(role=sql.Identifier(role)))

    def forget_hook(self, name: str) -> None:
        self.run("forget_hook", {"name": name})

    def table_triggers(self, schema: str, table: str) -> list[str]:
        return [r[0] for r in self.run("table_triggers", {"schema": schema, "table": table})]

    def table_partitions(self, schema: str, table: str) -> list[tuple[str, str]]:
        return [(r[0], r[1]) for r in self.run("table_partitions", {"schema": schema, "table": table})]

    def table_columns(self, schema: str, table: str) -> list[str] | None:
        row = self.one("table_columns", {"schema": schema, "table": table})
        return list(row[0]) if row and row[0] is not None else None

    def function_comment(self, function: str) -> str | None:
        row = self.one("function_comment", {"function": function})
        return row[0] if row else None

    def function_exists(self, function: str) -> bool:
        return bool(self.one("function_exists", {"function": function})[0])  # type: ignore[index]

    def pending_counts(self) -> tuple[int, int]:
        row = self.one("pending_counts")
        return int(row[0]), int(row[1])  # type: ignore[index]

    def send(self, hook: str, payload_json: str) -> int:
        return int(self.one("send", {"hook": hook, "payload": payload_json})[0])  # type: ignore[index]

    # Listeners ----------------------------------------------------------

    def add_listener(self, hook: str, url: str, match_json: str, config_json: str,
                     secret: str, headers_json: str = "{}", events: list[str] | None = None,
                     changed: list[str] | None = None) -> int:
        row = self.one("add_listener", {"hook": hook, "url": url, "match": match_json,
                                        "config": config_json, "secret": secret,
                                        "headers": headers_json, "events": events,
                                        "changed": changed})
        return int(row[0])  # type: ignore[index]

    def list_listeners(self) -> list[ListenerRow]:
        return [ListenerRow(*r) for r in self.run("list_listeners")]

    def get_listener(self, listener_id: int) -> ListenerRow | None:
        row = self.one("get_listener", {"id": listener_id})
        return ListenerRow(*row) if row else None

    def remove_listener(self, listener_id: int) -> bool:
        with self.transaction():
            self.run("remove_listener_deliveries", {"id": listener_id})
            return self.one("remove_listener", {"id": listener_id}) is not None

    def set_listener_state(self, listener_id: int, state: str, reason: str | None = None) -> bool:
        return self.one("set_listener_state",
                        {"id": listener_id, "state": state, "reason": reason}) is not None

    def update_listener(self, listener_id: int, *, url: str | None = None,
                        match_json: str | None = None, secret: str | None = None,
                        overlap: float = 0.0, headers_json: str | None = None,
                        backfill: bool | None = None, events: list[str] | None = None,
                        changed: list[str] | None = None) -> bool:
        """events/changed: None keeps them, [] resets them to their default."""
        return self.one("update_listener", {
            "id": listener_id, "url": url, "match": match_json, "secret": secret,
            "overlap": overlap, "headers": headers_json, "backfill": backfill,
            "events": events, "changed": changed}) is not None

    # Deliveries ---------------------------------------------------------

    def list_deliveries(self, *, status: str | None = None, listener_id: int | None = None,
                        since: datetime | None = None, limit: int = 50) -> list[tuple[Any, ...]]:
        return self.run("list_deliveries", {"status": status, "listener_id": listener_id,
                                            "since": since, "limit": limit})

    def delivery_attempts(self, delivery_id: int) -> list[tuple[Any, ...]]:
        return self.run("delivery_attempts", {"id": delivery_id})

    def redeliver(self, *, delivery_id: int | None = None, listener_id: int | None = None,
                  since: datetime | None = None, only_dead: bool = True) -> list[int]:
        rows = self.run("redeliver", {"id": delivery_id, "listener_id": listener_id,
                                      "since": since, "only_dead": only_dead})
        return [r[0] for r in rows]

    def status(self, minutes: int = 5) -> dict[str, Any]:
        with self.conn.cursor() as cur:
            cur.execute(query("status"), {"minutes": minutes})
            row = cur.fetchone()
            names = [d.name for d in cur.description]  # type: ignore[union-attr]
        return dict(zip(names, row, strict=True))  # type: ignore[arg-type]

    def failing_listeners(self) -> list[tuple[Any, ...]]:
        return self.run("failing_listeners")

    def held_listeners(self) -> list[tuple[Any, ...]]:
        """(id, hook, url, state, reason) of each listener paused or disabled."""
        return self.run("held_listeners")

    def hooks_capturing(self) -> list[HookCapture]:
        """Whether each table hook's triggers are in place (capturing.py)."""
        return capturing.from_rows(self.run("hooks_capturing")) if self.schema_exists() else []

    # Web ----------------------------------------------------------------
    # Read-only views of the web interface and REST API (cdc_hooks/web).

    def web_hook_activity(self) -> list[tuple[Any, ...]]:
        """(hook, listeners, delivered in the last hour) per installed hook."""
        return self.run("web_hook_activity") if self.schema_exists() else []

    def web_listener_stats(self, listener_id: int | None = None) -> list[tuple[Any, ...]]:
        """(id, delivered, dead, retrying, queued) over each listener's last 1000 deliveries."""
        return self.run("web_listener_stats", {"id": listener_id})

    def web_deliveries(self, *, status: str | None = None, listener_id: int | None = None,
                       hook: str | None = None, since: datetime | None = None,
                       until: datetime | None = None, before: int | None = None,
                       limit: int = 50) -> list[tuple[Any, ...]]:
        return self.run("web_deliveries", {
            "status": status, "listener_id": listener_id, "hook": hook, "since": since,
            "until": until, "before": before, "limit": limit,
        })

    def web_delivery(self, delivery_id: int) -> tuple[Any, ...] | None:
        return self.one("web_delivery", {"id": delivery_id})

    def web_recent_events(self, hook: str, limit: int = 10) -> list[tuple[Any, ...]]:
        return self.run("web_recent_events", {"hook": hook, "limit": limit})

    def web_timeline(self, minutes: int = 60) -> list[tuple[Any, ...]]:
        """(minute, delivered, failed attempts) for each of the last `minutes` minutes."""
        return self.run("web_timeline", {"minutes": minutes})

    # Web sessions (cdc_hooks/web/sessions.py) ----------------------------

    def web_session(self, id_hash: bytes, login: str) -> tuple[Any, ...] | None:
        """(csrf, flash) of a live session logged in with this token's tag, else None."""
        return self.one("web_session", {"id_hash": id_hash, "login": login})

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

    def metrics_backlog(self) -> list[tuple[Any, ...]]:
        """Per listener (id, hook, state, pending, outbox rows, oldest outbox age s,
        oldest pending age s); one row of NULL listener columns if there are none."""
        return self.run("metrics_backlog")

    # Operations: retention, listener health, backfill --------------------
    # (cdc_hooks/retention.py, health.py, backfill.py; schema version 2)

    def fetch(self, statement: sql.Composable,
              params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        """Rows of a statement composed from a template of sql/ (backfill.sql)."""
        with self.conn.cursor() as cur:
            cur.execute(statement, params)
            return cur.fetchall() if cur.description else []

    def try_lock_maintenance(self) -> bool:
        return bool(self.one("try_lock_maintenance")[0])  # type: ignore[index]

    def unlock_maintenance(self) -> None:
        self.run("unlock_maintenance")

    def listener_ids(self) -> list[int]:
        return [r[0] for r in self.run("listener_ids")]

    def prune_deliveries(self, listener_id: int, status: str, seconds: float, batch: int) -> int:
        row = self.one("prune_deliveries", {"listener_id": listener_id, "status": status,
                                            "seconds": seconds, "batch": batch})
        return int(row[0])  # type: ignore[index]

    def prune_attempts(self, seconds: float, batch: int) -> int:
        return int(self.one("prune_attempts", {"seconds": seconds, "batch": batch})[0])  # type: ignore[index]

    def prune_events(self, after: int, seconds: float, batch: int) -> tuple[int | None, int, int]:
        """(last id scanned, events deleted, old events scanned) of one window."""
        row = self.one("prune_events", {"after": after, "seconds": seconds, "batch": batch})
        return row[0], int(row[1]), int(row[2])  # type: ignore[index]

    def check_listener_health(self) -> None:
        with self.transaction():
            self.run("forget_listener_health")
            self.run("check_listener_health")

    def disable_failing_listeners(self, seconds: float, reason: str) -> list[tuple[Any, ...]]:
        """(id, hook, url as shown, reason, event id or None) of each listener disabled,
        with its cdc_hooks.listener_disabled event."""
        with self.transaction():
            rows = sorted(self.run("disable_failing_listeners",
                                   {"seconds": seconds, "reason": reason}))
            disabled = []
            for row in rows:
                event = disabled_event(row)
                sent = self.one("send_listener_disabled", event)
                disabled.append((row[0], row[1], event["url"], row[3], sent[0] if sent else None))
            return disabled

    def resume_listener_deliveries(self, listener_id: int) -> None:
        self.run("resume_listener_deliveries", {"id": listener_id})

    def wake_relay(self) -> None:
        self.run("wake_relay")

    def autovacuum_on(self) -> bool:
        return bool(self.one("autovacuum_on")[0])  # type: ignore[index]

    def backfill_find(self, hook: str, condition: str | None,
                      listener_id: int | None) -> tuple[Any, ...] | None:
        """(id, key_columns, last_key, rows_done) of the unfinished backfill, if any."""
        return self.one("backfill_find", {"hook": hook, "condition": condition,
                                          "listener_id": listener_id})

    def backfill_start(self, hook: str, condition: str | None, listener_id: int | None,
                       key_columns: Sequence[str]) -> int:
        row = self.one("backfill_start", {"hook": hook, "condition": condition,
                                          "listener_id": listener_id,
                                          "key_columns": list(key_columns)})
        return int(row[0])  # type: ignore[index]

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
        claim and per batch. Set here, not as the startup parameter "options", which
        PgBouncer refuses."""
        await self.run("relay_session_settings")

    async def close(self) -> None:
        await self.conn.close()

    async def run(self, name: str, params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        async with self.conn.cursor() as cur:
            await cur.execute(query(name), params)
            return await cur.fetchall() if cur.description else []

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
                                lease: float) -> list[tuple[Any, ...]]:
        """Inserts deliveries (event_id, listener_id, row_key, direct, first: the first
        of its row and listener in the batch); returns (id, event_id, listener_id,
        attempt) of those leased to this relay."""
        rows = await self.run("insert_deliveries", {
            "deliveries": jsoncodec.dumps_rows(deliveries), "lease": lease})
        return [r for r in rows if r[3] == 1]

    async def refresh_statistics(self, min_changes: int) -> None:
        """ANALYZE the deliveries table if its statistics are far behind (see the query)."""
        if (await self.run("deliveries_statistics_stale", {"min_changes": min_changes}))[0][0]:
            await self.run("analyze_deliveries")

    async def outbox_nonempty(self) -> bool:
        return bool((await self.run("outbox_nonempty"))[0][0])

    async def claim_deliveries(self, slots: dict[int, int], total: int,
                               lease: float) -> list[tuple[Any, ...]]:
        return await self.run("claim_deliveries", {
            "listener_ids": list(slots), "slots": list(slots.values()), "total": total,
            "lease": lease,
        })

    async def record_results(self, results: Sequence[Any]) -> None:
        rows = [[r.delivery_id, r.attempt, r.status, r.retry_in, r.code, r.error,
                 r.duration_ms, r.response] for r in results]
        await self.run("record_results", {"results": jsoncodec.dumps_rows(rows)})

    async def renew_leases(self, deliveries: Sequence[tuple[int, int]], lease: float) -> None:
        """(id, attempt) of deliveries still held by this relay: leased `lease` s more."""
        await self.run("renew_leases", {"ids": [d for d, _ in deliveries],
                                        "attempts": [a for _, a in deliveries], "lease": lease})

    async def release_deliveries(self, ids: Sequence[int]) -> None:
        await self.run("release_deliveries", {"ids": list(ids)})

    async def disable_listener(self, listener_id: int, reason: str) -> None:
        async with self.conn.transaction():
            for row in await self.run("disable_listener_gone", {"id": listener_id, "reason": reason}):
                await self.run("send_listener_disabled", disabled_event(row))

    async def seconds_until_due(self, listener_ids: Sequence[int],
                                within: float) -> tuple[float | None, bool]:
        """Seconds until the next delivery falls due (None: none within `within`
        seconds), and whether deliveries are due now yet unclaimed (waiting behind
        their row)."""
        rows = await self.run("next_due", {"listener_ids": list(listener_ids), "within": within})
        seconds, due_now = rows[0] if rows else (None, False)
        return (None if seconds is None else max(0.0, float(seconds))), bool(due_now)
