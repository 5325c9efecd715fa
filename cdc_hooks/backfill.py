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
own database role. PostgreSQL's own parser (libpg_query, through pglast)
first checks that it is exactly one expression: an unbalanced parenthesis
(``id = 1) OR (true``), a second statement or an unterminated comment is
refused, so it cannot close the parenthesis around it and change what the
batch statement means. Then PostgreSQL checks, in a read-only transaction,
that it is a boolean condition over the table's columns.

A run is bounded however its condition behaves: a batch that reads a key at
or before the last one reached, or a run that queues more rows than the table
holds (counted at the start, and again when reached), stops with an error and
queues nothing of that batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pglast
import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

from .db import Database, query
from .errors import CdcHooksError, NotFound
from .rows import InstalledHook
from .services.listeners import installed_hook

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
    _refuse_foreign_casts(db)
    if listener_id is not None:
        _check_listener(db, hook_name, listener_id)
    if condition is not None:
        validate_condition(db, hook, condition)
    found = db.backfill_find(hook.name, condition, listener_id)
    if found and (restart or tuple(found.key_columns) != hook.key_columns):  # the key changed: start over
        db.backfill_forget(found.id)
        found = None
    if found:
        return Backfill(found.id, hook, condition, listener_id, found.last_key, found.rows_done, True)
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


def _refuse_foreign_casts(db: Database) -> None:
    """A backfill converts the table's columns to JSON with the operator's rights,
    and a cast to json runs its function: one another role wrote would run as the
    operator (the trigger runs it as the writer, who owns it). Refused unless
    the operator is a member of that role anyway."""
    found = db.rows("foreign_json_casts", row_type=tuple_row)
    if found:
        casts = ", ".join(f"{source} (cast function owned by {owner})" for source, owner in found)
        raise BackfillError(f"refusing to backfill as {db.current_user()}: converting values to "
                            f"JSON would run another role's code with your rights: {casts}; "
                            "run the backfill as that role, or drop the cast")


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
    """Raises BackfillError unless condition is one boolean expression over the table."""
    if not condition.strip():
        raise BackfillError("--where is empty")
    problem = _not_one_expression(condition)
    if problem:
        raise BackfillError(f"--where {condition!r}: {problem}")
    try:
        with db.transaction():
            db.run("read_only_transaction")
            db.run("probe_timeout")
            db.run(_statement("probe", hook, condition), {})
            raise psycopg.Rollback
    except psycopg.Error as exc:
        message = exc.diag.message_primary if exc.diag else None
        raise BackfillError(f"--where {condition!r}: {message or str(exc).strip()}") from None


_SELECT = "SELECT "


def _not_one_expression(condition: str) -> str | None:
    """Why condition is not exactly one SQL expression, or None: it is parsed as
    ``SELECT <condition>``, which must be one statement with one unnamed column and
    no clause (FROM, ORDER BY, UNION, ...) of its own."""
    try:
        statements = pglast.parse_sql(_SELECT + condition)
    except pglast.parser.ParseError as exc:
        message, index = exc.args[0], exc.args[1] - len(_SELECT)
        return f"not one SQL condition: {message} (at character {index + 1})"
    if len(statements) != 1 or statements[0].stmt_len:  # a length: the text goes on after a ;
        return "not one SQL condition: it holds a statement separator (;)"
    select = statements[0].stmt
    columns: Sequence[Any] = getattr(select, "targetList", None) or ()
    if len(columns) != 1 or columns[0].name is not None or _clauses(select) != _clauses(
            pglast.parse_sql(_SELECT + "true")[0].stmt):
        return "not one SQL condition: it adds clauses of its own"
    return None


def _clauses(select: Any) -> dict[str, Any]:
    return {k: v for k, v in select(skip_none=True).items() if k != "targetList"}


def _row_count(db: Database, backfill: Backfill) -> int:
    return int(db.value(_statement("count", backfill.hook, None), {}))


def estimate(db: Database, backfill: Backfill) -> int:
    """The planner's estimate of the rows the whole backfill reads."""
    explained = db.value(_statement("estimate", backfill.hook, backfill.condition), {})
    plan = explained[0]["Plan"] if isinstance(explained, list) else {}
    return int(plan.get("Plan Rows", 0))


def batches(db: Database, backfill: Backfill, size: int = DEFAULT_BATCH) -> Iterator[int]:
    """Queues batch after batch, each in its own transaction with its progress;
    yields the rows of each. Interrupted, it leaves the backfill resumable."""
    first = _statement("batch", backfill.hook, backfill.condition, after=False)
    later = _statement("batch", backfill.hook, backfill.condition, after=True)
    params: dict[str, Any] = {"hook": backfill.hook.name, "batch": size,
                              "listener_id": backfill.listener_id}
    table_rows, run_rows = _row_count(db, backfill), 0
    while True:
        after = backfill.last_key
        with db.transaction():
            # Another role's row-level security policy on the table would run its
            # code with the operator's rights: such a table's read fails instead.
            db.run("row_security_off")
            key_params = {f"k{i}": v for i, v in enumerate(after or [])}
            try:
                rows, last, revisited = db.row(later if after else first, {**params, **key_params},
                                               row_type=tuple_row)  # type: ignore[misc]
            except psycopg.errors.InsufficientPrivilege as exc:
                raise BackfillError(f"backfill {backfill.id}: {exc.diag.message_primary} (its "
                                    "policies would run with your rights: run the backfill as "
                                    "the table's owner or a role that bypasses them)") from None
            if revisited:  # raised inside the transaction: nothing of this batch is queued
                raise BackfillError(f"backfill {backfill.id} stopped: a batch read {revisited} rows "
                                    f"at or before the last key reached ({', '.join(after or [])})")
            run_rows += rows
            if run_rows > table_rows:  # inserts since the start may account for it: count again
                table_rows = max(table_rows, _row_count(db, backfill))
                if run_rows > table_rows:
                    raise BackfillError(f"backfill {backfill.id} stopped: this run read {run_rows} "
                                        f"rows, more than the table holds ({table_rows})")
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
    table = sql.Identifier(hook.table_schema or "public", hook.table_name or "")
    captured = list(dict.fromkeys([*hook.key_columns, *hook.provides]))
    # The operator's condition, % doubled: statements run with parameters.
    where = sql.SQL(condition.replace("%", "%%")) if condition else sql.SQL("true")
    last_key = sql.SQL(", ").join(sql.Placeholder(f"k{i}") for i in range(len(key)))
    fragments = {
        "table": table,
        "table_name": sql.Literal(table.as_string()),
        "condition": where,
        "key": sql.SQL(", ").join(key),
        "captured": sql.SQL(", ").join(sql.Identifier(c) for c in captured),
        "key_not_null": sql.SQL(" AND ").join(sql.SQL("{} IS NOT NULL").format(k) for k in key),
        "key_text": sql.SQL(", ").join(sql.SQL("{}::text").format(k) for k in key),
        "arrays": sql.SQL(", ").join(
            sql.SQL("{}::text, json_agg({} ORDER BY cdc_hooks_n)").format(
                sql.Literal(c), sql.Identifier(c)) for c in captured),
        "after": sql.SQL("AND ({}) > ({})").format(
            sql.SQL(", ").join(key), last_key) if after else sql.SQL(""),
        "revisited": sql.SQL("({}) <= ({})").format(
            sql.SQL(", ").join(key), last_key) if after else sql.SQL("false"),
    }
    return query(name, "backfill.sql").format(**fragments)
