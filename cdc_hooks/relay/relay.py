"""The relay: outbox -> events -> matching listeners -> signed POSTs.

Three loops share one process, each on its own connection:
- dispatch: takes outbox rows (one dispatcher at a time across relays),
  expands them into events, matches listeners and records deliveries, all in
  one short transaction; when idle it registers as a waiter and sleeps on
  LISTEN until a trigger notifies (or a fallback poll).
- claim: leases due deliveries per listener within the concurrency limits and
  starts an HTTP task for each; no transaction stays open across a request.
- record: writes attempt results in batches (one statement per batch).

A database outage ends the loops; the relay reconnects with backoff while
requests in flight finish, and their results wait for the next connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections import defaultdict, deque
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from typing import Any

import psycopg

from .. import capturing, jsoncodec, logs, maintenance, metrics
from ..config import Config
from ..db import InstalledHook, RelayStore, migrations
from ..dsn import check_dsn, describe_dsn, redact
from ..errors import CdcHooksError, ConfigError, DatabaseUnavailable
from ..listeners import takes
from ..match import deepmatch, rules_from_json
from ..netpolicy import NetworkPolicy
from ..signing import secret_key
from .circuit import Circuit, counts_as_failure
from .events import ALL_ROWS, expand
from .http import Response, Sender, Target
from .retry import classify
from .workers import Workers, report_metrics, share

log = logging.getLogger("cdc_hooks.relay")

# Events, or deliveries if more, per dispatch: bounds memory and transaction length,
# and how long the first deliveries of a burst wait for their transaction.
WORK_PER_DISPATCH = 5000
IDLE_POLL = 1.0  # seconds: fallback when a wake-up is missed or a retry falls due
RELOAD_EVERY = 1.0  # seconds: listener and hook changes reach the relay this fast
RECORD_BATCH = 1000
RECORD_GATHER = 0.01  # seconds a batch of results may gather before it is recorded
PREFETCH = 8  # deliveries claimed ahead, as a multiple of the concurrency
STATISTICS_EVERY = 5000  # events dispatched between checks of the planner's statistics
MAX_BACKOFF = 10.0
CAPTURE_CHECK_EVERY = 5.0  # seconds between checks that each hook's triggers are in place
# What a relay's statements raise once the cdc_hooks schema (or part of it) is dropped.
SCHEMA_GONE = (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedFunction,
               psycopg.errors.InvalidSchemaName)


@dataclass(frozen=True)
class Listener:
    id: int
    hook: str
    url: str
    rules: dict[str, Any]
    target: Target  # URL, keys and headers the sender uses
    active: bool  # False: paused (deliveries are recorded and held)
    backfill: bool = True  # False: opted out of backfill ('read') events
    # Its event kinds and changed-column filter (None: none), as sets at load, and
    # whether it has either: an unfiltered listener costs dispatch one test.
    kinds: frozenset[str] | None = None
    changed: frozenset[str] | None = None
    filtered: bool = False


@dataclass(slots=True)  # not frozen: a frozen __init__ costs 6x, and this is per attempt
class Result:
    delivery_id: int
    attempt: int
    listener_id: int
    status: str
    retry_in: float | None
    code: int | None
    error: str | None
    duration_ms: float
    response: str | None
    gone: bool


class Relay:
    def __init__(self, config: Config) -> None:
        if not config.dsn:
            raise DatabaseUnavailable(
                "no database configured: set [database] dsn in the config or CDC_HOOKS_DSN")
        check_dsn(config.dsn)  # a malformed DSN is not an outage to retry forever
        self.config = config
        self.dsn = config.dsn
        self.delivery = config.delivery
        # Long enough for a delivery to wait its turn in the prefetch window, then be sent.
        self.lease = self.delivery.timeout * (PREFETCH + 1) + 30.0
        self.hooks: dict[str, InstalledHook] = {}
        self.listeners: dict[int, Listener] = {}
        self._compiled: dict[tuple[int, str], dict[str, Any]] = {}
        self._loaded_at = 0.0
        self._config_version: int | None = None
        self._in_flight: dict[int, int] = defaultdict(int)
        # Leased deliveries waiting to be sent, per listener:
        # (delivery_id, event_id, listener_id, attempt, body, leased_at).
        self._queued: dict[int, deque[tuple[Any, ...]]] = defaultdict(deque)
        self._renewed_at = time.monotonic()
        self._released: list[int] = []  # claimed but not sent: due again at once
        self._room = asyncio.Event()
        self._claimable = True  # deliveries may be due that no relay has claimed
        self._turn = 0  # rotates the listeners' order in claims
        self._until_due = IDLE_POLL
        self._unregistering: asyncio.Task[Any] | None = None
        # Admitted deliveries for the sender pool: (listener, delivery_id, event_id,
        # attempt, body). A fixed pool, not a task per delivery: creating and ending
        # a task cost a sixth of a request's CPU.
        self._sends: asyncio.Queue[tuple[Listener, int, int, int, str]] = asyncio.Queue()
        self._senders: list[asyncio.Task[None]] = []
        self._results: asyncio.Queue[Result] = asyncio.Queue()
        self._unrecorded: list[Result] = []
        self._work_ready = asyncio.Event()
        self._stopping = asyncio.Event()
        self._outage_since: float | None = None
        self._connected_at: float | None = None
        self._gone: set[int] = set()  # answered 410: sent nothing more until disabled on record
        self._circuits: dict[int, Circuit] = {}  # listeners whose last requests failed
        self.delivered = 0
        self.sender: Sender | None = None
        self._capture = capturing.Watch()
        self.check_capture = asyncio.Event()  # set: check the hooks' triggers now

    # Lifecycle -----------------------------------------------------------

    @property
    def stopping(self) -> asyncio.Event:
        """Set once stop() was called."""
        return self._stopping

    def stop(self) -> None:
        """Stop taking work; in-flight requests finish within a bound."""
        self._stopping.set()
        self._work_ready.set()

    async def run(self) -> None:
        """Runs until stop(); survives database outages."""
        self.sender = Sender(
            NetworkPolicy(self.delivery.allow_private_networks, self.delivery.allowed_networks),
            timeout=self.delivery.timeout, max_response_bytes=self.delivery.max_response_bytes,
            connections=self.delivery.concurrency,
        )
        backoff = 0.5
        lag = metrics.watch_loop_lag()
        self._senders = [asyncio.create_task(self._send_loop())
                         for _ in range(self.delivery.concurrency)]
        try:
            while not self._stopping.is_set():
                gone: BaseException | None = None
                try:
                    await self._session()
                    backoff = 0.5
                except* SCHEMA_GONE as group:
                    gone = group.exceptions[0]
                except* (psycopg.OperationalError, psycopg.InterfaceError) as group:
                    if self._connected_at is not None and \
                            time.monotonic() - self._connected_at > MAX_BACKOFF:
                        backoff = 0.5  # up for a good while: a new outage, retried soon
                    self._connected_at = None
                    self._note_outage(group.exceptions[0])
                    await self._sleep(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF)
                if gone is not None:  # dropped under us: say so and stop, loudly
                    raise CdcHooksError(
                        f"cdc_hooks is no longer installed in {describe_dsn(self.dsn)} "
                        f"({_first_line(gone)}): changes are not captured; run cdc-hooks install")
        finally:
            lag.stop()
            await self._finish_in_flight()
            await asyncio.gather(*self._senders, return_exceptions=True)
            await self.sender.close()

    async def _session(self) -> None:
        stores = [await RelayStore.connect(self.dsn) for _ in range(4)]
        listen, dispatch, claim, record = stores
        try:
            await _require_own_sessions(self.dsn, listen, dispatch)
            for store in stores:
                await store.tune_session()
            await listen.run("listen_events")
            await listen.run("listen_listeners")
            if not (await dispatch.run("schema_exists"))[0][0]:
                raise CdcHooksError(f"cdc_hooks is not installed in {describe_dsn(self.dsn)}: "
                                    "run cdc-hooks install")
            version, needed = (await dispatch.run("schema_version"))[0][0], migrations()[-1][0]
            if version < needed:  # this relay's statements need the newer tables
                raise CdcHooksError(
                    f"the cdc_hooks schema in {describe_dsn(self.dsn)} is at version {version}, "
                    f"this relay needs version {needed}: run cdc-hooks install to upgrade it "
                    "(undelivered events are kept)")
            await dispatch.run("prune_waiters")
            await self._reload(dispatch, force=True)
            self._note_connected()
            async with asyncio.TaskGroup() as group:
                group.create_task(self._dispatch_loop(listen, dispatch))
                group.create_task(self._claim_loop(claim))
                group.create_task(self._record_loop(record))
                group.create_task(self._until_stopped())
                group.create_task(self._maintenance_loop())
                group.create_task(self._capture_loop(record))
        except* _Stopped:
            await self._finish_in_flight()
            with contextlib.suppress(psycopg.Error):
                await self._flush(record)
                await listen.run("unregister_waiter")
        finally:
            await self._end_unregistering()
            for store in stores:
                with contextlib.suppress(Exception):
                    await store.close()

    async def _maintenance_loop(self) -> None:
        """Listener health and retention every [retention] interval (maintenance.py),
        in a thread on its own connection; a failure waits for the next round."""
        interval = self.config.retention.interval
        while interval:
            try:
                await asyncio.to_thread(maintenance.run, self.config, self._stopping.is_set)
            except (psycopg.Error, CdcHooksError) as exc:
                log.warning("maintenance failed, next try in %g s: %s", interval, _first_line(exc))
            await self._sleep(interval)

    async def _capture_loop(self, store: RelayStore) -> None:
        """Whether every hook still captures (capturing.py), every CAPTURE_CHECK_EVERY
        seconds or when check_capture is set; on the record connection, which is
        free between batches."""
        while True:
            self._capture.note(capturing.from_rows(await store.run("hooks_capturing")))
            await _wait(self.check_capture, CAPTURE_CHECK_EVERY)
            self.check_capture.clear()

    async def _until_stopped(self) -> None:
        await self._stopping.wait()
        raise _Stopped

    async def _sleep(self, seconds: float) -> None:
        await _wait(self._stopping, seconds)

    def _note_outage(self, exc: BaseException) -> None:
        metrics.connection_lost()
        if self._outage_since is None:  # log each outage once, not every retry
            self._outage_since = time.monotonic()
            log.warning("database at %s unavailable (%s); reconnecting with backoff",
                        describe_dsn(self.dsn), redact(self.dsn, _first_line(exc)))

    def _note_connected(self) -> None:
        metrics.connected()
        self._connected_at = time.monotonic()
        if self._outage_since is not None:
            log.warning("database reachable again after %.1f s",
                        time.monotonic() - self._outage_since)
            self._outage_since = None
        else:
            log.info("relay connected to %s", describe_dsn(self.dsn))

    # Hooks and listeners ---------------------------------------------------

    async def _reload(self, store: RelayStore, *, force: bool = False) -> None:
        if not force and time.monotonic() - self._loaded_at < RELOAD_EVERY:
            return
        self._loaded_at = time.monotonic()
        hooks = await store.run("installed_hooks")
        self.hooks = {r[0]: InstalledHook.from_row(r) for r in hooks}
        listeners = {}
        for listener_id, hook, url, match_text, secret, state, backfill, kinds, changed, *sending in \
                await store.active_listeners():
            try:
                rules = self._compiled.get((listener_id, match_text))
                if rules is None:
                    rules = rules_from_json(jsoncodec.loads(match_text))
                    self._compiled[(listener_id, match_text)] = rules
                listeners[listener_id] = Listener(
                    listener_id, hook, url, rules, _target(url, secret, *sending),
                    state == "active", backfill, _set(kinds), _set(changed),
                    kinds is not None or changed is not None)
            except (CdcHooksError, ValueError) as exc:
                log.error("listener %s is unusable and skipped: %s", listener_id, exc,
                          extra={"listener_id": listener_id})
        self._gone &= listeners.keys()  # disabled on record since: no longer listed
        for listener_id in self._gone:
            listeners[listener_id] = replace(listeners[listener_id], active=False)
        if listeners.keys() != self.listeners.keys() or listeners != self.listeners:
            self._claimable = True  # e.g. a resumed listener's held deliveries
            self._work_ready.set()
        for listener_id in self._circuits.keys() - listeners.keys():  # removed or disabled since
            del self._circuits[listener_id]
            metrics.circuit_closed(listener_id)
        self.listeners = listeners

    # Dispatch ----------------------------------------------------------------

    async def _dispatch_loop(self, listen: RelayStore, store: RelayStore) -> None:
        limit = 1  # outbox rows (a bulk statement's are 1000 events); grows toward WORK_PER_DISPATCH
        unchecked = 0  # work dispatched since the statistics were last checked
        while True:
            await self._reload(store)
            moved = await self._dispatch_once(store, limit)
            if moved is None:  # another relay is dispatching
                await self._sleep(0.05)
                continue
            rows, work = moved
            unchecked += work
            if unchecked >= STATISTICS_EVERY:
                unchecked = 0
                await store.refresh_statistics(STATISTICS_EVERY)
            if rows:
                limit = max(1, min(1000, WORK_PER_DISPATCH * rows // max(work, 1)))
                if self._claimable:
                    self._work_ready.set()
                continue
            await self._wait_for_wakeup(listen, store)

    async def _dispatch_once(self, store: RelayStore, limit: int) -> tuple[int, int] | None:
        """Outbox rows taken and the work they made (events, or deliveries if more)."""
        leased: list[tuple[Any, ...]] = []
        deliveries = 0
        async with store.conn.transaction():
            rows = await store.take_outbox(limit)
            if rows is None:
                return None
            if rows and rows[0][5] != self._config_version:
                # Listeners as of this transaction: one committed before these
                # changes always gets them.
                await self._reload(store, force=True)
                self._config_version = rows[0][5]
            events = []
            for outbox_id, hook, kind, payload, occurred_at, _ in sorted(rows):
                events.extend(expand(outbox_id, self.hooks.get(hook), kind, payload, occurred_at,
                                     self.delivery.max_event_bytes))
            if events:
                await store.insert_events(
                    (e.id, e.hook, e.kind, e.stored, e.occurred_at) for e in events)
                leased, deliveries = await self._insert_deliveries(store, events)
        metrics.dispatched(e.hook for e in events)
        # Sent only once the deliveries are committed: a send is always on record.
        self._hold(leased)
        self._pump()
        return len(rows), max(len(events), deliveries)

    async def _insert_deliveries(self, store: RelayStore, events: list[Any]
                                 ) -> tuple[list[tuple[Any, ...]], int]:
        """Records the matching deliveries; returns the rows leased to this relay to
        send at once (as many as each listener's window has room for), and how many
        deliveries were recorded."""
        by_hook: dict[str, list[Listener]] = defaultdict(list)
        for listener in self.listeners.values():
            by_hook[listener.hook].append(listener)
        # Up to the claim window, not more: what dispatch sends itself is this
        # process's alone, and the other relays must find the rest to claim.
        held = self._held
        window = PREFETCH * self.delivery.listener_concurrency
        room = {lid: window - held[lid] for lid in self.listeners}
        seen_rows: set[tuple[int, str]] = set()
        deliveries: list[tuple[int, int, str | None, bool, bool]] = []
        truncated: set[int] = set()  # listeners with a TRUNCATE earlier in this batch
        for event in events:
            everything = event.row_key == ALL_ROWS  # a TRUNCATE: whatever the match
            for listener in by_hook.get(event.hook, ()):
                if listener.filtered and not takes(listener.kinds, listener.changed, event.kind,
                                                   event.changes, event.for_listener):
                    continue
                if not (everything or deepmatch(listener.rules, event.data)) or (
                        event.kind == "read" and not _takes_backfill(listener, event)):
                    continue
                first_of_row = event.row_key is None or (listener.id, event.row_key) not in seen_rows
                if event.row_key is not None:
                    seen_rows.add((listener.id, event.row_key))
                if everything or (truncated and listener.id in truncated):
                    # queued behind: a TRUNCATE waits for the listener's older deliveries
                    # (claim_deliveries), and later ones in this batch wait for it
                    truncated.add(listener.id)
                    first_of_row = False
                send_now = listener.active and first_of_row and room[listener.id] > 0
                room[listener.id] -= send_now
                deliveries.append((event.id, listener.id, event.row_key, send_now, first_of_row))
        if not deliveries:
            return [], 0
        bodies = {event.id: event.body for event in events}
        leased = await store.insert_deliveries(deliveries, self.lease)
        if len(leased) < len(deliveries):  # some wait for the claim loop
            self._claimable = True
        return ([(d_id, e_id, l_id, attempt, bodies[e_id]) for d_id, e_id, l_id, attempt in leased],
                len(deliveries))

    async def _end_unregistering(self) -> None:
        """Ends the unregister task before its connection is closed: closing a
        connection under a statement in progress crashed psycopg (a segfault in CI, or
        "connection pointer is NULL"). Its outcome does not matter: with the connection
        goes the waiter row."""
        task, self._unregistering = self._unregistering, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task})
            if not task.cancelled():
                task.exception()  # retrieved, so that asyncio does not log it

    async def _wait_for_wakeup(self, listen: RelayStore, store: RelayStore) -> None:
        """Sleep until a trigger notifies; triggers notify only while we are registered."""
        unregistering, self._unregistering = self._unregistering, None
        if unregistering is not None:
            await unregistering  # surfaces a broken connection
        await listen.run("register_waiter")
        try:
            if await store.outbox_nonempty():  # committed between our last take and now
                return
            async for notify in listen.conn.notifies(timeout=IDLE_POLL, stop_after=1):
                if notify.channel == "cdc_hooks_listeners":
                    await self._reload(store, force=True)
        finally:
            # On the listen connection, while dispatch goes ahead on its own.
            self._unregistering = asyncio.create_task(listen.run("unregister_waiter"))

    # Delivery ----------------------------------------------------------------

    async def _claim_loop(self, store: RelayStore) -> None:
        while True:
            await self._renew_leases(store)
            wants, total = self._wants()
            if not wants:  # the window is full: wait for requests to finish
                self._room.clear()
                await _wait(self._room, IDLE_POLL)
                continue
            if not self._claimable:  # nothing due that dispatch did not send itself
                self._work_ready.clear()
                await _wait(self._work_ready, self._until_due)
                self._claimable = True  # woken: new work, or a retry may be due
                continue
            self._work_ready.clear()
            claimed = await store.claim_deliveries(wants, total, self.lease)
            self._hold(claimed)
            self._pump()
            if len(claimed) == min(total, sum(wants.values())):
                continue  # there may be more due
            due, blocked = await store.seconds_until_due(
                [i for i, lsn in self.listeners.items() if lsn.active], IDLE_POLL)
            # Deliveries due but waiting behind an older one of their row are released
            # by its result (record sets _work_ready); otherwise sleep until the next is due.
            self._claimable = blocked
            self._until_due = IDLE_POLL if due is None else min(due, IDLE_POLL)
            if blocked:
                await _wait(self._work_ready, self._until_due)

    def _hold(self, rows: list[tuple[Any, ...]]) -> None:
        """Queues leased deliveries (id, event_id, listener_id, attempt, body) to send."""
        now = time.monotonic()
        for row in rows:
            self._queued[row[2]].append((*row, now))

    async def _renew_leases(self, store: RelayStore) -> None:
        """Leases again what has waited in the queues for a third of its lease: a
        lease that lapsed before the send would let a claim take the delivery again
        and send it twice (a listener's queue can wait longer than its own requests
        take: other listeners share the concurrency, an open circuit holds it). A few
        times per lease, one statement."""
        now = time.monotonic()
        if now - self._renewed_at < self.lease / 4:
            return
        self._renewed_at = now
        old = now - self.lease / 3
        stale = [(row[0], row[3]) for queue in self._queued.values() for row in queue
                 if row[5] < old]
        if not stale:
            return
        await store.renew_leases(stale, self.lease)
        for listener_id, queue in self._queued.items():
            self._queued[listener_id] = deque(
                (*row[:5], now) if row[5] < old else row for row in queue)

    def _wants(self) -> tuple[dict[int, int], int]:
        """How many deliveries to claim per listener, and in all: claims keep up to
        PREFETCH times the concurrency claimed, so requests never wait on a claim round
        trip, and run only when half a window is free, so each claim is a batch. The
        listeners' order turns with every claim, so none always comes first."""
        held = self._held
        room = PREFETCH * self.delivery.concurrency - sum(held.values())
        window = PREFETCH * self.delivery.listener_concurrency
        listeners = list(self.listeners.values())
        self._turn = (self._turn + 1) % max(len(listeners), 1)
        wants = {}
        for listener in listeners[self._turn:] + listeners[:self._turn]:
            want = min(room, window - held[listener.id])
            if listener.active and want > 0 and (want * 2 >= window or held[listener.id] == 0):
                wants[listener.id] = want
        return wants, room

    def _pump(self) -> None:
        """Starts queued deliveries within the global and per-listener limits."""
        free = self.delivery.concurrency - sum(self._in_flight.values())
        now = time.monotonic()
        for listener_id, queue in self._queued.items():
            listener = self.listeners.get(listener_id)
            circuit = self._circuits.get(listener_id)
            while queue and free > 0 and (
                    self._in_flight[listener_id] < self.delivery.listener_concurrency):
                if listener is None or not listener.active:
                    self._released.append(queue.popleft()[0])  # removed or paused since the claim
                    continue
                admitted = circuit.admits(now) if circuit else "send"
                if admitted == "wait":
                    break
                delivery_id, event_id, _, attempt, body, _ = queue.popleft()
                if admitted == "skip":
                    assert circuit is not None
                    self._skip(listener, delivery_id, attempt, circuit, now)
                    continue
                self._in_flight[listener_id] += 1
                free -= 1
                self._sends.put_nowait((listener, delivery_id, event_id, attempt, body))

    @property
    def _held(self) -> dict[int, int]:
        """Claimed deliveries per listener, queued or in flight."""
        held: dict[int, int] = defaultdict(int)
        for listener_id, count in self._in_flight.items():
            held[listener_id] += count
        for listener_id, queue in self._queued.items():
            held[listener_id] += len(queue)
        return held

    async def _send_loop(self) -> None:
        """One of the pool's senders: sends admitted deliveries one at a time."""
        while True:
            job = await self._sends.get()
            try:
                await self._deliver(*job)
            except Exception:  # a bug must not shrink the pool: log it, send on
                log.exception("sending delivery %s failed", job[1])

    async def _deliver(self, listener: Listener, delivery_id: int, event_id: int,
                       attempt: int, body: str) -> None:
        assert self.sender is not None
        try:
            response = await self.sender.post(listener.target, body.encode(),
                                              f"msg_{event_id}_{listener.id}")
            outcome = classify(response.code, attempt, self.delivery.retry_schedule,
                               retry_after=response.retry_after, retryable_error=response.retryable)
            if outcome.gone:
                self._stop_sending(listener.id)
            self._note_answer(listener, response)
            metrics.attempt(listener.hook, listener.id, attempt, outcome.status, response.duration_ms)
            if outcome.status != "delivered":
                log.warning("listener %s event %s attempt %s: %s -> %s", listener.id, event_id,
                            attempt, response.error, outcome.status,
                            extra={"listener_id": listener.id, "event_id": event_id, "attempt": attempt,
                                   "status": outcome.status, "code": response.code})
            self._results.put_nowait(Result(
                delivery_id, attempt, listener.id, outcome.status, outcome.retry_in,
                response.code, response.error, response.duration_ms, response.body, outcome.gone))
        finally:
            self._in_flight[listener.id] -= 1
            self._pump()
            self._room.set()

    def _note_answer(self, listener: Listener, response: Response) -> None:
        """Keeps the listener's circuit (circuit.py) in step with its receiver."""
        threshold = self.delivery.circuit_breaker
        if not threshold:
            return
        listener_id = listener.id
        if counts_as_failure(response.code, response.retryable):
            circuit = self._circuits.setdefault(listener_id, Circuit())
            if circuit.failed(response.error or f"HTTP {response.code}", time.monotonic(), threshold):
                metrics.circuit_opened(listener.hook, listener_id)
                log.warning("listener %s: the last %s requests failed (last: %s); due deliveries "
                            "are retried without a request for %g s, then one is sent as a probe",
                            listener_id, circuit.failures, circuit.last_error, circuit.pause,
                            extra={"listener_id": listener_id, "status": "circuit-open"})
        elif response.code is not None:
            closed = self._circuits.pop(listener_id, None)
            if closed is not None and closed.open_until:
                metrics.circuit_closed(listener_id)
                log.info("listener %s answers again (HTTP %s): circuit closed", listener_id,
                         response.code, extra={"listener_id": listener_id, "status": "circuit-closed"})

    def _skip(self, listener: Listener, delivery_id: int, attempt: int, circuit: Circuit,
              now: float) -> None:
        """An attempt recorded as failed without a request: the circuit is open."""
        outcome = classify(None, attempt, self.delivery.retry_schedule)
        metrics.attempt(listener.hook, listener.id, attempt, outcome.status, 0.0)
        self._results.put_nowait(Result(delivery_id, attempt, listener.id, outcome.status,
                                        outcome.retry_in, None, circuit.skip_error(now), 0.0,
                                        None, False))

    def _stop_sending(self, listener_id: int) -> None:
        """410 Gone: at once, not when the disable is on record and reloaded, this
        listener's claimed deliveries are held (as if paused) instead of sent."""
        self._gone.add(listener_id)
        if listener_id in self.listeners:
            self.listeners[listener_id] = replace(self.listeners[listener_id], active=False)

    async def _record_loop(self, store: RelayStore) -> None:
        while True:
            if not self._unrecorded:
                self._unrecorded.append(await self._results.get())
                # Let a batch gather: one statement per few ms instead of per few results
                # (recording is off the delivery path; receivers already have these).
                await asyncio.sleep(RECORD_GATHER)
            await self._flush(store)

    async def _flush(self, store: RelayStore) -> None:
        while not self._results.empty() and len(self._unrecorded) < RECORD_BATCH:
            self._unrecorded.append(self._results.get_nowait())
        if self._released:
            await store.release_deliveries(self._released)
            self._released = []
        if not self._unrecorded:
            return
        batch = self._unrecorded
        await store.record_results(batch)
        self._unrecorded = []
        self.delivered += sum(1 for r in batch if r.status == "delivered")
        for result in batch:
            if result.gone:
                log.warning("listener %s answered 410 Gone: disabled", result.listener_id,
                            extra={"listener_id": result.listener_id, "status": "disabled"})
                await store.disable_listener(result.listener_id, "receiver answered 410 Gone")
        if self._claimable or any(r.status == "pending" for r in batch):
            # a successor of a delivered row, or a retry to schedule, may now be claimable
            self._claimable = True
            self._work_ready.set()

    async def _finish_in_flight(self) -> None:
        """Gives requests in flight until their timeout to finish; the rest are cancelled
        and their leases lapse, so another relay (or the next run) sends them again.
        Claimed deliveries not yet started are released to be due at once."""
        for queue in self._queued.values():
            self._released.extend(row[0] for row in queue)
            queue.clear()
        while not self._sends.empty():  # admitted, no sender took it yet
            listener, delivery_id, *_ = self._sends.get_nowait()
            self._released.append(delivery_id)
            self._in_flight[listener.id] -= 1
        deadline = time.monotonic() + self.delivery.timeout + 1
        while sum(self._in_flight.values()) and time.monotonic() < deadline:
            self._room.clear()  # set as each request ends
            await _wait(self._room, deadline - time.monotonic())
        for task in self._senders:  # a request still under way: its lease will lapse
            task.cancel()


async def _require_own_sessions(dsn: str, first: RelayStore, second: RelayStore) -> None:
    """Refuses a transaction-mode pooler (PgBouncer's pool_mode = transaction): the
    relay's LISTEN, advisory locks and prepared statements live in server sessions.

    Direct or session-pooled, each connection keeps its own server session: the
    first's backend stays the same while the second holds a transaction on another.
    A transaction-mode pooler hands each transaction any free server session: the
    second gets the one the first just used (PgBouncer reuses the last one freed),
    or the first a new one."""
    before = await first.backend_pid()
    async with second.conn.transaction():
        held = await second.backend_pid()
        after = await first.backend_pid()
    if held == before or after != before:
        raise ConfigError(
            "the relay needs a direct or session-pooled connection: "
            f"{describe_dsn(dsn)} gives each transaction another server session (a "
            "transaction-mode pooler such as PgBouncer's pool_mode = transaction), where its "
            "LISTEN and advisory locks would be lost; point the relay's dsn at PostgreSQL "
            "itself or at a session-mode pool")


def _target(url: str, secret: str, headers: dict[str, str], previous_secret: str | None,
            previous_seconds_left: float | None) -> Target:
    """What the sender needs of a listener, computed once per load: a rotated-out
    secret signs beside the new one until its overlap (seconds left, by the
    database's clock) has passed on this relay's clock."""
    previous_key = None if previous_secret is None else secret_key(previous_secret)
    until = 0.0 if previous_key is None else time.time() + (previous_seconds_left or 0.0)
    return Target(url, secret_key(secret), tuple(headers.items()), previous_key, until)
def _set(names: list[str] | None) -> frozenset[str] | None:
    return None if names is None else frozenset(names)


def _takes_backfill(listener: Listener, event: Any) -> bool:
    """Backfill events go to listeners that did not opt out, or to the one asked for."""
    if event.for_listener is not None:
        return event.for_listener == listener.id
    return listener.backfill


def _first_line(exc: BaseException) -> str:
    """psycopg's first line says what happened ("server closed the connection
    unexpectedly"); the lines after it are hints."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


async def _wait(event: asyncio.Event, seconds: float) -> None:
    """Waits for event, at most seconds. Not asyncio.wait_for: on Python 3.11 it
    swallows a cancellation that arrives as the awaited event is set (gh-86296);
    stop() sets both events the loops wait on, so the cancelled loops ran on and
    the relay never stopped."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()


class _Stopped(Exception):
    """Ends a connected session when the relay is asked to stop."""


def run_forever(config: Config, web: str | None = None, metrics_bind: str | None = None,
                workers: int = 1, report_to: Connection | None = None) -> None:
    """Runs a relay until SIGTERM/SIGINT (exit 0 after a graceful stop); with
    web=HOST:PORT it also serves the web interface in the same event loop, with
    metrics_bind=HOST:PORT Prometheus metrics (both also serve /metrics). With
    workers > 1, that many relays in as many processes (relay/workers.py); this
    process is the first, and reports for all. report_to: this process is one of
    the others, reporting its metrics there."""
    import signal

    servers: list[Any] = []  # each binds now: a bad address fails before the relay starts
    if web is not None:  # imported here: the relay alone does not load the web stack
        from ..web.serve import WebServer

        servers.append(WebServer(config, web))
    if metrics_bind is not None:
        servers.append(metrics.MetricsServer(config, metrics_bind))

    async def main() -> None:
        mine = share(config, workers)  # each worker's share of the limits
        relay = Relay(mine)
        others = None
        if workers > 1:
            logs.label_worker(1)
            others = Workers(mine, workers - 1, run_worker)

        def stop() -> None:
            relay.stop()
            for server in servers:
                server.stop()
            if others is not None:
                others.stop()

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop)
        jobs = [relay.run(), *(server.serve() for server in servers)]
        if others is not None:
            jobs.append(others.watch(stop))
        if report_to is not None:
            jobs.append(report_metrics(report_to, relay.stopping, stop))
        await asyncio.gather(*jobs)
        if others is not None and others.failure:
            raise CdcHooksError(others.failure)

    asyncio.run(main())


def run_worker(config: Config, number: int, log_format: str, report_to: Connection) -> None:
    """A worker process of ``run --workers N`` other than the first."""
    logs.configure(log_format)
    logs.label_worker(number)
    try:
        run_forever(config, report_to=report_to)
    except CdcHooksError as exc:
        log.error("%s", exc)
        sys.exit(exc.exit_code)
