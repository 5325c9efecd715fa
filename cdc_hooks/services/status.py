"""How the service is doing: backlog, lag, rates, failing and held listeners, hooks
not capturing (CLI status, /api/status, the overview page), and readiness."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..capturing import HookCapture
from ..db import Database
from ..rows import FailingListener, HeldListener, Minute
from ..urls import redact_url

READY_MAX_LAG = 60.0  # seconds an undispatched change may wait before /readyz says the relay lags


@dataclass(frozen=True)
class Status:
    minutes: int  # the window of delivered, failed_attempts and deliveries_per_second
    outbox_chunks: int  # captured statements not yet dispatched
    pending: int  # deliveries waiting or retrying
    oldest_outbox_age: float | None  # seconds
    oldest_pending_age: float | None  # seconds
    delivered: int
    deliveries_per_second: float
    failed_attempts: int
    dead: int
    failing_listeners: list[FailingListener]  # URLs with credentials masked
    held_listeners: list[HeldListener]  # paused or disabled, URLs masked
    hooks_not_capturing: list[HookCapture]


def report(db: Database, minutes: int = 5) -> Status:
    figures = db.status(minutes)
    return Status(
        minutes=minutes, outbox_chunks=figures.outbox_chunks, pending=figures.pending,
        oldest_outbox_age=figures.oldest_outbox_age, oldest_pending_age=figures.oldest_pending_age,
        delivered=figures.delivered, deliveries_per_second=figures.delivered / (minutes * 60.0),
        failed_attempts=figures.failed_attempts, dead=figures.dead,
        failing_listeners=[replace(f, url=redact_url(f.url)) for f in db.failing_listeners()],
        held_listeners=[replace(h, url=redact_url(h.url)) for h in db.held_listeners()],
        hooks_not_capturing=[h for h in db.hooks_capturing() if not h.capturing],
    )


def readiness(db: Database) -> list[str]:
    """Why the service is not ready: empty if the schema is there and the relay keeps up."""
    if not db.schema_exists():
        return ["cdc_hooks is not installed: run cdc-hooks install"]
    lag = db.status(1).oldest_outbox_age
    if lag is not None and lag > READY_MAX_LAG:
        return [f"the relay is behind: the oldest undispatched change is {lag:.0f} s old"]
    return []


def timeline(db: Database, minutes: int = 60) -> list[Minute]:
    """Delivered and failed attempts per minute of the last `minutes`."""
    return db.timeline(minutes) if db.schema_exists() else []
