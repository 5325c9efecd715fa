"""Outbox rows -> events: the body each listener receives.

The triggers write one outbox row per statement and chunk of rows, as column
arrays (cheap inside the application's transaction); here each row becomes an
event with its key, provided data and, for updates, the changed columns.

An event body over [delivery] max_event_bytes, or nested too deeply to encode
(more than jsoncodec.ENCODE_DEPTH levels), is replaced by a marker: the same
id, hook, event, key and time, "data" and "changes" null, and "truncated"
saying why, so that the receiver can read the row by its key. Captured
changes are never refused (the application's writes must not fail because of
cdc-hooks); listeners still match against the whole data.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, NamedTuple

from .. import jsoncodec
from ..config import DeliveryConfig
from ..match import strict_equal
from ..rows import InstalledHook

CHUNK = 1000  # rows per outbox row at most; event id = outbox id * CHUNK + position
# The row_key of a TRUNCATE's deliveries (no real key is "*": those are JSON arrays):
# its delivery waits for every older pending one of its listener, and newer ones
# wait for it (sql/queries.sql insert_deliveries, claim_deliveries).
ALL_ROWS = "*"
MAX_EVENT_BYTES = DeliveryConfig.max_event_bytes

log = logging.getLogger("cdc_hooks.relay")


@dataclass(slots=True)  # not frozen: a frozen __init__ is several times slower; this is per event
class Event:
    id: int
    hook: str
    kind: str
    row_key: str | None  # canonical JSON of the key, for per-row order
    data: dict[str, Any]
    body: str  # the JSON POSTed to listeners
    occurred_at: datetime
    for_listener: int | None = None  # a backfill's --listener: deliveries for it only
    changes: dict[str, Any] | None = None  # an update's changed columns (old values)


class Stamp(NamedTuple):
    at: datetime
    text: str  # ISO 8601, as in the body


def expand(outbox_id: int, hook: InstalledHook | None, kind: str, payload_text: str,
           occurred_at: datetime, max_bytes: int = MAX_EVENT_BYTES) -> Iterator[Event]:
    """The events of one outbox row (none for updates filtered by when_changed);
    bodies over max_bytes are sent as markers without data."""
    stamp = Stamp(occurred_at, occurred_at.isoformat())  # once per outbox row, not per event
    limit = Limit(max_bytes, max_bytes >> 2)
    try:
        payload = jsoncodec.loads(payload_text)
    except jsoncodec.TooDeep:  # e.g. a json column nested ~1000 levels: no key to read either
        if hook is not None:
            yield _unreadable(outbox_id, hook.name, kind, stamp)
        return
    if "data" in payload:  # a custom hook's send()
        yield _event(outbox_id * CHUNK, hook.name if hook else kind, kind, None,
                     payload["data"], None, None, stamp, limit)
        return
    if hook is None:  # outbox rows of a hook removed since: nothing to decode them with
        return
    if kind == "truncate":
        yield _truncate(outbox_id, hook.name, stamp)
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
        event = _event(outbox_id * CHUNK + i, hook.name, kind, key, data, changes, old_key, stamp,
                       limit)
        # A backfill ('read', cdc_hooks/backfill.py) may be for one listener.
        yield event if payload.get("listener") is None else replace(
            event, for_listener=int(payload["listener"]))


def _truncate(outbox_id: int, hook: str, stamp: Stamp) -> Event:
    """A TRUNCATE: one event without key or data, for every listener whatever its match."""
    body = {"id": f"evt_{outbox_id * CHUNK}", "hook": hook, "event": "truncate",
            "created": False, "key": None, "data": None, "occurred_at": stamp.text}
    return Event(outbox_id * CHUNK, hook, "truncate", ALL_ROWS, {}, jsoncodec.dumps_decoded(body),
                 stamp.at)


def _rows(columns: Mapping[str, list[Any]]) -> list[dict[str, Any]]:
    names = list(columns)
    if not names:
        return []
    return [dict(zip(names, values, strict=True)) for values in zip(*columns.values(), strict=True)]


class Limit(NamedTuple):
    bytes: int  # [delivery] max_event_bytes
    chars: int  # bytes // 4: a text of at most this many characters is within bytes in UTF-8


def _event(event_id: int, hook: str, kind: str, key: dict[str, Any] | None,
           data: dict[str, Any], changes: dict[str, Any] | None,
           old_key: dict[str, Any] | None, stamp: Stamp, limit: Limit) -> Event:
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
    try:
        text = jsoncodec.dumps_decoded(body)
    except jsoncodec.TooDeep:
        text = _marker(body, "depth", None)
    else:
        if len(text) > limit.chars:  # the one check on the hot path: a length comparison
            size = len(text.encode())
            if size > limit.bytes:
                text = _marker(body, "size", size)
    return Event(event_id, hook, kind, row_key, data, text, stamp.at, None, changes)


def _marker(body: dict[str, Any], reason: str, size: int | None) -> str:
    """The body without data and changes, saying why (never logging values)."""
    log.warning("event %s of hook %s, key %s: %s; sent without data (truncated)", body["id"],
                body["hook"], jsoncodec.dumps_decoded(body["key"]),
                f"{size} bytes, over [delivery] max_event_bytes" if reason == "size"
                else f"nested more than {jsoncodec.ENCODE_DEPTH} levels deep")
    marker = {**body, "data": None, "truncated": {"reason": reason, "bytes": size}}
    if "changes" in body:
        marker["changes"] = None
    return jsoncodec.dumps_decoded(marker)


def _unreadable(outbox_id: int, hook: str, kind: str, stamp: Stamp) -> Event:
    """One marker for an outbox row too deeply nested to decode at all (no key known;
    its data is empty to matching, so only listeners without a filter get it)."""
    log.error("outbox row %s of hook %s is nested too deeply to read: one event without "
              "key or data sent for it", outbox_id, hook)
    body = {"id": f"evt_{outbox_id * CHUNK}", "hook": hook, "event": kind,
            "created": kind == "insert", "key": None, "data": None, "occurred_at": stamp.text,
            "truncated": {"reason": "depth", "bytes": None}}
    if kind == "update":
        body["changes"] = None
    return Event(outbox_id * CHUNK, hook, kind, None, {}, jsoncodec.dumps_decoded(body), stamp.at)
