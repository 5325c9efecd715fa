"""Install: bring the database in line with the config, in one transaction.

Resolves each hook against the live table (SQLAlchemy's inspector), creates or
upgrades the cdc_hooks schema, and (re)creates the capture function and the
statement-level triggers of every hook that is new or changed.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg
import sqlalchemy
from psycopg import sql

from . import jsoncodec
from .config import Config, HookConfig, TableName
from .db import Database, connect, migrations, queries, query, sql_text
from .errors import ConfigError
from .rows import InstalledHook

TRIGGER_EVENTS = {
    "insert": ("INSERT", "REFERENCING NEW TABLE AS new_rows"),
    "update": ("UPDATE", "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows"),
    "delete": ("DELETE", "REFERENCING OLD TABLE AS old_rows"),
    "truncate": ("TRUNCATE", ""),  # statement-level: no transition tables, one event
}


# cdc-hooks' own custom hooks, installed with every config (names are
# reserved: config.BUILTIN_PREFIX). Listeners subscribe to them like any hook.
BUILTIN_HOOKS = (
    # Sent when a listener is disabled (410 Gone, or failing too long: health.py).
    InstalledHook("cdc_hooks.listener_disabled", None, None, (),
                  ("listener_id", "hook", "url", "reason"), (), ()),
)


# The event trigger of [database] repair_triggers (sql/migrations/0007_repair_triggers.sql).
REPAIR_TRIGGER = "cdc_hooks_repair_triggers"


def function_name(hook: str) -> str:
    return f"capture_{hook}"


def trigger_name(hook: str, event: str) -> str:
    return f"cdc_hooks_{hook}_{event}"


@dataclass
class Plan:
    """What install would do: human-readable changes and the SQL to run."""

    changes: list[str] = field(default_factory=list)
    migrations: list[int] = field(default_factory=list)
    statements: list[sql.SQL | sql.Composed] = field(default_factory=list)
    hooks_to_save: list[InstalledHook] = field(default_factory=list)
    hooks_to_forget: list[str] = field(default_factory=list)
    # Listeners the change leaves unable to match (install --force): paused, with why.
    listeners_to_pause: list[Stranded] = field(default_factory=list)


@dataclass(frozen=True)
class Stranded:
    """A listener a config change leaves unable to receive what it asked for."""

    listener_id: int
    hook: str
    why: str

    @property
    def reason(self) -> str:
        """Its disabled_reason once paused (shown by listeners list, status and the web)."""
        return f"paused by install: {self.why}"


def resolve_hooks(config: Config) -> list[InstalledHook]:
    """Each hook of the config made concrete against the live tables.

    Raises ConfigError listing every problem, one line per hook.
    """
    engine = sqlalchemy.create_engine(
        "postgresql+psycopg://", creator=lambda: connect(config.dsn),
        poolclass=sqlalchemy.pool.NullPool,
    )
    resolved, problems = [], []
    try:
        with engine.connect() as connection, _quiet_inspector():
            inspector = sqlalchemy.inspect(connection)
            for hook in config.hooks:
                try:
                    resolved.append(_resolve_hook(hook, inspector))
                except ConfigError as exc:
                    problems.append(str(exc))
    except sqlalchemy.exc.DBAPIError as exc:
        # PostgreSQL's own error, as every other statement raises it (the CLI prints it).
        if isinstance(exc.orig, psycopg.Error):
            raise exc.orig from None
        raise
    finally:
        engine.dispose()
    if problems:
        raise ConfigError("\n".join(problems))
    return [*resolved, *BUILTIN_HOOKS]


@contextmanager
def _quiet_inspector() -> Iterator[None]:
    """Without SQLAlchemy's warning about column types it has no class for (point,
    xml, ...): install only needs the columns' names, and a user's terminal no
    library warnings."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"Did not recognize type ",
                                category=sqlalchemy.exc.SAWarning)
        yield


