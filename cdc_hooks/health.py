"""Listener health: disable a listener that failed every attempt for days.

The relay checks every [retention] interval (with pruning, one relay at a
time). Each check records, per active listener, whether a delivery succeeded
since the previous check (which ends a failure streak) or deliveries are
failing (one waits for a retry, one was given up, or its circuit is open); ``failing_since`` is when
a check first saw the streak. A listener is disabled when, at a check:

- it is failing still,
- its streak began at least [delivery] disable_after_days ago, and
- it was not created, resumed or edited within that time either.

Disabling sets state 'disabled' with a reason (shown by ``listeners list`` and
``status``) and sends an event on the built-in custom hook
``cdc_hooks.listener_disabled`` ({listener_id, hook, url, reason}), in the same
transaction. Its pending deliveries are kept; ``listeners resume`` sends them.
A receiver answering 410 Gone is disabled at once by the relay, with the same
event.
"""

from __future__ import annotations

from dataclasses import dataclass

from .db import Database
from .retention import DAY


@dataclass(frozen=True)
class Disabled:
    listener_id: int
    hook: str
    url: str
    reason: str
    event_id: int | None  # the cdc_hooks.listener_disabled event (None: hook not installed)


def reason_for(days: float) -> str:
    return f"every attempt failed for {days:g} day{'' if days == 1 else 's'}"


def check(db: Database, disable_after_days: float) -> list[Disabled]:
    """Records each active listener's health; disables those failing too long.
    disable_after_days 0: record only, never disable."""
    db.check_listener_health()
    if not disable_after_days:
        return []
    rows = db.disable_failing_listeners(disable_after_days * DAY, reason_for(disable_after_days))
    return [Disabled(r.id, r.hook, r.url, r.disabled_reason, r.event_id) for r in rows]
