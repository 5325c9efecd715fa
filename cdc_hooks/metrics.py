"""Prometheus metrics: what the relay counts in-process, and the backlog the
database holds, read at scrape time.

The relay calls the small functions below (``dispatched``, ``attempt``,
``connection_lost``, ``connected``) on its hot path. They only add to plain
dicts and lists of this process: no prometheus_client objects (whose values
take a lock per increment), no locks, no labels beyond hook, listener and
outcome. A Collector turns them into metric families when /metrics is
scraped; another runs one named query for the database gauges.

Served by the web app (``/metrics``, cdc_hooks.web.metrics) and, without the
web UI, by ``MetricsServer`` (``cdc-hooks run --metrics HOST:PORT``): a tiny
aiohttp server in the relay's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import psycopg
from aiohttp import web
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from .binding import http_url, is_loopback, listen, parse_bind
from .capturing import HookCapture
from .config import WEB_TOKEN_ENV, Config, web_token
from .db import Database
from .errors import ConfigError, DatabaseUnavailable
from .guesses import GuessLimit, TooManyGuesses
from .rows import ListenerBacklog

T = TypeVar("T")
log = logging.getLogger("cdc_hooks.metrics")

# Upper bounds (seconds) of the attempt duration buckets: 1 ms to 10 s.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
OUTCOMES = {"delivered": "delivered", "pending": "retry", "dead": "dead"}  # relay status -> label
LOOP_LAG_INTERVAL = 1.0  # seconds between loop lag samples


# In-process counters (the relay's hot path) --------------------------------------


class _ListenerStats:
    """One listener's attempts; the histogram's last slot counts those above 10 s."""

    __slots__ = ("buckets", "outcomes", "retries", "seconds")

    def __init__(self) -> None:
        self.outcomes = {"delivered": 0, "retry": 0, "dead": 0}
        self.retries = 0
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.seconds = 0.0


class _Stats:
    def __init__(self) -> None:
        self.events: dict[str, int] = {}
        self.listeners: dict[tuple[str, int], _ListenerStats] = {}
        self.reconnects = 0
        # (hook, listener) whose shared circuit is open, as this worker last saw it: 1
        self.open_circuits: dict[tuple[str, int], int] = {}
        self.connected: bool | None = None  # None: no relay in this process
        self.loop_lag: float | None = None


STATS = _Stats()
# The latest counters of the other workers of `run --workers N`, by worker number
# (relay/workers.py): /metrics adds them to this process's.
WORKERS: dict[int, _Stats] = {}


def _all_workers() -> _Stats:
    if not WORKERS:
        return STATS
    parts = [STATS, *list(WORKERS.values())]
    total = _Stats()
    for part in parts:
        for hook, count in list(part.events.items()):
            total.events[hook] = total.events.get(hook, 0) + count
        for key, stats in list(part.listeners.items()):
            into = total.listeners.setdefault(key, _ListenerStats())
            for outcome, count in stats.outcomes.items():
                into.outcomes[outcome] += count
            into.retries += stats.retries
            into.buckets = [a + b for a, b in zip(into.buckets, stats.buckets, strict=True)]
            into.seconds += stats.seconds
        for key in list(part.open_circuits):
            total.open_circuits[key] = 1  # one circuit, shared by every worker
        total.reconnects += part.reconnects
    connected = [p.connected for p in parts if p.connected is not None]
    total.connected = all(connected) if connected else None
    lags = [p.loop_lag for p in parts if p.loop_lag is not None]
    total.loop_lag = max(lags) if lags else None
    return total


def dispatched(hooks: Iterable[str]) -> None:
    """Events were recorded (with their deliveries): the hook of each."""
    for hook, count in Counter(hooks).items():  # Counter counts in C
        STATS.events[hook] = STATS.events.get(hook, 0) + count


def attempt(hook: str, listener_id: int, attempt_number: int, status: str, duration_ms: float) -> None:
    """One attempt's result; status is the delivery's new status (pending = will retry)."""
    stats = STATS.listeners.get((hook, listener_id))
    if stats is None:
        stats = STATS.listeners[(hook, listener_id)] = _ListenerStats()
    stats.outcomes[OUTCOMES[status]] += 1
    if attempt_number > 1:
        stats.retries += 1
    seconds = duration_ms / 1000.0
    stats.buckets[bisect_left(BUCKETS, seconds)] += 1
    stats.seconds += seconds


def circuit_opened(hook: str, listener_id: int) -> None:
    """A listener's circuit opened (relay/circuit.py)."""
    STATS.open_circuits[(hook, listener_id)] = 1