def _resolve_hook(hook: HookConfig, inspector: sqlalchemy.Inspector) -> InstalledHook:
    where = hook.where
    if hook.table is None:
        return InstalledHook(hook.name, None, None, (), hook.provides or (), (), (), hook.senders)
    table = hook.table
    if not inspector.has_table(table.name, schema=table.schema):
        raise ConfigError(f"{where}: table {table} does not exist")
    kind = _not_a_table(inspector, hook.table)
    if kind:
        raise ConfigError(f"{where}: {table} is a {kind}, not a table: its triggers cannot "
                          "see changed rows (hook the tables it reads)")
    columns = [c["name"] for c in inspector.get_columns(table.name, schema=table.schema)]
    key = hook.key or tuple(
        inspector.get_pk_constraint(table.name, schema=table.schema)["constrained_columns"]
    )
    if not key:
        raise ConfigError(
            f"{where}: table {table} has no primary key; "
            "name the columns that identify a row with key = [...]"
        )
    provides = hook.provides if hook.provides is not None else tuple(
        c for c in columns if c not in key
    )
    for kind, names in (("key", key), ("provided", provides), ("when_changed", hook.when_changed or ())):
        for column in names:
            if column not in columns:
                raise ConfigError(f'{where}: {kind} column "{column}" does not exist in {table}')
    connection = inspector.bind
    assert isinstance(connection, sqlalchemy.Connection)  # resolve_hooks inspects a connection
    _check_key_is_unique(where, table, key, connection)
    return InstalledHook(hook.name, table.schema, table.name, hook.events, provides, key,
                         hook.when_changed or provides)


def _check_key_is_unique(where: str, table: TableName, key: tuple[str, ...],
                         connection: sqlalchemy.Connection) -> None:
    """The key must identify one row: a primary key, unique constraint or unique
    index on the key columns (or some of them), each NOT NULL or the index NULLS
    NOT DISTINCT. Two rows with one key would share a per-row order, and a
    backfill, which pages by key, would queue only one of them."""
    indexes = connection.exec_driver_sql(
        queries()["unique_keys"], {"schema": table.schema, "table": table.name}).all()
    within_key = [(index, columns, not_null or nulls_not_distinct)
                  for index, columns, not_null, nulls_not_distinct in indexes
                  if set(columns) <= set(key)]
    if any(unique for _, _, unique in within_key):
        return
    columns = ", ".join(key)
    nullable = [f'unique index "{index}" ({", ".join(cols)}) lets rows with NULLs in it repeat'
                for index, cols, _ in within_key]
    why = "; ".join(nullable) if nullable else (
        "no primary key, unique constraint or unique index is on these columns (or some of them)")
    raise ConfigError(
        f"{where}: key ({columns}) does not identify a row of {table}: {why}. Rows sharing a key "
        "would have no defined order and a backfill would skip all but one; add a unique "
        f"constraint on NOT NULL columns (ALTER TABLE {table} ADD UNIQUE ({columns})), or a "
        "unique index NULLS NOT DISTINCT, or name key columns that have one")


def _not_a_table(inspector: sqlalchemy.Inspector, table: TableName) -> str | None:
    """'view', 'materialized view' or 'foreign table' if the relation is one (has_table says yes)."""
    kinds = (("view", inspector.get_view_names), ("materialized view",
             inspector.get_materialized_view_names))
    for kind, names in kinds:
        if table.name in names(schema=table.schema):
            return kind
    foreign = getattr(inspector, "get_foreign_table_names", None)  # PostgreSQL's inspector
    if foreign is not None and table.name in foreign(schema=table.schema):
        return "foreign table"
    return None


def plan_install(db: Database, desired: list[InstalledHook], *, force: bool = False,
                 repair_triggers: bool = False) -> Plan:
    """What install would do. Refuses (ConfigError) a change that strands
    listeners unless force, and repair_triggers without a superuser."""
    _check_roles(db, desired)
    plan = Plan()
    current_version = db.schema_version()
    plan.migrations = [v for v, _ in migrations() if v > current_version]
    if plan.migrations:
        verb = "create" if current_version == 0 else f"upgrade from version {current_version}"
        plan.changes.append(f"schema cdc_hooks: {verb} to version {plan.migrations[-1]}")
    installed = {h.name: h for h in db.installed_hooks()}
    wanted = {h.name for h in desired}
    for hook in desired:
        before = installed.get(hook.name)
        if before == hook and _in_place(db, hook):
            continue
        if before is not None and before.table_name and before != hook:
            plan.statements.extend(_drop_statements(db, before))
        plan.statements.extend(_create_statements(db, hook))
        plan.hooks_to_save.append(hook)
        if hook not in BUILTIN_HOOKS:  # bookkeeping the user did not ask for
            plan.changes.append(("~ " if before else "+ ") + describe_hook(hook))
    for name, before in installed.items():
        if name not in wanted:
            plan.statements.extend(_drop_statements(db, before))
            plan.hooks_to_forget.append(name)
            plan.changes.append(f"- {name}: removed")
    _plan_stranded_listeners(db, plan, installed, desired, force)
    _plan_repair_trigger(db, plan, repair_triggers)
    return plan


