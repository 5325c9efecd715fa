"""Backfill: 'read' events for rows that exist already.

``cdc-hooks backfill HOOK`` reads the hook's table in batches by key (keyset
pagination: each batch continues after the last key of the previous one, an
index range scan on a primary key) and queues each batch in the outbox in one
short transaction, in the shape the triggers write, with kind 'read'. The
relay expands them like inserts: the body is the usual one with
``"event": "read"`` and ``"created": false``. Where a backfill got to is
stored with each batch (cdc_hooks.backfills), so running the same command
again after an interruption resumes after the last row queued.

Listeners opt out with ``{"backfill": false}`` in their config (``listeners
add --no-backfill``); ``--listener ID`` sends a backfill to that listener only,
opted out or not (the operator asked for it).

``--where`` is the one place where SQL from outside is pasted into a
statement: it is trusted input from the operator, who runs this with their
own database role. It is checked first in a read-only transaction: it must
parse as a boolean condition over the table in two differently shaped
statements, so it cannot close the parenthesis and add clauses of its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from .db import Database, InstalledHook, sql_text
from .errors import CdcHooksError, NotFound
from .listeners import installed_hook

DEFAULT_BATCH = 1000


class BackfillError(CdcHooksError):
    exit_code = 2


@dataclass
class Backfill:
    id: int
    hook: InstalledHook
    condition: str | None
    listener_id: int | None
    last_key: list[str] | None
    rows_done: int
    resumed: bool


def start(db: Database, hook_name: str, condition: str | None = None,
          listener_id: int | None = None, *, restart: bool = False) -> Backfill:
    """Validates everything, then resumes the unfinished backfill of the same
    hook, condition and listener, or starts one."""
    hook = _table_hook(db, hook_name)
    if listener_id is not None:
        _check_listener(db, hook_name, listener_id)
    if condition is not None:
        validate_condition(db, hook, condition)
    found = db.backfill_find(hook.name, condition, listener_id)
    if found and (restart or tuple(found[1]) != hook.key_columns):  # the key changed: start over
        db.backfill_forget(found[0])
        found = None
    if found:
        return Backfill(found[0], hook, condition, listener_id, found[2], found[3], True)
    backfill_id = db.backfill_start(hook.name, condition, listener_id, hook.key_columns)
    return Backfill(backfill_id, hook, condition, listener_id, None, 0, False)


def _table_hook(db: Database, name: str) -> InstalledHook:
    try:
        hook = installed_hook(db, name)
    except CdcHooksError as exc:
        raise BackfillError(str(exc)) from None
    if hook.table_name is None:
        raise BackfillError(f'hook "{name}" is a custom hook: it has no table to backfill')
    return hook


def _check_listener(db: Database, hook: str, listener_id: int) -> None:
    listener = db.get_listener(listener_id)
    if listener is None:
        raise NotFound(f"no listener with id {listener_id}")
    if listener.hook != hook:
        raise BackfillError(f'listener {listener_id} listens to hook "{listener.hook}", not "{hook}"')
    if listener.state == "disabled":
        raise BackfillError(f"listener {listener_id} is disabled: resume it first "
                            "(cdc-hooks listeners resume)")


def validate_condition(db: Database, hook: InstalledHook, condition: str) -> None:
    """Raises BackfillError unless condition is a boolean expression over the table."""
    if not condition.strip():
        raise BackfillError("--where is empty")
    try:
        with db.transaction():
            db.run("read_only_transaction")
            db.run("probe_timeout")
            for name in ("probe_where", "probe"):
                db.fetch(_statement(name, hook, condition), {})
            raise psycopg.Rollback
    except psycopg.Error as exc:
        message = exc.diag.message_primary if exc.diag else None
        raise BackfillError(f"--where {condition!r}: {message or str(exc).strip()}") from None


def estimate(db: Database, backfill: Backfill) -> int:
    """The planner's estimate of the rows the whole backfill reads."""
    row = db.fetch(_statement("estimate", backfill.hook, backfill.condition), {})[0]
    plan = row[0][0]["Plan"] if isinstance(row[0], list) else {}
    return int(plan.get("Plan Rows", 0))


def batches(db: Database, backfill: Backfill, size: int = DEFAULT_BATCH) -> Iterator[int]:
    """Queues batch after batch, each in its own transaction with its progress;
    yields the rows of each. Interrupted, it leaves the backfill resumable."""
    first = _statement("batch", backfill.hook, backfill.condition, after=False)
    later = _statement("batch", backfill.hook, backfill.condition, after=True)
    params: dict[str, Any] = {"hook": backfill.hook.name, "batch": size,
                              "listener_id": backfill.listener_id}
    while True:
        after = backfill.last_key
        with db.transaction():
            key_params = {f"k{i}": v for i, v in enumerate(after or [])}
            rows, last = db.fetch(later if after else first, {**params, **key_params})[0]
            if rows:
                db.backfill_progress(backfill.id, last, rows)
                db.wake_relay()
            if rows < size:
                db.backfill_finish(backfill.id)
        backfill.last_key, backfill.rows_done = last or after, backfill.rows_done + rows
        if rows:
            yield rows
        if rows < size:
            return


def _statement(name: str, hook: InstalledHook, condition: str | None, *,
               after: bool = False) -> sql.Composed:
    key = [sql.Identifier(c) for c in hook.key_columns]
    captured = list(dict.fromkeys([*hook.key_columns, *hook.provides]))
    # The operator's condition, % doubled: statements run with parameters.
    where = sql.SQL(condition.replace("%", "%%")) if condition else sql.SQL("true")  # type: ignore[arg-type]
    fragments = {
        "table": sql.Identifier(hook.table_schema or "public", hook.table_name or ""),
        "condition": where,
        "key": sql.SQL(", ").join(key),
        "captured": sql.SQL(", ").join(sql.Identifier(c) for c in captured),
        "key_not_null": sql.SQL(" AND ").join(sql.SQL("{} IS NOT NULL").format(k) for k in key),
        "key_text": sql.SQL(", ").join(sql.SQL("{}::text").format(k) for k in key),
        "arrays": sql.SQL(", ").join(
            sql.SQL("{}::text, json_agg({} ORDER BY cdc_hooks_n)").format(
                sql.Literal(c), sql.Identifier(c)) for c in captured),
        "after": sql.SQL("AND ({}) > ({})").format(
            sql.SQL(", ").join(key),
            sql.SQL(", ").join(sql.Placeholder(f"k{i}") for i in range(len(key)))
        ) if after else sql.SQL(""),
    }
    return sql.SQL(_templates()[name]).format(**fragments)  # type: ignore[arg-type]


def _templates() -> dict[str, str]:
    text = sql_text("backfill.sql")
    parts = text.split("-- name: ")[1:]
    found = {}
    for part in parts:
        name, _, body = part.partition("\n")
        found[name.strip()] = body.strip().rstrip(";")
    return found
