"""Outbox rows -> events: the body each listener receives.

The triggers write one outbox row per statement and chunk of rows, as column
arrays (cheap inside the application's transaction); here each row becomes an
event with its key, provided data and, for updates, the changed columns.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, NamedTuple

from .. import jsoncodec
from ..db import InstalledHook
from ..match import strict_equal

CHUNK = 1000  # rows per outbox row at most; event id = outbox id * CHUNK + position


@dataclass(slots=True)  # not frozen: a frozen __init__ costs 6x, and this is per event
class Event:
    id: int
    hook: str
    kind: str
    row_key: str | None  # canonical JSON of the key, for per-row order
    data: dict[str, Any]
    body: str  # the JSON POSTed to listeners
    occurred_at: datetime
    for_listener: int | None = None  # a backfill's --listener: deliveries for it only


class Stamp(NamedTuple):
    at: datetime
    text: str  # ISO 8601, as in the body


def expand(outbox_id: int, hook: InstalledHook | None, kind: str, payload_text: str,
           occurred_at: datetime) -> Iterator[Event]:
    """The events of one outbox row (none for updates filtered by when_changed)."""
    payload = jsoncodec.loads(payload_text)
    stamp = Stamp(occurred_at, occurred_at.isoformat())  # once per outbox row, not per event
    if "data" in payload:  # a custom hook's send()
        yield _event(outbox_id * CHUNK, hook.name if hook else kind, kind, None,
                     payload["data"], None, None, stamp)
        return
    if hook is None:  # outbox rows of a hook removed since: nothing to decode them with
        return
    new, old = payload.get("new"), payload.get("old")
    rows = _rows(new) if new is not None else None
    old_rows = _rows(old) if old is not None else None
    count = len(rows if rows is not None else old_rows or [])
    for i in range(count):
        after = rows[i] if rows is not None else None
        before = old_rows[i] if old_rows is not None and i < len(old_rows) else None
        current = after if after is not None else before or {}
        key = {c: current[c] for c in hook.key_columns if c in current}
        data = {c: current[c] for c in hook.provides if c in current}
        changes, old_key = None, None
        if kind == "update" and before is not None:
            changes = {c: before[c] for c in hook.provides
                       if c in before and c in current and not strict_equal(before[c], current[c])}
            previous_key = {c: before[c] for c in hook.key_columns if c in before}
            if previous_key != key:
                old_key = previous_key
            elif not any(c in changes for c in hook.when_changed):
                continue
        event = _event(outbox_id * CHUNK + i, hook.name, kind, key, data, changes, old_key, stamp)
        # A backfill ('read', cdc_hooks/backfill.py) may be for one listener.
        yield event if payload.get("listener") is None else replace(
            event, for_listener=int(payload["listener"]))


def _rows(columns: Mapping[str, list[Any]]) -> list[dict[str, Any]]:
    names = list(columns)
    if not names:
        return []
    return [dict(zip(names, values, strict=True)) for values in zip(*columns.values(), strict=True)]


def _event(event_id: int, hook: str, kind: str, key: dict[str, Any] | None,
           data: dict[str, Any], changes: dict[str, Any] | None,
           old_key: dict[str, Any] | None, stamp: Stamp) -> Event:
    body: dict[str, Any] = {
        "id": f"evt_{event_id}",
        "hook": hook,
        "event": kind,
        "created": kind == "insert",
        "key": key,
        "data": data,
        "occurred_at": stamp.text,
    }
    if changes is not None:
        body["changes"] = changes
    if old_key is not None:
        body["old_key"] = old_key
    row_key = None if key is None else jsoncodec.dumps_decoded(sorted(key.items()))
    return Event(event_id, hook, kind, row_key, data, jsoncodec.dumps_decoded(body), stamp.at)