def circuit_closed(listener_id: int) -> None:
    """A listener's circuit closed, or the listener is gone."""
    for key in [k for k in STATS.open_circuits if k[1] == listener_id]:
        del STATS.open_circuits[key]


def connection_lost() -> None:
    """The relay's database session failed; it reconnects with backoff."""
    STATS.reconnects += 1
    STATS.connected = False


def connected() -> None:
    STATS.connected = True


class LoopLag:
    """Samples how late the event loop runs a callback scheduled every second:
    a busy loop (CPU-bound matching, a blocking call) delays every request."""

    def __init__(self, interval: float = LOOP_LAG_INTERVAL) -> None:
        self.interval = interval
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> LoopLag:
        self._schedule(asyncio.get_running_loop())
        return self

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        due = loop.time() + self.interval
        self._handle = loop.call_at(due, self._tick, loop, due)

    def _tick(self, loop: asyncio.AbstractEventLoop, due: float) -> None:
        STATS.loop_lag = max(0.0, loop.time() - due)
        self._schedule(loop)


def watch_loop_lag() -> LoopLag:
    """Starts sampling the running loop's lag; stop() the result when done."""
    return LoopLag().start()


# Collectors ----------------------------------------------------------------------


class RelayCollector(Collector):
    """The in-process counters, read at scrape time (possibly on another thread:
    the snapshots are C-level copies, atomic under the GIL)."""

    def collect(self) -> Iterator[Any]:
        totals = _all_workers()
        yield _counter("events_dispatched", "Events recorded from captured changes, by hook",
                       ["hook"], [([h], n) for h, n in list(totals.events.items())])
        listeners = [([hook, str(lid)], stats) for (hook, lid), stats in list(totals.listeners.items())]
        yield _counter("deliveries", "Delivery attempt results: delivered, retry (failed, "
                       "retried later), dead (failed, no retries left)", ["hook", "listener", "outcome"],
                       [([*labels, o], n) for labels, s in listeners for o, n in s.outcomes.items()])
        yield _counter("retries", "Attempts that were retries (attempt 2 and later)",
                       ["hook", "listener"], [(labels, s.retries) for labels, s in listeners])
        yield _counter("dead_letters", "Deliveries that failed for good (dead letters)",
                       ["hook", "listener"], [(labels, s.outcomes["dead"]) for labels, s in listeners])
        yield _attempt_histogram(listeners)
        circuits = GaugeMetricFamily(
            "cdc_hooks_listener_circuit_open", "1 while the listener's circuit breaker is open: its "
            "due deliveries wait for a probe, without spending an attempt",
            labels=["hook", "listener"])
        open_circuits = {(hook, str(lid)): n  # a C-level copy first, as the snapshots above
                         for (hook, lid), n in list(totals.open_circuits.items())}
        for hook, listener_id in sorted({(h, lid) for (h, lid), _ in listeners} | open_circuits.keys()):
            circuits.add_metric([hook, listener_id], open_circuits.get((hook, listener_id), 0))
        yield circuits
        yield _counter("database_reconnects", "Relay database sessions lost, then reconnected with "
                       "backoff (each failed attempt counts)", [], [([], totals.reconnects)])
        yield from _relay_gauges(totals)


def _counter(name: str, documentation: str, labels: list[str],
             samples: list[tuple[list[str], float]]) -> CounterMetricFamily:
    family = CounterMetricFamily(f"cdc_hooks_{name}", documentation, labels=labels)
    for values, value in samples:
        family.add_metric(values, value)
    return family


