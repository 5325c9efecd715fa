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

A body starts with its envelope, {"id", "hook", "event", "created",
"occurred_at"}, which cdc_hooks.events keeps in columns: the row keeps the rest
(Event.stored, from "key" on), and SQL's cdc_hooks.event_body puts the two
together again, byte for byte (schema version 14).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
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
    stored: str  # the body without its envelope: what cdc_hooks.events keeps
    occurred_at: datetime
    for_listener: int | None = None  # a backfill's --listener: deliveries for it only
    changes: dict[str, Any] | None = None  # an update's changed columns (old values)


class Stamp(NamedTuple):
    at: datetime
    text: str  # ISO 8601 in UTC, as in the body (and as cdc_hooks.event_body writes it)


def envelope(event_id: int, hook: str, kind: str, stamp: Stamp) -> str:
    """The start of an event's body, up to its "key" (see the module's docstring)."""
    return (f'{{"id":"evt_{event_id}","hook":{jsoncodec.dumps_decoded(hook)},'
            f'"event":{jsoncodec.dumps_decoded(kind)},'
            f'"created":{"true" if kind == "insert" else "false"},"occurred_at":"{stamp.text}",')


def _texts(event_id: int, hook: str, kind: str, stamp: Stamp, rest: dict[str, Any]) -> tuple[str, str]:
    """(body, stored) of an event whose body after the envelope is rest, from "key" on."""
    stored = jsoncodec.dumps_decoded(rest)
    return envelope(event_id, hook, kind, stamp) + stored[1:], stored


def expand(outbox_id: int, hook: InstalledHook | None, kind: str, payload_text: str,
           occurred_at: datetime, max_bytes: int = MAX_EVENT_BYTES) -> Iterator[Event]:
    """The events of one outbox row (none for updates filtered by when_changed);
    bodies over max_bytes are sent as markers without data."""
    stamp = Stamp(occurred_at, occurred_at.astimezone(UTC).isoformat())  # once per outbox row
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
    body, stored = _texts(outbox_id * CHUNK, hook, "truncate", stamp, {"key": None, "data": None})
    return Event(outbox_id * CHUNK, hook, "truncate", ALL_ROWS, {}, body, stored, stamp.at)


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
    rest: dict[str, Any] = {"key": key, "data": data}
    if changes is not None:
        rest["changes"] = changes
    if old_key is not None:
        rest["old_key"] = old_key
    row_key = None if key is None else jsoncodec.dumps_decoded(sorted(key.items()))
    try:
        body, stored = _texts(event_id, hook, kind, stamp, rest)
    except jsoncodec.TooDeep:
        body, stored = _marker(event_id, hook, kind, stamp, rest, "depth", None)
    else:
        if len(body) > limit.chars:  # the one check on the hot path: a length comparison
            size = len(body.encode())
            if size > limit.bytes:
                body, stored = _marker(event_id, hook, kind, stamp, rest, "size", size)
    return Event(event_id, hook, kind, row_key, data, body, stored, stamp.at, None, changes)


def _marker(event_id: int, hook: str, kind: str, stamp: Stamp, rest: dict[str, Any], reason: str,
            size: int | None) -> tuple[str, str]:
    """The body without data and changes, saying why (never logging values)."""
    log.warning("event evt_%s of hook %s, key %s: %s; sent without data (truncated)", event_id,
                hook, jsoncodec.dumps_decoded(rest["key"]),
                f"{size} bytes, over [delivery] max_event_bytes" if reason == "size"
                else f"nested more than {jsoncodec.ENCODE_DEPTH} levels deep")
    marker = {**rest, "data": None, "truncated": {"reason": reason, "bytes": size}}
    if "changes" in rest:
        marker["changes"] = None
    return _texts(event_id, hook, kind, stamp, marker)


def _unreadable(outbox_id: int, hook: str, kind: str, stamp: Stamp) -> Event:
    """One marker for an outbox row too deeply nested to decode at all (no key known;
    its data is empty to matching, so only listeners without a filter get it)."""
    log.error("outbox row %s of hook %s is nested too deeply to read: one event without "
              "key or data sent for it", outbox_id, hook)
    rest: dict[str, Any] = {"key": None, "data": None, "truncated": {"reason": "depth", "bytes": None}}
    if kind == "update":
        rest["changes"] = None
    body, stored = _texts(outbox_id * CHUNK, hook, kind, stamp, rest)
    return Event(outbox_id * CHUNK, hook, kind, None, {}, body, stored, stamp.at)
