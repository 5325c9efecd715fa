"""Database sessions for requests, from a small pool.

Opening a connection costs several times what an API request's queries take,
so requests borrow open ones (figures: bench/RESULTS-relay.md, "Figures behind
design choices"). Connections are checked before use, so a database restart
costs a reconnect, not an error.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

from fastapi import Depends, Request
from psycopg_pool import ConnectionPool, PoolTimeout

from ..db import Database, connect, required_dsn, session_options
from ..dsn import check_dsn, describe_dsn
from ..errors import DatabaseUnavailable

BIGINT = 2**63 - 1  # ids are bigint: a larger one in a path or query is refused, not looked up
POOL_SIZE = 8  # FastAPI's thread pool runs 40 sync endpoints at most; 8 keep up with a UI


class Connections:
    def __init__(self, dsn: str | None, *, wait: float = 5.0) -> None:
        self.dsn = dsn
        self.wait = wait  # seconds a request waits for a connection before a 503
        self._pool: ConnectionPool | None = None
        self._lock = threading.Lock()

    def _opened(self) -> ConnectionPool:
        with self._lock:
            if self._pool is None:
                dsn = required_dsn(self.dsn)
                # A malformed DSN is refused here: the pool would log libpq's words on it.
                check_dsn(dsn)
                self._pool = ConnectionPool(
                    dsn, min_size=1, max_size=POOL_SIZE, open=False, timeout=self.wait,
                    check=ConnectionPool.check_connection, name="cdc-hooks-web",
                    kwargs=session_options())
                self._pool.open(wait=False)
            return self._pool

    @contextmanager
    def database(self) -> Iterator[Database]:
        try:
            with self._opened().connection() as conn:
                yield Database(conn)
        except PoolTimeout:
            raise self._unavailable() from None

    def _unavailable(self) -> DatabaseUnavailable:
        try:  # a direct attempt says why (refused, unknown host, bad password)
            connect(self.dsn).close()
        except DatabaseUnavailable as exc:
            return exc
        return DatabaseUnavailable(f"no database connection to {describe_dsn(self.dsn or '')} "
                                   f"free within {self.wait:g} s")

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.close()
                self._pool = None


def database(request: Request) -> Iterator[Database]:
    """A pooled connection for the request: the dependency of API routes and pages."""
    with request.app.state.web.connections.database() as db:
        yield db


Db = Annotated[Database, Depends(database)]