def _attempt_histogram(listeners: list[tuple[list[str], _ListenerStats]]) -> HistogramMetricFamily:
    family = HistogramMetricFamily("cdc_hooks_attempt_duration_seconds",
                                   "Duration of delivery attempts (request and response)",
                                   labels=["hook", "listener"])
    bounds = [repr(b) for b in BUCKETS] + ["+Inf"]
    for labels, stats in listeners:
        counts, total = list(stats.buckets), 0
        cumulative = []
        for bound, count in zip(bounds, counts, strict=True):
            total += count
            cumulative.append((bound, total))
        family.add_metric(labels, cumulative, stats.seconds)
    return family


def _relay_gauges(stats: _Stats) -> Iterator[GaugeMetricFamily]:
    if stats.connected is not None:
        yield GaugeMetricFamily("cdc_hooks_relay_database_connected",
                                "1 while the relay's database sessions are up (every worker's)",
                                value=int(stats.connected))
    if stats.loop_lag is not None:
        yield GaugeMetricFamily("cdc_hooks_relay_loop_lag_seconds",
                                "How late the relay's event loop ran its latest 1 s timer "
                                "(the latest worst of the workers)",
                                value=stats.loop_lag)


class BacklogCollector(Collector):
    """The database's gauges, from named queries per scrape (``fetch`` runs
    Database.metrics_backlog, ``capturing`` Database.hooks_capturing). A failed
    query leaves them out and says cdc_hooks_database_up 0: the scrape itself
    still succeeds."""

    def __init__(self, fetch: Callable[[], list[ListenerBacklog]],
                 capturing: Callable[[], list[HookCapture]] | None = None) -> None:
        self.fetch = fetch
        self.capturing = capturing

    def collect(self) -> Iterator[Any]:
        try:
            rows = self.fetch()
            hooks = self.capturing() if self.capturing is not None else None
        except (DatabaseUnavailable, psycopg.Error) as exc:
            log.debug("metrics: backlog query failed: %s", exc)
            yield _database_up(0)
            return
        yield _database_up(1)
        yield from _backlog_families(rows)
        if hooks is not None:
            yield _capturing_family(hooks)


def _capturing_family(hooks: list[HookCapture]) -> GaugeMetricFamily:
    family = GaugeMetricFamily("cdc_hooks_hook_capturing", "1 while the hook's triggers are on its "
                               "table and every partition, enabled; 0: its writes commit uncaptured "
                               "(table gone, or dropped and created again)", labels=["hook"])
    for state in hooks:
        family.add_metric([state.hook], int(state.capturing))
    return family


def _database_up(value: int) -> GaugeMetricFamily:
    return GaugeMetricFamily("cdc_hooks_database_up", "1 if the database answered the backlog query "
                             "(0: unreachable, or cdc_hooks not installed)", value=value)


def _backlog_families(rows: list[ListenerBacklog]) -> Iterator[GaugeMetricFamily]:
    outbox_rows, outbox_age = rows[0].outbox_rows, rows[0].outbox_oldest_age
    yield GaugeMetricFamily("cdc_hooks_outbox_rows", "Captured statements (chunks of up to 1000 "
                            "changed rows) waiting to be dispatched", value=outbox_rows)
    yield GaugeMetricFamily("cdc_hooks_outbox_oldest_age_seconds",
                            "Age of the oldest change waiting to be dispatched (0: none)",
                            value=outbox_age or 0.0)
    pending = GaugeMetricFamily("cdc_hooks_deliveries_pending",
                                "Deliveries not yet delivered or dead (queued, retrying, paused)",
                                labels=["hook", "listener"])
    oldest = GaugeMetricFamily("cdc_hooks_oldest_pending_age_seconds",
                               "Age of the change behind a listener's oldest pending delivery (0: none)",
                               labels=["hook", "listener"])
    state = GaugeMetricFamily("cdc_hooks_listener_state", "1 for the listener's state",
                              labels=["hook", "listener", "state"])
    for row in rows:
        if row.id is None or row.hook is None:  # no listeners: the outbox figures only
            continue
        labels = [row.hook, str(row.id)]
        pending.add_metric(labels, row.pending)
        oldest.add_metric(labels, row.oldest_pending_age or 0.0)
        for name in ("active", "paused", "disabled"):
            state.add_metric([*labels, name], int(row.state == name))
    yield from (pending, oldest, state)