def _plan_stranded_listeners(db: Database, plan: Plan, installed: dict[str, InstalledHook],
                             desired: list[InstalledHook], force: bool) -> None:
    """Listeners whose hook is removed, no longer provides a field their match
    names, or no longer captures an event it did: install refuses, naming each,
    or with force pauses them with the reason (they would never match again,
    silently)."""
    stranded = _stranded_listeners(db, installed, {h.name: h for h in desired})
    if stranded and not force:
        raise ConfigError("\n".join([
            "install would leave listeners unable to receive what they ask for; nothing changed:",
            *(f'listener {s.listener_id} of hook "{s.hook}": {s.why}' for s in stranded),
            "change or remove them first, or run install --force to pause them (the reason is "
            "shown by listeners list, status and the web)"]))
    plan.listeners_to_pause = stranded
    plan.changes += [f"! listener {s.listener_id} paused: {s.why}" for s in stranded]


def _plan_repair_trigger(db: Database, plan: Plan, wanted: bool) -> None:
    """[database] repair_triggers: the event trigger that puts a hook's triggers
    back when its table is created again (migration 0007), created or dropped as
    the config says. Either is a superuser's right: refused, naming it, without."""
    present = bool(db.value("repair_trigger_exists"))
    if wanted == present:
        return
    if not db.value("is_superuser"):
        role = db.value("current_role")
        verb, other = ("creating", "false") if wanted else ("dropping", "true")
        raise ConfigError(
            f"[database] repair_triggers = {str(wanted).lower()}: {verb} the event trigger "
            f'{REPAIR_TRIGGER} needs a superuser, and role "{role}" is not one (PostgreSQL lets '
            f"only superusers create and own event triggers); run install as a superuser, or set "
            f"repair_triggers = {other}")
    plan.statements.append(query("create_repair_trigger" if wanted else "drop_repair_trigger"))
    plan.changes.append(f"+ {REPAIR_TRIGGER}: re-creates a hook's triggers when its table is "
                        "created again" if wanted else f"- {REPAIR_TRIGGER}: removed")


def _stranded_listeners(db: Database, installed: dict[str, InstalledHook],
                        wanted: dict[str, InstalledHook]) -> list[Stranded]:
    """Active and paused listeners of installed hooks that the wanted hooks strand
    (disabled ones get nothing anyway, and resuming one checks its match again)."""
    if not installed:
        return []
    stranded = []
    for listener in db.hook_listeners():
        hook = listener.hook
        before, after = installed.get(hook), wanted.get(hook)
        if before is None or listener.state == "disabled":
            continue
        if after is None:
            whys = [f'hook "{hook}" is removed from the config']
        else:
            whys = [f'match field "{f}" is no longer provided (provides: '
                    f'{", ".join(after.provides) or "nothing"})'
                    for f in jsoncodec.loads(listener.match) if f not in after.provides]
            whys += [f'event "{e}" is no longer captured (events: {", ".join(after.events)})'
                     for e in before.events if e not in after.events]
        if whys:
            stranded.append(Stranded(listener.id, hook, "; ".join(whys)))
    return stranded


def _check_roles(db: Database, hooks: list[InstalledHook]) -> None:
    problems = [f'hook "{h.name}": sender role "{role}" does not exist'
                for h in hooks for role in db.missing_roles(h.senders)]
    if problems:
        raise ConfigError("\n".join(problems))


def describe_hook(hook: InstalledHook) -> str:
    if hook.table_name is None:
        return f"{hook.name}: custom hook providing {', '.join(hook.provides)}"
    table = f"{hook.table_schema}.{hook.table_name}"
    return (f"{hook.name}: {', '.join(hook.events)} on {table} providing "
            f"{', '.join(hook.provides) or '(no columns)'}")


def _in_place(db: Database, hook: InstalledHook) -> bool:
    """True if the hook's triggers exist and its function is this version's: a newer
    cdc-hooks whose capture template changed replaces the functions of every hook."""
    return not _missing_triggers(db, hook) and (
        hook.table_name is None
        or db.function_comment(function_name(hook.name)) == _fingerprint(hook))


