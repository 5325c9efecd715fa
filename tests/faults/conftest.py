"""Fixtures of the fault-injection suite (issue 4); its tools are in faultkit.py.

Every test here is marked ``faults``: ``pytest -m faults`` runs the suite
alone. By default it runs in a short form (part of the default suite and CI);
``CDC_HOOKS_FAULTS=full pytest -m faults`` runs the published form (10,000+
events, 10 SIGKILLs, ...) and, when the whole suite ran and passed, writes
bench/RESULTS-faults.md, the figures of README's "Reliability" table
(CDC_HOOKS_FAULTS_RESULTS=FILE writes them to FILE in any run). Either way
the figures are printed at the end.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from faultkit import FIGURES, FULL, RESULTS_FILE, World, figures_table
from receivers import InProcessRelay, OwnPostgres, RelayProcess, RelayProcesses

from cdc_hooks.config import Config


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if not FIGURES:
        return
    mode = "full" if FULL else "short"
    terminalreporter.section(f"fault-injection figures ({mode} run)")
    terminalreporter.write_line(figures_table(FIGURES))
    # The published file: a whole, passing full run (or an explicit destination).
    partial = bool(config.option.keyword) or any(
        Path(arg.split("::")[0]).is_file() for arg in config.args)
    whole = exitstatus == 0 and not partial
    if (FULL and whole) or os.environ.get("CDC_HOOKS_FAULTS_RESULTS"):
        path = Path(os.environ.get("CDC_HOOKS_FAULTS_RESULTS") or RESULTS_FILE)
        path.write_text(_results_document(mode, exitstatus), encoding="utf-8")
        terminalreporter.write_line(f"written to {path}")


def _results_document(mode: str, exitstatus: int) -> str:
    server = "?"
    dsn = os.environ.get("CDC_HOOKS_TEST_DSN") or "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
    try:
        with psycopg.connect(dsn, connect_timeout=2) as conn:
            server = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
    except psycopg.Error:
        pass
    return (
        "# Fault-injection figures\n\n"
        "Written by the fault-injection suite (tests/faults, issue 4):\n\n"
        "    CDC_HOOKS_FAULTS=full pytest -m faults\n\n"
        f"Run: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {mode} form, "
        f"{'all passed' if exitstatus == 0 else f'pytest exit status {exitstatus}'}; "
        f"Python {platform.python_version()}, PostgreSQL {server}, {os.cpu_count()} CPUs.\n"
        "Events: events the scenario wrote (or deliveries it watched); Faults: faults injected "
        "(kills, restarts, failed attempts); Lost: events that never arrived nor were "
        "dead-lettered on record; Duplicates: extra deliveries (each with its original's "
        "webhook-id and body); Recovery: from the fault's end to the relay working again.\n\n"
        + figures_table(FIGURES) + "\n"
    )


@pytest.fixture
def world(clean_db: str, tmp_path: Path) -> Iterator[World]:
    """The scenario's world on the run's database (see faultkit.World)."""
    scene = World(clean_db, tmp_path)
    yield scene
    scene.close()


@pytest.fixture
def relays(tmp_path: Path) -> Iterator[Callable[..., RelayProcess]]:
    """start(world, wait_connected=True) -> a `cdc-hooks run` process on the world's
    config; its log joins those searched for secrets; killed at teardown if still up."""
    processes = RelayProcesses(tmp_path)

    def start(world: World, wait_connected: bool = True) -> RelayProcess:
        assert world.config is not None
        relay = processes.start(world.config, wait_connected=False)
        world.logs.append(relay.log_path)
        return relay.wait_connected() if wait_connected else relay

    yield start
    processes.cleanup()


@pytest.fixture
def in_process(world: World) -> Iterator[Callable[..., InProcessRelay]]:
    """start(config=None, prepare=None) -> Relay on a thread; prepare(loop) runs first."""
    started: list[InProcessRelay] = []

    def start(config: Config | None = None,
              prepare: Callable[[Any], None] | None = None) -> InProcessRelay:
        relay = InProcessRelay(config or world.config)  # type: ignore[arg-type]
        if prepare is not None:
            prepare(relay._loop)
        started.append(relay.start())
        return relay

    yield start
    for relay in started:
        relay.stop()


@pytest.fixture
def own_world(own_postgres: OwnPostgres, tmp_path: Path) -> Iterator[World]:
    """A world on a PostgreSQL server of the test's own (see own_postgres)."""
    scene = World(own_postgres.dsn, tmp_path)
    yield scene
    scene.close()

