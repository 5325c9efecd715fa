"""The periodic upkeep: listener health, then retention.

Relays run a round every [retention] interval, one relay at a time (a session
advisory lock; a relay finding it taken skips its round), on a synchronous
connection of its own in a worker thread, so a long prune never delays
dispatch or delivery. ``cdc-hooks prune`` runs a round by hand. Health goes
first: a success is seen before pruning could remove it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from . import health, retention
from .config import Config
from .db import Database

log = logging.getLogger("cdc_hooks.maintenance")


@dataclass(frozen=True)
class Round:
    disabled: list[health.Disabled]
    pruned: retention.Pruned


def run(config: Config, stopping: Callable[[], bool] = lambda: False) -> Round | None:
    """One round on a connection of its own; None if another process is at it."""
    with Database.connect(config.dsn) as db:
        return run_on(db, config, stopping)


def run_on(db: Database, config: Config,
           stopping: Callable[[], bool] = lambda: False) -> Round | None:
    if not db.try_lock_maintenance():
        return None
    try:
        disabled = health.check(db, config.delivery.disable_after_days)
        for gone in disabled:
            log.warning("listener %s disabled: %s", gone.listener_id, gone.reason,
                        extra={"listener_id": gone.listener_id, "status": "disabled"})
        pruned = retention.prune_locked(db, config.retention, stopping)
    finally:
        db.unlock_maintenance()
    if any(vars(pruned).values()):
        log.info("pruned %s", pruned, extra=vars(pruned))
    return Round(disabled, pruned)
