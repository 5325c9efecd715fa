"""The relay's periodic upkeep: listener health, then retention.

Runs every [retention] interval in one relay at a time (a session advisory
lock, skipped when another relay or `cdc-hooks prune` holds it), on its own
synchronous connection in a worker thread, so a long prune never delays
dispatch or delivery. Health goes first: a success is seen before pruning
could remove it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from . import health, retention
from .config import Config
from .db import Database

log = logging.getLogger("cdc_hooks.maintenance")


def run(config: Config, stopping: Callable[[], bool] = lambda: False) -> retention.Pruned | None:
    """One round of upkeep; None if another process is at it."""
    with Database.connect(config.dsn) as db:
        if not db.try_lock_maintenance():
            return None
        try:
            for gone in health.check(db, config.delivery.disable_after_days):
                log.warning("listener %s disabled: %s", gone.listener_id, gone.reason,
                            extra={"listener_id": gone.listener_id, "status": "disabled"})
            pruned = retention.prune_locked(db, config.retention, stopping)
        finally:
            db.unlock_maintenance()
    if any(vars(pruned).values()):
        log.info("pruned %s", pruned, extra=vars(pruned))
    return pruned
