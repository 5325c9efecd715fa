"""What the API and the pages show, read through db.Database: one place for both."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .. import jsoncodec
from .. import listeners as core
from ..config import TableName
from ..db import Database, InstalledHook, ListenerRow
from ..errors import CdcHooksError, DatabaseUnavailable, ListenerError, NotFound
from ..match import deepmatch, rules_from_json
from ..urls import redact_url
from .models import (
    AttemptOut,
    DeliveryDetail,
    DeliveryOut,
    FailingListener,
    HookNotCapturing,
    HookOut,
    LastDelivery,
    ListenerOut,
    ListenerStats,
    StatusOut,
)

READY_MAX_LAG = 60.0  # seconds an undispatched change may wait before /readyz says the relay lags


class AlreadyQueued(ListenerError):
    """Redelivery of a delivery that is still pending (an HTTP 409)."""


def hooks(db: Database, *, activity: bool = True) -> list[HookOut]:
    """Installed hooks; without `activity`, listener and delivery counts are left at 0
    (they cost a scan of the last hour's deliveries)."""
    counts = {r[0]: (int(r[1]), int(r[2])) for r in db.web_hook_activity()} if activity else {}
    return [_hook_out(h, *counts.get(h.name, (0, 0))) for h in db.installed_hooks()]


def hook(db: Database, name: str) -> HookOut:
    """One installed hook (its activity not counted), else NotFound."""
    for found in hooks(db, activity=False):
        if found.name == name:
            return found
    raise NotFound(f'no installed hook named "{name}"')


def _hook_out(h: InstalledHook, listeners: int, delivered: int) -> HookOut:
    table = str(TableName(h.table_schema, h.table_name)) if h.table_name and h.table_schema else None
    return HookOut(name=h.name, table=table, events=list(h.events), provides=list(h.provides),
                   key=list(h.key_columns), custom=table is None, listeners=listeners,
                   delivered_last_hour=delivered)


def listeners(db: Database, *, hook: str | None = None,
              listener_id: int | None = None) -> list[ListenerOut]:
    stats = {r[0]: r[1:] for r in db.web_listener_stats(listener_id)}
    return [_listener_out(row, stats.get(row.id, (0, 0, 0, 0))) for row in db.list_listeners()
            if (hook is None or row.hook == hook) and (listener_id is None or row.id == listener_id)]


def listener(db: Database, listener_id: int) -> ListenerOut:
    found = listeners(db, listener_id=listener_id)
    if not found:
        raise NotFound(f"no listener with id {listener_id}")
    return found[0]


def _listener_out(row: ListenerRow, counts: tuple[Any, ...]) -> ListenerOut:
    delivered, dead, retrying, queued = (int(c) for c in counts)
    tried = delivered + dead + retrying
    last = None
    if row.last_status is not None:
        last = LastDelivery(status=row.last_status, code=row.last_code, error=row.last_error,
                            finished_at=row.last_finished_at)
    match, match_error = core.stored_match(row.match)
    return ListenerOut(
        id=row.id, hook=row.hook, url=redact_url(row.url), match=match, match_error=match_error,
        state=row.state,
        disabled_reason=row.disabled_reason, backfill=row.backfill,
        header_names=row.header_names, secret_overlap_until=row.overlap_until,
        events=row.events, changed=row.changed, rate=row.rate, created_at=row.created_at,
        updated_at=row.updated_at,
        last_delivery=last,
        stats=ListenerStats(delivered=delivered, dead=dead, retrying=retrying, queued=queued,
                            success_rate=delivered / tried if tried else None),
    )


def deliveries(db: Database, *, limit: int, **filters: Any) -> tuple[list[DeliveryOut], int | None]:
    """A page of deliveries, newest first, and the cursor of the next page (None at the end)."""
    rows = db.web_deliveries(limit=limit + 1, **filters)
    items = [_delivery_out(r) for r in rows[:limit]]
    return items, items[-1].id if len(rows) > limit else None


def _delivery_out(r: tuple[Any, ...]) -> DeliveryOut:
    return DeliveryOut(
        id=r[0], event_id=r[1], listener_id=r[2], hook=r[3], kind=r[4], status=r[5], attempts=r[6],
        last_code=r[7], last_error=r[8], created_at=r[9], finished_at=r[10], next_attempt_at=r[11],
        duration_ms=_float(r[12]), latency_ms=_float(r[13]),
    )


def delivery(db: Database, delivery_id: int) -> DeliveryDetail:
    row = db.web_delivery(delivery_id)
    if row is None:
        raise NotFound(f"no delivery with id {delivery_id}")
    base = _delivery_out(row)
    attempts = [AttemptOut(attempted_at=a[0], status_code=a[1], duration_ms=float(a[2]), error=a[3],
                           response=a[4]) for a in db.delivery_attempts(delivery_id)]
    url = None if row[14] is None else redact_url(row[14])
    return DeliveryDetail(**base.model_dump(), url=url, body=jsoncodec.loads(row[15]),
                          webhook_id=f"msg_{base.event_id}_{base.listener_id}", attempt_log=attempts)


def redeliver(db: Database, delivery_id: int) -> list[int]:
    """Queues a finished delivery again (same webhook-id); a pending one is already queued."""
    current = delivery(db, delivery_id)
    queued = db.redeliver(delivery_id=delivery_id, only_dead=False)
    if not queued:
        raise AlreadyQueued(f"delivery {delivery_id} is {current.status}: it is already queued")
    return queued


def redeliver_failed(db: Database, listener_id: int) -> list[int]:
    """Every dead letter of a listener, queued again."""
    core.get_listener(db, listener_id)
    return db.redeliver(listener_id=listener_id, only_dead=True)


def status(db: Database, minutes: int = 5) -> StatusOut:
    figures = db.status(minutes)
    failing = [FailingListener(id=r[0], hook=r[1], url=redact_url(r[2]), state=r[3], disabled_reason=r[4],
                               dead=r[5], retrying=r[6]) for r in db.failing_listeners()]
    delivered = int(figures["delivered"])
    return StatusOut(
        minutes=minutes, outbox_chunks=figures["outbox_chunks"], pending=figures["pending"],
        oldest_outbox_age=_float(figures["oldest_outbox_age"]),
        oldest_pending_age=_float(figures["oldest_pending_age"]),
        delivered=delivered, deliveries_per_second=delivered / (minutes * 60.0),
        failed_attempts=figures["failed_attempts"], dead=figures["dead"], failing_listeners=failing,
        hooks_not_capturing=[HookNotCapturing(hook=h.hook, table=h.table, problem=h.problem)
                             for h in db.hooks_capturing() if h.problem is not None],
    )


def readiness(db: Database) -> list[str]:
    """Why the service is not ready: empty if the schema is there and the relay keeps up."""
    if not db.schema_exists():
        return ["cdc_hooks is not installed: run cdc-hooks install"]
    lag = _float(db.status(1)["oldest_outbox_age"])
    if lag is not None and lag > READY_MAX_LAG:
        return [f"the relay is behind: the oldest undispatched change is {lag:.0f} s old"]
    return []


@dataclass(frozen=True)
class Minute:
    at: datetime
    delivered: int
    failed: int


def timeline(db: Database, minutes: int = 60) -> list[Minute]:
    if not db.schema_exists():
        return []
    return [Minute(r[0], int(r[1]), int(r[2])) for r in db.web_timeline(minutes)]


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
    declared = core.installed_hook(db, hook_name)
    core.validate_match(declared, dict(match))
    kinds = core.validate_events(declared, events)
    columns = core.validate_changed(declared, changed)
    rules = rules_from_json(match)
    found = []
    for event_id, kind, body, occurred_at in db.web_recent_events(hook_name, limit):
        event = jsoncodec.loads(body)  # exact numbers, as the relay sees them
        data = event.get("data") or {}
        matched = core.takes(kinds, None if columns is None else set(columns), kind,
                             event.get("changes")) and deepmatch(rules, data)
        found.append(PreviewEvent(event_id, kind, occurred_at, data, matched))
    return found


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def status_code_of(exc: CdcHooksError) -> int:
    """The HTTP status of an error the core raised: the caller's mistake is a 4xx."""
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, DatabaseUnavailable):
        return 503
    if isinstance(exc, AlreadyQueued):
        return 409
    return 422