def _fingerprint(hook: InstalledHook) -> str:
    """Names the template and columns a capture function was generated from."""
    source = sql_text("capture_function.sql") + "\0" + "\0".join(_captured(hook))
    return "cdc-hooks capture " + hashlib.sha256(source.encode()).hexdigest()[:16]


def _captured(hook: InstalledHook) -> list[str]:
    return list(dict.fromkeys([*hook.key_columns, *hook.provides]))


def _tables(db: Database, hook: InstalledHook) -> list[tuple[str, str]]:
    """The hook's table and, if it is partitioned, every partition below it:
    a statement-level trigger fires only for the table a statement names, and
    applications may write to a partition directly."""
    if hook.table_name is None:
        return []
    schema = hook.table_schema or "public"
    if db.table_columns(schema, hook.table_name) is None:
        return []
    return [(schema, hook.table_name), *db.table_partitions(schema, hook.table_name)]


def _missing_triggers(db: Database, hook: InstalledHook) -> list[str]:
    """'trigger X on TABLE' for each expected trigger that does not exist."""
    missing = []
    for schema, table in _tables(db, hook):
        present = set(db.table_triggers(schema, table))
        missing += [f"trigger {trigger_name(hook.name, e)} on {schema}.{table}"
                    for e in hook.events if trigger_name(hook.name, e) not in present]
    return missing


def _create_statements(db: Database, hook: InstalledHook) -> list[sql.SQL | sql.Composed]:
    if hook.table_name is None:
        return []
    captured = _captured(hook)
    function = sql.Identifier("cdc_hooks", function_name(hook.name))
    statements: list[sql.SQL | sql.Composed] = [
        sql.SQL(sql_text("capture_function.sql")).format(
            function=function, hook=sql.Literal(hook.name), **_capture_fragments(captured)),
        sql.SQL("COMMENT ON FUNCTION {}() IS {}").format(function, sql.Literal(_fingerprint(hook))),
        # Only install attaches it (EXECUTE is checked when a trigger is created,
        # not when it fires): nobody can hook it to a table of their own.
        sql.SQL("REVOKE ALL ON FUNCTION {}() FROM PUBLIC").format(function),
    ]
    for schema, table_name in _tables(db, hook) or [(hook.table_schema or "public", hook.table_name)]:
        table = sql.Identifier(schema, table_name)
        statements += _drop_trigger_statements(hook, table)
        statements += _create_trigger_statements(hook, table, function, captured)
    return statements


def _capture_fragments(captured: list[str]) -> dict[str, sql.Composable]:
    """The column-dependent placeholders of sql/capture_function.sql.

    columns: the captured columns, as r.column; arrays: each name with json_agg
    of r.column (chunked path); values: json_build_array of each r.column, and
    update_values the same of n.column then o.column (one-row path);
    new_format, old_format, update_format: format() strings of a one-row
    payload with one %s per value, e.g. {"new":{"id":%s,"name":%s}}.
    """
    for c in captured:
        if "$capture$" in c:  # would end the function body's dollar quote
            raise ConfigError(f'column "{c}" cannot be captured: its name contains $capture$')
    # Columns are qualified with the template's aliases (r, n, o): unqualified,
    # a column named like a trigger variable (new, old, tg_argv) would clash.
    def arrays_of(alias: str) -> list[sql.SQL | sql.Composed]:
        # json_agg/json_build_array, not array_agg: array_agg of an array column
        # fails on NULL or ragged arrays, which would break the app's write.
        return [sql.SQL("pg_catalog.json_build_array({})").format(sql.Identifier(alias, c))
                for c in captured]

    def payload_format(*sides: str) -> sql.Literal:
        # The key is JSON-encoded text inside a format() string: % doubled.
        body = ",".join(json.dumps(c).replace("%", "%%") + ":%s" for c in captured)
        return sql.Literal("{" + ",".join(f'"{side}":{{{body}}}' for side in sides) + "}")

    return {
        "columns": sql.SQL(", ").join(sql.Identifier("r", c) for c in captured),
        "arrays": sql.SQL(", ").join(
            sql.SQL("{}::pg_catalog.text, pg_catalog.json_agg({})").format(
                sql.Literal(c), sql.Identifier("r", c)) for c in captured),
        "new_format": payload_format("new"),
        "old_format": payload_format("old"),
        "update_format": payload_format("new", "old"),
        "values": sql.SQL(", ").join(arrays_of("r")),
        "update_values": sql.SQL(", ").join([*arrays_of("n"), *arrays_of("o")]),
    }


