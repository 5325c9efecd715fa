"""What the benchmarks share: named SQL files, scratch databases, CPU of processes.

The benchmarks import it as a sibling module (``python bench/bench_*.py`` puts
bench/ first on sys.path); it imports nothing from cdc_hooks, so that
``bench_relay.py --rev`` can measure a revision that predates it.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

CLK_TCK = os.sysconf("SC_CLK_TCK")
_HEADER = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def named_statements(path: Path) -> dict[str, str]:
    """The statements of a .sql file, each after a ``-- name: NAME`` line."""
    parts = _HEADER.split(path.read_text(encoding="utf-8"))
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


def with_identifiers(text: str, **identifiers: str) -> sql.Composed:
    """A statement with its {placeholders} quoted as identifiers."""
    return sql.SQL(text).format(  # type: ignore[arg-type]
        **{k: sql.Identifier(v) for k, v in identifiers.items()})


@contextmanager
def scratch_database(admin_dsn: str, prefix: str) -> Iterator[str]:
    """Creates a database of this run's own, named prefix_PID_RANDOM, and yields its
    DSN; drops it at the end, even with sessions still open."""
    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(3)}"
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(with_identifiers("CREATE DATABASE {name}", name=name))
    try:
        yield make_conninfo(admin_dsn, dbname=name)
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(with_identifiers("DROP DATABASE IF EXISTS {name} WITH (FORCE)", name=name))


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (0 if it is gone)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK
