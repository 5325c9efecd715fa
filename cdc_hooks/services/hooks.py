"""Installed hooks: their listing, a filter's preview on a hook's last events, and
sending a custom hook's event, for every interface."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from .. import jsoncodec
from ..config import TableName
from ..db import Database
from ..errors import ListenerError, NotFound
from ..match import deepmatch, rules_from_json
from ..rows import InstalledHook
from .listeners import installed_hook, takes, validate_changed, validate_events, validate_match


@dataclass(frozen=True)
class HookView:
    name: str
    table: str | None  # SCHEMA.TABLE; None for a custom hook (sent explicitly)
    events: list[str]
    provides: list[str]
    key: list[str]
    custom: bool
    listeners: int
    delivered_last_hour: int


def list_hooks(db: Database, *, activity: bool = True) -> list[HookView]:
    """Installed hooks; without `activity`, listener and delivery counts are left at 0
    (they cost a scan of the last hour's deliveries)."""
    counts = {a.name: (a.listeners, a.delivered_last_hour) for a in db.hook_activity()} \
        if activity else {}
    return [_view(h, *counts.get(h.name, (0, 0))) for h in db.installed_hooks()]


def get_hook(db: Database, name: str) -> HookView:
    """One installed hook (its activity not counted), else NotFound."""
    for found in list_hooks(db, activity=False):
        if found.name == name:
            return found
    raise NotFound(f'no installed hook named "{name}"')


def _view(h: InstalledHook, listeners: int, delivered: int) -> HookView:
    table = str(TableName(h.table_schema, h.table_name)) if h.table_name and h.table_schema else None
    return HookView(name=h.name, table=table, events=list(h.events), provides=list(h.provides),
                    key=list(h.key_columns), custom=table is None, listeners=listeners,
                    delivered_last_hour=delivered)


@dataclass(frozen=True)
class PreviewEvent:
    id: int
    kind: str
    occurred_at: datetime
    data: dict[str, Any]
    matched: bool


def preview(db: Database, hook_name: str, match: Mapping[str, Any], limit: int = 10,
            events: list[str] | None = None, changed: list[str] | None = None
            ) -> list[PreviewEvent]:
    """The hook's last events, newest first, each with whether a listener with this
    filter, event kinds and changed columns would get it (as the relay decides).

    Raises MatchError/ListenerError (naming the field) for a filter that cannot be used."""
    declared = installed_hook(db, hook_name)
    validate_match(declared, dict(match))
    kinds = validate_events(declared, events)
    columns = validate_changed(declared, changed)
    rules = rules_from_json(match)
    found = []
    for event in db.recent_events(hook_name, limit):
        body = jsoncodec.loads(event.body)  # exact numbers, as the relay sees them
        data = body.get("data") or {}
        matched = takes(kinds, None if columns is None else set(columns), event.kind,
                        body.get("changes")) and deepmatch(rules, data)
        found.append(PreviewEvent(event.id, event.kind, event.occurred_at, data, matched))
    return found


def send(db: Database, hook: str, payload: Mapping[str, Any]) -> int:
    """Records a custom hook's event (cdc_hooks.send) and returns its id. Values are
    written as a table column of their PostgreSQL type would be (jsoncodec.dumps_postgres),
    a timestamptz in the session's time zone, as the capture triggers write one in the
    application's session."""
    if jsoncodec.deeper_than(dict(payload), jsoncodec.MAX_DEPTH):
        raise ListenerError(f'send "{hook}": the payload is {jsoncodec.TOO_DEEP}')
    try:
        payload_json = jsoncodec.dumps_postgres(payload, db.conn.info.timezone)
    except (TypeError, ValueError) as exc:
        raise ListenerError(f'send "{hook}": {exc}') from None
    try:
        return db.send(hook, payload_json)
    except (psycopg.errors.UndefinedObject, psycopg.errors.WrongObjectType,
            psycopg.errors.InvalidParameterValue, psycopg.errors.InsufficientPrivilege) as exc:
        raise ListenerError(exc.diag.message_primary or str(exc)) from None
    except psycopg.errors.InvalidSchemaName:
        raise ListenerError("cdc_hooks is not installed: run cdc-hooks install") from None