def _drop_trigger_statements(hook: InstalledHook, table: sql.Identifier) -> list[sql.SQL | sql.Composed]:
    return [sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(
        sql.Identifier(trigger_name(hook.name, event)), table) for event in TRIGGER_EVENTS]


def _create_trigger_statements(hook: InstalledHook, table: sql.Identifier, function: sql.Identifier,
                               captured: list[str]) -> list[sql.SQL | sql.Composed]:
    statements: list[sql.SQL | sql.Composed] = []
    for event in hook.events:
        operation, referencing = TRIGGER_EVENTS[event]
        statements.append(sql.SQL(
            "CREATE TRIGGER {trigger} AFTER {operation} ON {table} {referencing} "
            "FOR EACH STATEMENT EXECUTE FUNCTION {function}({hook}, {columns})"
        ).format(
            trigger=sql.Identifier(trigger_name(hook.name, event)),
            operation=sql.SQL(operation),
            table=table,
            referencing=sql.SQL(referencing),
            function=function,
            hook=sql.Literal(hook.name),
            columns=sql.Literal(_text_array(captured)),
        ))
    return statements


def _drop_statements(db: Database, hook: InstalledHook) -> list[sql.SQL | sql.Composed]:
    if hook.table_name is None:
        return []
    statements: list[sql.SQL | sql.Composed] = []
    for schema, table in _tables(db, hook):
        statements += _drop_trigger_statements(hook, sql.Identifier(schema, table))
    statements.append(sql.SQL("DROP FUNCTION IF EXISTS {}()").format(
        sql.Identifier("cdc_hooks", function_name(hook.name))))
    return statements


def _text_array(items: Iterable[str]) -> str:
    """A PostgreSQL array literal of strings, for a trigger argument."""
    quoted = ('"' + i.replace("\\", "\\\\").replace('"', '\\"') + '"' for i in items)
    return "{" + ",".join(quoted) + "}"


def install(config: Config, *, force: bool = False) -> Plan:
    """Applies the config atomically: every hook, or nothing. force: pause the
    listeners the change strands instead of refusing."""
    desired = resolve_hooks(config)
    with Database.connect(config.dsn) as db:
        with db.transaction():
            db.run("lock_install")
            plan = plan_install(db, desired, force=force, repair_triggers=config.repair_triggers)
            db.migrate()
            for statement in plan.statements:
                db.run(statement)
            for hook in plan.hooks_to_save:
                db.save_hook(hook)
            for name in plan.hooks_to_forget:
                db.forget_hook(name)
            for params in _pause_params(plan):
                db.run("set_listener_state", params)
            db.run("refresh_hook_relations")
            if config.relay_role:
                db.grant_relay(config.relay_role)
        return plan


def dry_run(config: Config, *, force: bool = False) -> tuple[Plan, str]:
    """The plan and the SQL install would run; changes nothing."""
    desired = resolve_hooks(config)
    with Database.connect(config.dsn) as db:
        plan = plan_install(db, desired, force=force, repair_triggers=config.repair_triggers)
        return plan, _script(db, plan, config.relay_role)


def _pause_params(plan: Plan) -> list[dict[str, Any]]:
    """set_listener_state's parameters for each listener the plan pauses."""
    return [{"id": s.listener_id, "state": "paused", "reason": s.reason}
            for s in plan.listeners_to_pause]


def _script(db: Database, plan: Plan, relay_role: str | None) -> str:
    """Everything install would run, bookkeeping included: applied by hand, it
    leaves the database as install would (a later install finds it in line)."""
    if not (plan.migrations or plan.statements or plan.hooks_to_save or plan.hooks_to_forget
            or plan.listeners_to_pause):
        return ""
    parts = ["BEGIN;", _rendered(db, "lock_install")]
    for version, text in migrations():
        if version in plan.migrations:
            if version == plan.migrations[0] and not db.schema_exists():
                parts.append(sql_text("bootstrap.sql"))
            parts.append(text)
            parts.append(_rendered(db, "record_schema_version", {"version": version}))
    parts += [s.as_string(db.conn).rstrip().rstrip(";") + ";" for s in plan.statements]
    parts += [_rendered(db, "save_hook", h.params()) for h in plan.hooks_to_save]
    parts += [_rendered(db, "forget_hook", {"name": n}) for n in plan.hooks_to_forget]
    parts += [_rendered(db, "set_listener_state", p) for p in _pause_params(plan)]
    parts.append(_rendered(db, "refresh_hook_relations"))
    if relay_role:
        parts.append(query("grant_relay").format(role=sql.Identifier(relay_role)).as_string(db.conn))
    parts.append("COMMIT;")
    return "\n".join(parts)


