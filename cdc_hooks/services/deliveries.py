"""Deliveries: the listing, one delivery with its attempts, and redelivery, as
every interface (CLI, REST API, pages, Python client) reads and asks for them."""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from .. import jsoncodec
from ..db import Database
from ..errors import AlreadyQueued, NotFound
from ..rows import Attempt, Delivery
from ..urls import redact_url
from .listeners import get_listener

STATUSES = ("pending", "delivered", "dead")


@dataclass(frozen=True)
class DeliveryPage:
    items: list[Delivery]  # newest first
    next_before: int | None  # the cursor of the next (older) page; None at the end


@dataclass(frozen=True)
class DeliveryDetail(Delivery):
    url: str | None  # its listener's, credentials masked (None: the listener is gone)
    webhook_id: str
    body: dict[str, Any]  # the JSON POSTed, numbers exact (jsoncodec)
    attempt_log: list[Attempt]


def page(db: Database, *, limit: int = 50, status: str | None = None,
         listener_id: int | None = None, hook: str | None = None, since: datetime | None = None,
         until: datetime | None = None, before: int | None = None) -> DeliveryPage:
    """Up to `limit` deliveries matching the filters, newest first; `before` (a
    delivery id, a page's next_before) continues a listing."""
    rows = db.deliveries(status=status, listener_id=listener_id, hook=hook, since=since,
                         until=until, before=before, limit=limit + 1)
    items = rows[:limit]
    return DeliveryPage(items, items[-1].id if len(rows) > limit else None)


def get_delivery(db: Database, delivery_id: int) -> DeliveryDetail:
    stored = db.delivery(delivery_id)
    if stored is None:
        raise NotFound(f"no delivery with id {delivery_id}")
    listed = {f.name: getattr(stored, f.name) for f in fields(Delivery)}
    return DeliveryDetail(
        **listed, url=None if stored.url is None else redact_url(stored.url),
        webhook_id=f"msg_{stored.event_id}_{stored.listener_id}",
        body=jsoncodec.loads(stored.body), attempt_log=db.delivery_attempts(delivery_id))


def redeliver(db: Database, delivery_id: int) -> list[int]:
    """Queues a finished delivery again (same webhook-id): NotFound if there is no
    such delivery, AlreadyQueued if it is pending (it will be sent anyway)."""
    queued = db.redeliver(delivery_id=delivery_id, only_dead=False)
    if not queued:
        current = get_delivery(db, delivery_id)  # NotFound if it is not there at all
        raise AlreadyQueued(f"delivery {delivery_id} is {current.status}: it is already queued")
    return queued


def redeliver_dead(db: Database, *, listener_id: int | None = None,
                   since: datetime | None = None) -> list[int]:
    """Every dead letter (of one listener, created since a time, if given) queued again;
    NotFound for a listener that does not exist."""
    if listener_id is not None:
        get_listener(db, listener_id)
    return db.redeliver(listener_id=listener_id, since=since, only_dead=True)
