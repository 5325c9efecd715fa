"""Retention: prune finished work so the hot tables stay small.

Deleted in small batches, each statement its own short transaction (the
Database is autocommit): no long transaction holds back VACUUM or the relay,
and the space freed is reused by new rows once autovacuum has seen it
(migration 0002 makes it look often). What goes, by [retention]:

- delivered deliveries, delivered_days after they finished;
- dead letters, failed_days after they were given up, unless redelivered first
  (a redelivered dead letter is pending again, and pending is never pruned);
- the attempt log, attempts_days after each attempt (a first attempt that
  delivered is kept on its delivery, and goes with it);
- events no delivery refers to any more, events_days after they occurred.

The outbox needs none: the relay deletes each row as it dispatches it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from .config import RetentionConfig
from .db import Database

DAY = 86400.0


@dataclass
class Pruned:
    delivered: int = 0
    dead: int = 0
    attempts: int = 0
    events: int = 0

    def __str__(self) -> str:
        return (f"{self.delivered} delivered deliveries, {self.dead} dead letters, "
                f"{self.attempts} attempts, {self.events} events")


def prune(db: Database, retention: RetentionConfig,
          stopping: Callable[[], bool] = lambda: False) -> Pruned | None:
    """Prunes everything past its retention; None if another prune is running.
    `stopping` is asked between batches (a relay shutting down)."""
    if not db.try_lock_maintenance():
        return None
    try:
        return prune_locked(db, retention, stopping)
    finally:
        db.unlock_maintenance()


def prune_locked(db: Database, retention: RetentionConfig,
                 stopping: Callable[[], bool] = lambda: False) -> Pruned:
    """prune() for a caller that holds the maintenance lock."""
    done = Pruned()
    batch = retention.batch
    # Deliveries first: the events they release can go in the same run.
    for listener_id in db.listener_ids():
        for status, days in (("delivered", retention.delivered_days),
                             ("dead", retention.failed_days)):
            count = _drain(functools.partial(
                db.prune_deliveries, listener_id, status, days * DAY, batch), batch, stopping)
            setattr(done, status, getattr(done, status) + count)
    done.attempts = _drain(lambda: db.prune_attempts(retention.attempts_days * DAY, batch),
                           batch, stopping)
    done.events = _prune_events(db, retention.events_days * DAY, batch, stopping)
    return done


def _drain(step: Callable[[], int], batch: int, stopping: Callable[[], bool]) -> int:
    """Runs a delete step until it deletes less than a full batch."""
    total = 0
    while not stopping():
        count = step()
        total += count
        if count < batch:
            break
    return total


def _prune_events(db: Database, seconds: float, batch: int,
                  stopping: Callable[[], bool]) -> int:
    """Walks events by id, in windows, until a window holds no old event."""
    after, total = 0, 0
    while not stopping():
        last, deleted, old = db.prune_events(after, seconds, batch)
        total += deleted
        if last is None or old == 0:
            break
        after = last
    return total
