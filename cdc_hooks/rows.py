"""The named types the rows of sql/queries.sql are read into, one per query shape.

Each field is named as its query's column (``Database.rows(..., into=Type)``
reads a row by column name, psycopg's kwargs_row): a column added or moved in
SQL cannot shift another into the wrong field. The relay's hot-path queries
(claim, record) stay tuples: they are read once, in one place, per round.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class InstalledHook:
    """A row of installed_hooks."""

    name: str
    table_schema: str | None
    table_name: str | None
    events: tuple[str, ...]
    provides: tuple[str, ...]
    key_columns: tuple[str, ...]
    when_changed: tuple[str, ...]
    senders: tuple[str, ...] = ()  # custom hooks: roles allowed to send it

    @classmethod
    def from_row(cls, *, name: str, table_schema: str | None, table_name: str | None,
                 **arrays: Sequence[str]) -> InstalledHook:
        """From the columns of installed_hooks (its arrays as tuples: the hook is hashable)."""
        return cls(name, table_schema, table_name, **{k: tuple(v) for k, v in arrays.items()})

    def params(self) -> dict[str, Any]:
        """The save_hook query's parameters."""
        return {"name": self.name, "table_schema": self.table_schema, "table_name": self.table_name,
                "events": list(self.events), "provides": list(self.provides),
                "key_columns": list(self.key_columns), "when_changed": list(self.when_changed),
                "senders": list(self.senders)}


@dataclass(frozen=True)
class ListenerRow:
    """A row of list_listeners (get_listener: without the last_* columns)."""

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
    rate: float | None = None  # at most this many deliveries per second (None: no limit)
    last_status: str | None = None
    last_code: int | None = None
    last_error: str | None = None
    last_finished_at: datetime | None = None


@dataclass(frozen=True)
class ListenerMatch:
    """A row of hook_listeners: what a config change could strand."""

    id: int
    hook: str
    match: str
    state: str


@dataclass(frozen=True)
class DisabledListener:
    """A row of disable_failing_listeners; Database.disable_failing_listeners masks
    the URL's credentials and adds the id of its cdc_hooks.listener_disabled event."""

    id: int
    hook: str
    url: str
    disabled_reason: str
    event_id: int | None = None  # None: the built-in hook is not installed


@dataclass(frozen=True)
class ListenerCounts:
    """A row of listener_stats: outcomes of a listener's last 1000 deliveries."""

    id: int
    delivered: int
    dead: int
    retrying: int
    queued: int


@dataclass(frozen=True)
class HookActivity:
    """A row of hook_activity."""

    name: str
    listeners: int
    delivered_last_hour: int


@dataclass(frozen=True)
class Delivery:
    """A row of deliveries (a listing)."""

    id: int
    event_id: int
    listener_id: int
    hook: str
    kind: str
    status: str
    attempts: int
    last_code: int | None
    last_error: str | None
    created_at: datetime
    finished_at: datetime | None
    next_attempt_at: datetime | None  # only while pending
    duration_ms: float | None  # of the last attempt
    latency_ms: float | None  # from the change's commit to the delivery's end


@dataclass(frozen=True)
class StoredDelivery(Delivery):
    """A row of delivery: a listing's columns, its listener's URL (as stored) and the body."""

    url: str | None
    body: str


@dataclass(frozen=True)
class Attempt:
    """A row of delivery_attempts."""

    attempted_at: datetime
    status_code: int | None
    duration_ms: float
    error: str | None
    response: str | None


@dataclass(frozen=True)
class StatusFigures:
    """The row of status."""

    outbox_chunks: int
    pending: int
    oldest_outbox_age: float | None
    oldest_pending_age: float | None
    delivered: int
    failed_attempts: int
    dead: int


@dataclass(frozen=True)
class FailingListener:
    """A row of failing_listeners."""

    id: int
    hook: str
    url: str
    state: str
    disabled_reason: str | None
    dead: int
    retrying: int


@dataclass(frozen=True)
class HeldListener:
    """A row of held_listeners: a listener paused or disabled."""

    id: int
    hook: str
    url: str
    state: str
    disabled_reason: str | None


@dataclass(frozen=True)
class Minute:
    """A row of timeline."""

    at: datetime
    delivered: int
    failed: int


@dataclass(frozen=True)
class UnfinishedBackfill:
    """A row of backfill_find."""

    id: int
    key_columns: list[str]
    last_key: list[str] | None
    rows_done: int


@dataclass(frozen=True)
class ListenerBacklog:
    """A row of metrics_backlog: a listener's backlog, with the outbox's figures (the
    listener columns all None when there are no listeners)."""

    id: int | None
    hook: str | None
    state: str | None
    pending: int
    outbox_rows: int
    outbox_oldest_age: float | None  # seconds
    oldest_pending_age: float | None  # seconds


@dataclass(frozen=True)
class RecentEvent:
    """A row of recent_events."""

    id: int
    kind: str
    body: str
    occurred_at: datetime