def _rendered(db: Database, name: str, params: dict[str, Any] | None = None) -> str:
    """A named query with its parameters bound by psycopg, for a printed script."""
    text = psycopg.ClientCursor(db.conn).mogrify(queries()[name], params)
    return text.rstrip().rstrip(";") + ";"


def check(config: Config) -> list[str]:
    """Drift between config and database, one line per problem (empty: in line)."""
    problems: list[str] = []
    with Database.connect(config.dsn) as db:
        if not db.schema_exists():
            return ["schema cdc_hooks is not installed (run cdc-hooks install)"]
        latest = migrations()[-1][0]
        if db.schema_version() < latest:
            problems.append(f"schema cdc_hooks is at version {db.schema_version()}, "
                            f"this cdc-hooks needs {latest} (run cdc-hooks install)")
        installed = {h.name: h for h in db.installed_hooks()}
        try:
            desired = {h.name: h for h in resolve_hooks(config)}
        except ConfigError as exc:
            problems.extend(str(exc).splitlines())
            desired = {}
        configured = [h.name for h in config.hooks] + [h.name for h in BUILTIN_HOOKS]
        for name in configured:
            if name not in installed:
                problems.append(f'hook "{name}": not installed (run cdc-hooks install)')
            elif name in desired and desired[name] != installed[name]:
                problems.append(f'hook "{name}": config changed since install (run cdc-hooks install)')
        for hook in installed.values():
            if hook.name not in configured:
                problems.append(f'hook "{hook.name}": installed but not in the config')
            problems.extend(_live_drift(db, hook))
        problems.extend(_repair_drift(db, config.repair_triggers))
    return problems


def _repair_drift(db: Database, wanted: bool) -> list[str]:
    """The event trigger of [database] repair_triggers, against the config."""
    present = bool(db.value("repair_trigger_exists"))
    if wanted and not present:
        return [f"[database] repair_triggers = true, but the event trigger {REPAIR_TRIGGER} is "
                "missing (run cdc-hooks install as a superuser)"]
    if present and not wanted:
        return [f"the event trigger {REPAIR_TRIGGER} is installed, but [database] "
                "repair_triggers is false (run cdc-hooks install as a superuser)"]
    return []


def _live_drift(db: Database, hook: InstalledHook) -> list[str]:
    if hook.table_name is None:
        return []
    where = f'hook "{hook.name}"'
    table = f"{hook.table_schema}.{hook.table_name}"
    columns = db.table_columns(hook.table_schema or "public", hook.table_name)
    if columns is None:
        return [f"{where}: table {table} no longer exists"]
    problems = [
        f'{where}: column "{c}" no longer exists in {table} (dropped or renamed); '
        "its events lack it"
        for c in dict.fromkeys([*hook.key_columns, *hook.provides]) if c not in columns
    ]
    problems += [f"{where}: {missing} is missing (run cdc-hooks install)"
                 for missing in _missing_triggers(db, hook)]
    if not db.function_exists(function_name(hook.name)):
        problems.append(f"{where}: function cdc_hooks.{function_name(hook.name)} is missing")
    return problems


def uninstall(config: Config, *, drop_schema: bool = False) -> list[str]:
    """Removes every installed hook's triggers; the schema only when asked."""
    done: list[str] = []
    with Database.connect(config.dsn) as db, db.transaction():
        if not db.schema_exists():
            return ["nothing installed"]
        db.run("lock_install")
        for hook in db.installed_hooks():
            for statement in _drop_statements(db, hook):
                db.run(statement)
            db.forget_hook(hook.name)
            if hook not in BUILTIN_HOOKS:
                done.append(f"- {hook.name}: removed")
        db.run("refresh_hook_relations")
        if drop_schema:
            outbox, pending = db.pending_counts()
            db.run(sql.SQL("DROP SCHEMA cdc_hooks CASCADE"))
            done.append(f"- schema cdc_hooks dropped ({outbox} outbox chunks and "
                        f"{pending} pending deliveries discarded)")
    return done
