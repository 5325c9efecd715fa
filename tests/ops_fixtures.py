"""Fixtures of the operations tests (metrics, logs), loaded with
``pytest_plugins = ["ops_fixtures"]``; helpers are in ops.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from ops import DELIVERY, HOOKS, TABLE
from receivers import RelayProcess, RelayProcesses

from cdc_hooks import install as installer
from cdc_hooks.config import Config


@pytest.fixture
def setup(conn: psycopg.Connection[Any], make_config: Callable[..., Config]) -> Callable[..., Config]:
    """setup(extra_toml="") -> Config: the person table and its hook installed."""

    def make(extra: str = "") -> Config:
        conn.execute(TABLE)
        config = make_config(HOOKS + DELIVERY + extra)
        installer.install(config)
        return config

    return make


@pytest.fixture
def start_relay(tmp_path: Path) -> Iterator[Callable[..., RelayProcess]]:
    """start_relay(config, *run_args, global_args=(), env=None) -> a connected relay process."""
    processes = RelayProcesses(tmp_path)
    yield processes.start
    processes.cleanup()