class OneConnection:
    """The database session of a standalone metrics server: kept open across
    scrapes, reopened (once, at once) after a failure such as a restart."""

    def __init__(self, dsn: str | None) -> None:
        self.dsn = dsn
        self._db: Database | None = None
        self._lock = threading.Lock()  # scrapes run on worker threads; not the relay's path

    def metrics_backlog(self) -> list[ListenerBacklog]:
        return self._read(Database.metrics_backlog)

    def hooks_capturing(self) -> list[HookCapture]:
        return self._read(Database.hooks_capturing)

    def _read(self, method: Callable[[Database], T]) -> T:
        with self._lock:
            try:
                return method(self._database())
            except psycopg.OperationalError:  # a stale connection: one fresh try
                self.close()
                return method(self._database())

    def _database(self) -> Database:
        if self._db is None:
            self._db = Database.connect(self.dsn)
        return self._db

    def close(self) -> None:
        if self._db is not None:
            with contextlib.suppress(psycopg.Error):
                self._db.close()
            self._db = None


def registry(fetch: Callable[[], list[ListenerBacklog]],
             capturing: Callable[[], list[HookCapture]] | None = None) -> CollectorRegistry:
    """The metrics of this process: relay counters, database gauges, process figures."""
    collectors = CollectorRegistry(auto_describe=False)
    collectors.register(RelayCollector())
    collectors.register(BacklogCollector(fetch, capturing))
    ProcessCollector(registry=collectors)
    return collectors


def render(collectors: CollectorRegistry) -> bytes:
    """The text exposition format (blocking: it queries the database)."""
    return generate_latest(collectors)


# Access --------------------------------------------------------------------------


def metrics_token(config: Config) -> str | None:
    """The token /metrics wants, or None when [web] metrics_public = true."""
    if config.web.metrics_public:
        return None
    return web_token(config)


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header, else None."""
    scheme, _, given = (header or "").partition(" ")
    return given.strip() if scheme.lower() == "bearer" else None


# Standalone server (run --metrics) -----------------------------------------------


class MetricsServer:
    """/metrics on a socket bound at construction (a bad or busy address fails
    before the relay starts); ``await serve()`` in the relay's loop until ``stop()``."""

    def __init__(self, config: Config, bind: str) -> None:
        host, port = parse_bind(bind, "--metrics", "127.0.0.1:9464")
        self.token = metrics_token(config)
        if self.token is None and not config.web.metrics_public and not is_loopback(host):
            raise ConfigError(f"refusing to serve metrics on {host} without a token: set [web] token "
                              f"or {WEB_TOKEN_ENV}, or [web] metrics_public = true (or bind to 127.0.0.1)")
        self.sessions = OneConnection(config.dsn)
        self.collectors = registry(self.sessions.metrics_backlog, self.sessions.hooks_capturing)
        self.socket = listen(host, port)
        self.host, self.port = host, self.socket.getsockname()[1]
        self._stopping = asyncio.Event()
        self.guesses = GuessLimit()

    @property
    def url(self) -> str:
        return http_url(self.host, self.port, "/metrics")

    async def serve(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            await web.SockSite(runner, self.socket).start()
            log.info("metrics on %s", self.url)
            await self._stopping.wait()
        finally:
            await runner.cleanup()
            self.sessions.close()

    def stop(self) -> None:
        self._stopping.set()

    async def _metrics(self, request: web.Request) -> web.Response:
        try:
            allowed = self.token is None or self.guesses.check(
                request.remote or "unknown", bearer(request.headers.get("Authorization")), self.token)
        except TooManyGuesses as exc:
            return web.Response(status=429, text=f"{exc}\n", headers={"Retry-After": str(exc.retry_after)})
        if not allowed:
            return web.Response(status=401, text="missing or wrong token: send Authorization: Bearer TOKEN\n",
                                headers={"WWW-Authenticate": "Bearer"})
        body = await asyncio.to_thread(render, self.collectors)  # the backlog query blocks
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

