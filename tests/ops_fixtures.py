"""Fixtures of the operations tests (metrics, logs), loaded with
``pytest_plugins = ["ops_fixtures"]``; helpers are in ops.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from ops import DELIVERY, HOOKS, TABLE, CliRelay
from receivers import wait_until

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
def start_relay(tmp_path: Path) -> Iterator[Callable[..., CliRelay]]:
    """start_relay(config, *run_args, global_args=(), env=None) -> a connected relay process."""
    started: list[CliRelay] = []

    def start(config: Config | Path, *run_args: str, global_args: tuple[str, ...] = (),
              env: dict[str, str] | None = None) -> CliRelay:
        path = config.path if isinstance(config, Config) else config
        assert path is not None
        relay = CliRelay(path, tmp_path / f"relay-{len(started)}.log", global_args, run_args, env).start()
        started.append(relay)
        wait_until(lambda: "relay connected" in relay.log() or not relay.running, message="relay connected")
        assert relay.running, relay.log()
        return relay

    yield start
    for relay in started:
        relay.cleanup()
