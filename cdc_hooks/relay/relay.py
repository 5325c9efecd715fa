"""The relay: outbox -> events -> matching listeners -> signed POSTs.

Three loops share one process, each on its own connection:
- dispatch: takes outbox rows (one dispatcher at a time across relays),
  expands them into events, matches listeners and records deliveries, all in
  one short transaction; when idle it registers as a waiter and sleeps on
  LISTEN until a trigger notifies (or a fallback poll).
- claim: leases due deliveries per listener within the concurrency limits and
  starts an HTTP task for each; no transaction stays open across a request.
- record: writes attempt results in batches (one statement per batch), and
  counts failures into the listeners' shared circuits (circuit.py).
- failover: every TAKEOVER_EVERY seconds takes over the claims of relays whose
  database session ended, and shares each listener's listener_concurrency
  with the other relays (listener slots).

Claims belong to the relay's session (relay_sessions: a row, and a session
advisory lock on the claim connection): a result, release or renewal lands only
while that session holds the claim. A relay that lost its session forgets the
claims it had not sent; what it had in flight is sent again by whoever claims it
next (with its original webhook-id), and its late results only reach the
attempt log.

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
from collections.abc import Sequence
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from typing import Any, Protocol

import psycopg

from .. import capturing, jsoncodec, logs, maintenance, metrics
from ..config import Config
from ..db import SCHEMA_GONE, RelayStore, migrations
from ..dsn import check_dsn, describe_dsn, redact
from ..errors import CdcHooksError, ConfigError, DatabaseUnavailable, first_line
from ..match import rules_from_json
from ..match_index import MatchIndex
from ..netpolicy import NetworkPolicy
from ..rows import InstalledHook
from ..services.listeners import takes
from ..signing import secret_key
from .circuit import FIRST_PAUSE, MAX_PAUSE, Circuits, verdict
from .events import ALL_ROWS, Event, expand
from .http import Sender, Target
from .pacing import Pacing
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
PROBE_LEASE_MARGIN = 10.0  # seconds a probe is held beyond the request's timeout
CAPTURE_CHECK_EVERY = 5.0  # seconds between checks that each hook's triggers are in place
# Seconds between checks for relay sessions that ended (their claims are then due at
# once, so a SIGKILLed relay's deliveries wait at most about this long): one statement
# reading a few rows, the only one an idle relay makes for it.
TAKEOVER_EVERY = 2.0


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
    rate: float | None = None  # deliveries per second at most, across relays (pacing.py)


@dataclass(slots=True)  # not frozen: a frozen __init__ is several times slower; this is per attempt
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
    session: int  # the relay session that claimed it: the result lands only while it holds it
    verdict: str | None  # what it tells of the receiver, for its circuit (circuit.py)


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
        self._circuit_settings = {  # record_circuits' parameters
            "threshold": self.delivery.circuit_breaker, "rate": self.delivery.circuit_failure_rate,
            "window": self.delivery.circuit_window, "first_pause": FIRST_PAUSE,
            "max_pause": MAX_PAUSE}
        self.hooks: dict[str, InstalledHook] = {}
        self.listeners: dict[int, Listener] = {}
        self._matching: dict[str, MatchIndex[int]] = {}  # per hook: its listeners by match
        self._compiled: dict[tuple[int, str], dict[str, Any]] = {}
        self._loaded: dict[int, tuple[tuple[Any, ...], Listener]] = {}  # by the row it came from
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
        self._circuits = Circuits(config.delivery.circuit_breaker)  # the shared circuits it knows of
        self._session_id = 0  # this relay's session (relay_sessions), per connection
        self._sessions = 1  # relay sessions of the database, at the last take-over check
        self._carried: set[int] = set()  # earlier sessions whose claims moved to this one
        # Per listener, the requests this relay may have in flight: its share of the
        # listener_concurrency of all relays (listener_slots); none: not sent to. What
        # it holds on record may be more, for a while: the requests in flight of a
        # larger share given up.
        self._slots: dict[int, int] = {}
        self._slots_held: dict[int, int] = {}  # on record (listener_slots)
        self._slots_short = False  # a listener has more or fewer slots than its share
        self._slots_asked: set[int] = set()  # the listeners the last take_slots was for
        self._taking_slots = asyncio.Lock()  # the failover loop's, or dispatch's for a new listener
        self._share_slots = asyncio.Event()  # set: divide the slots again now
        self._pacing = Pacing(self._pump)  # the rate-limited listeners' send slots
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
                        f"({first_line(gone)}): changes are not captured; run cdc-hooks install")
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
            await self._start_relay_session(claim)
            self._note_connected()
            async with asyncio.TaskGroup() as group:
                group.create_task(self._dispatch_loop(listen, dispatch))
                group.create_task(self._claim_loop(claim))
                group.create_task(self._failover_loop(claim))
                group.create_task(self._record_loop(record))
                group.create_task(self._until_stopped())
                group.create_task(self._maintenance_loop())
                group.create_task(self._capture_loop(record))
                group.create_task(self._pacing.run(claim))  # between claims, the connection is free
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

    async def _start_relay_session(self, store: RelayStore) -> None:
        """A new relay session on the claim connection. The last one's claims move
        to it while no other relay took them over (a reconnect): what it queued is
        still sent, and its results in flight land, not sent again. Once taken over,
        they are forgotten (its requests in flight record under it: fenced off)."""
        last = self._session_id
        self._slots, self._slots_held = {}, {}
        self._session_id = await store.register_session()
        if last and await store.carry_over(last, self._session_id):
            self._carried.add(last)
        else:
            self._carried.clear()
            self._unsent()
            self._released = []  # the last session's too: a release is fenced off the new one
        await self._take_over(store)
        self._share_slots.clear()
        await self._take_slots(store)

    async def _failover_loop(self, store: RelayStore) -> None:
        """Takes over the claims of relay sessions that ended every TAKEOVER_EVERY
        seconds, and divides the listeners' slots again when the relays or the
        listeners changed, or this relay got fewer than its share."""
        checked = time.monotonic()
        while True:
            await _wait(self._share_slots, TAKEOVER_EVERY - (time.monotonic() - checked))
            if time.monotonic() - checked >= TAKEOVER_EVERY:
                checked = time.monotonic()
                await self._take_over(store)
            if self._share_slots.is_set():
                self._share_slots.clear()
                await self._take_slots(store)

    async def _take_over(self, store: RelayStore) -> None:
        live, ended, freed = await store.take_over(self._session_id)
        if ended:
            log.warning("%s relay session(s) ended: %s of their claimed deliveries are due "
                        "again at once", ended, freed)
        if freed:
            self._claimable = True
            self._work_ready.set()
        if live != self._sessions or self._slots_short:
            self._sessions = live
            self._share_slots.set()

    async def _take_slots(self, store: RelayStore) -> None:
        """This relay's slots of each listener: an even share (rounded up) of
        listener_concurrency among the relays, as far as the others leave free.
        A share given up is kept on record for the requests still in flight (the
        next round gives back what they no longer use), and while asked for, a
        listener's slots are at most those on record."""
        async with self._taking_slots:
            await self._take_slots_now(store)

    async def _take_slots_now(self, store: RelayStore) -> None:
        cap = self.delivery.listener_concurrency
        share = -(-cap // max(1, self._sessions))
        wants = {}
        for listener_id in self.listeners.keys() | self._slots_held.keys():
            listener = self.listeners.get(listener_id)
            want = share if listener is not None and listener.active else 0
            held = self._slots_held.get(listener_id, 0)
            floor = min(held, max(self._in_flight[listener_id], want))
            self._slots[listener_id] = min(self._slots.get(listener_id, 0), floor, want)
            wants[listener_id] = (want, floor)
        if not wants:
            return
        granted = await store.take_slots(self._session_id, wants, cap)
        self._slots_asked = set(wants)
        self._slots_held = {listener_id: n for listener_id, n in granted.items() if n}
        self._slots = {listener_id: min(n, wants[listener_id][0])
                       for listener_id, n in self._slots_held.items()}
        self._slots_short = any(granted.get(i, 0) != want for i, (want, _) in wants.items())
        self._claimable = True
        self._work_ready.set()
        self._room.set()
        self._pump()

    async def _maintenance_loop(self) -> None:
        """Listener health and retention every [retention] interval (maintenance.py),
        in a thread on its own connection; a failure waits for the next round."""
        interval = self.config.retention.interval
        while interval:
            try:
                await asyncio.to_thread(maintenance.run, self.config, self._stopping.is_set)
            except (psycopg.Error, CdcHooksError) as exc:
                log.warning("maintenance failed, next try in %g s: %s", interval, first_line(exc))
            await self._sleep(interval)

    async def _capture_loop(self, store: RelayStore) -> None:
        """Whether every hook still captures (capturing.py), every CAPTURE_CHECK_EVERY
        seconds or when check_capture is set; on the record connection, which is
        free between batches."""
        while True:
            self._capture.note(await store.hooks_capturing())
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
                        describe_dsn(self.dsn), redact(self.dsn, first_line(exc)))

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
        self.hooks = {h.name: h for h in await store.installed_hooks()}
        listeners = {}
        loaded = {}
        for row in await store.active_listeners():
            known = self._loaded.get(row[0])
            if known is not None and known[0] == row:  # unchanged: its keys are decoded
                listeners[row[0]], loaded[row[0]] = known[1], known
                continue
            listener_id, hook, url, match_text, secret, state, backfill, kinds, changed, rate, \
                *sending = row
            try:
                rules = self._compiled.get((listener_id, match_text))
                if rules is None:
                    rules = rules_from_json(jsoncodec.loads(match_text))
                    self._compiled[(listener_id, match_text)] = rules
                listeners[listener_id] = Listener(
                    listener_id, hook, url, rules, _target(url, secret, *sending),
                    state == "active", backfill, _set(kinds), _set(changed),
                    kinds is not None or changed is not None, rate)
                loaded[listener_id] = (row, listeners[listener_id])
            except (CdcHooksError, ValueError) as exc:
                log.error("listener %s is unusable and skipped: %s", listener_id, exc,
                          extra={"listener_id": listener_id})
        # Reloads come every second: with 10,000 listeners, decoding every secret and
        # building every Listener again cost a quarter of a second of CPU each time.
        self._loaded = loaded
        self._gone &= listeners.keys()  # disabled on record since: no longer listed
        for listener_id in self._gone:
            listeners[listener_id] = replace(listeners[listener_id], active=False)
        if listeners.keys() != self.listeners.keys() or listeners != self.listeners:
            self._claimable = True  # e.g. a resumed listener's held deliveries
            self._work_ready.set()
        if _active(listeners) != _active(self.listeners):
            self._share_slots.set()  # slots for the listeners now active, none for the others
        self._matching = _index_matches(listeners, self._matching)
        gone = self._circuits.known.keys() - listeners.keys()  # removed or disabled since
        self._circuits.drop(gone)
        for listener_id in gone:
            metrics.circuit_closed(listener_id)
        self.listeners = listeners
        if self.delivery.circuit_breaker:
            # a removed listener's row outlives it until maintenance forgets it: not known
            states = await store.circuit_states(self.delivery.circuit_window)
            self._note_circuits([row for row in states if row[0] in listeners], complete=True)
        self._pacing.update({i: lsn.rate for i, lsn in listeners.items() if lsn.rate is not None})

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
            events: list[Event] = []
            for outbox_id, hook, kind, payload, occurred_at, _ in sorted(rows):
                events.extend(expand(outbox_id, self.hooks.get(hook), kind, payload, occurred_at,
                                     self.delivery.max_event_bytes))
            if events and _active(self.listeners) - self._slots_asked:
                # a new listener's slots before its first delivery: else that one waits
                # for a claim while the next ones, sent at once, overtake it
                await self._take_slots(store)
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
        # Up to the claim window, not more: what dispatch sends itself is this
        # process's alone, and the other relays must find the rest to claim.
        held = self._held
        room: dict[int, int] = {}  # per listener that matched in this batch
        seen_rows: set[tuple[int, str]] = set()
        deliveries: list[tuple[int, int, str | None, bool, bool]] = []
        truncated: set[int] = set()  # listeners with a TRUNCATE earlier in this batch
        # An open circuit's deliveries wait in the table for its probe (circuit.py).
        open_circuits = {i for i, c in self._circuits.known.items() if c.open_until}
        for event in events:
            index = self._matching.get(event.hook)
            if index is None:
                continue
            everything = event.row_key == ALL_ROWS  # a TRUNCATE: whatever the match
            for listener_id in index.items if everything else index.matching(event.data):
                listener = self.listeners[listener_id]
                if listener.filtered and not takes(listener.kinds, listener.changed, event.kind,
                                                   event.changes, event.for_listener):
                    continue
                if event.kind == "read" and not _takes_backfill(listener, event):
                    continue
                first_of_row = event.row_key is None or (listener.id, event.row_key) not in seen_rows
                if event.row_key is not None:
                    seen_rows.add((listener.id, event.row_key))
                if everything or (truncated and listener.id in truncated):
                    # queued behind: a TRUNCATE waits for the listener's older deliveries
                    # (claim_deliveries), and later ones in this batch wait for it
                    truncated.add(listener.id)
                    first_of_row = False
                left = room.get(listener_id, PREFETCH * self._slots.get(listener_id, 0) - held[listener_id])
                send_now = listener.active and first_of_row and left > 0 \
                    and listener_id not in open_circuits
                room[listener_id] = left - send_now
                deliveries.append((event.id, listener.id, event.row_key, send_now, first_of_row))
        if not deliveries:
            return [], 0
        bodies = {event.id: event.body for event in events}
        leased = await store.insert_deliveries(deliveries, self.lease, self._session_id)
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
            await self._take_probes(store)
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
            claimed = await store.claim_deliveries(wants, total, self.lease, self._session_id)
            self._hold(claimed)
            self._pump()
            await self._give_back_probes(store)
            if len(claimed) == min(total, sum(wants.values())):
                continue  # there may be more due
            due, blocked = await store.seconds_until_due(
                [i for i, lsn in self.listeners.items()
                 if lsn.active and not self._circuit_holds(i)], IDLE_POLL)
            # Deliveries due but waiting behind an older one of their row are released
            # by its result (record sets _work_ready); otherwise sleep until the next is
            # due, or an open circuit's probe may go.
            self._claimable = blocked
            probe = self._circuits.next_change(time.monotonic())
            self._until_due = min([IDLE_POLL, *(t for t in (due, probe) if t is not None)])
            if blocked:
                await _wait(self._work_ready, self._until_due)

    def _circuit_holds(self, listener_id: int) -> bool:
        """Its circuit is open and this relay has no probe of it to send."""
        circuit = self._circuits.get(listener_id)
        return circuit is not None and circuit.admits() == "hold"

    async def _take_probes(self, store: RelayStore) -> None:
        """Asks for the probe of each open circuit whose pause is over (circuit.py)."""
        now = time.monotonic()
        # Only for listeners it has slots of (listener_slots): a relay without a share
        # of one could never send its probe, and would hold it from the others.
        due = self._circuits.due_probes(
            now, {i for i, listener in self.listeners.items()
                  if listener.active and self._slots.get(i, 0)}
            if self._circuits.known else ())
        if due:
            taken = await store.take_probes(due, self.delivery.timeout + PROBE_LEASE_MARGIN)
            self._circuits.taken(taken, due, now)

    async def _give_back_probes(self, store: RelayStore) -> None:
        """Probes taken with nothing claimed to send (its due delivery waits behind an
        older one of its row, or another relay's claim took it): another may send one."""
        unsent = self._circuits.unsent_probes()
        if unsent:
            held = self._held
            unsent = [i for i in unsent if not held[i]]
        if unsent:
            await store.release_probes(unsent)
            self._circuits.give_back(unsent, time.monotonic())

    def _hold(self, rows: list[tuple[Any, ...]]) -> None:
        """Queues leased deliveries (id, event_id, listener_id, attempt, body) to send."""
        now = time.monotonic()
        for row in rows:
            self._queued[row[2]].append((*row, now))

    async def _renew_leases(self, store: RelayStore) -> None:
        """Leases again what has waited in the queues for a third of its lease: a
        lease that lapsed before the send would let a claim take the delivery again
        and send it twice (a listener's queue can wait longer than its own requests
        take: other listeners share the concurrency, a relay's own failures hold it
        until recorded). A few times per lease, one statement."""
        now = time.monotonic()
        if now - self._renewed_at < self.lease / 4:
            return
        self._renewed_at = now
        old = now - self.lease / 3
        stale = [(row[0], row[3]) for queue in self._queued.values() for row in queue
                 if row[5] < old]
        if not stale:
            return
        await store.renew_leases(stale, self.lease, self._session_id)
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
        listeners = list(self.listeners.values())
        self._turn = (self._turn + 1) % max(len(listeners), 1)
        wants = {}
        for listener in listeners[self._turn:] + listeners[:self._turn]:
            window = PREFETCH * self._slots.get(listener.id, 0)
            want = min(room, window - held[listener.id])
            circuit = self._circuits.get(listener.id)
            if circuit is not None and circuit.open_until:  # open: only its probe, if this relay's
                want = min(want, 1) if circuit.admits() == "probe" and not held[listener.id] else 0
            if listener.active and want > 0 and (want * 2 >= window or held[listener.id] == 0):
                wants[listener.id] = want
        return wants, room

    def _pump(self) -> None:
        """Starts queued deliveries within the global and per-listener limits. Those of
        a listener whose circuit is open are released: they wait for its probe in the
        table, without spending an attempt (circuit.py)."""
        free = self.delivery.concurrency - sum(self._in_flight.values())
        now = time.monotonic()
        drained = []
        for listener_id, queue in self._queued.items():
            if free <= 0:
                break
            listener = self.listeners.get(listener_id)
            circuit = self._circuits.get(listener_id)
            pace = self._pacing.paces.get(listener_id)  # None: no rate limit
            while queue and free > 0 and (  # within its slots, or released below
                    self._in_flight[listener_id] < self._slots.get(listener_id, 0)
                    or listener is None or not listener.active):
                admitted = circuit.admits() if circuit else "send"
                if admitted == "send" and self._circuits.suspect(listener_id):
                    break  # the record path says in a moment whether the circuit opened
                if listener is None or not listener.active or admitted == "hold":
                    self._released.append(queue.popleft()[0])  # removed, paused or held since the claim
                    continue
                if pace is not None and not pace.ready(now, len(queue)):
                    break  # pacing wakes the pump when a slot is due
                delivery_id, event_id, _, attempt, body, _ = queue.popleft()
                if admitted == "probe":
                    assert circuit is not None
                    circuit.probe = delivery_id
                if pace is not None:
                    pace.take()
                self._in_flight[listener_id] += 1
                free -= 1
                self._sends.put_nowait((listener, delivery_id, event_id, attempt, body))
            if not queue:
                drained.append(listener_id)
        # Only listeners with queued rows stay: _pump runs after every request, and
        # walking every listener that ever had one cost O(listeners) per delivery.
        for listener_id in drained:
            del self._queued[listener_id]

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
        session = self._session_id  # that claimed it: sends start only in the claiming session
        try:
            response = await self.sender.post(listener.target, body.encode(),
                                              f"msg_{event_id}_{listener.id}")
            outcome = classify(response.code, attempt, self.delivery.retry_schedule,
                               retry_after=response.retry_after, retryable_error=response.retryable)
            if outcome.gone:
                self._stop_sending(listener.id)
            metrics.attempt(listener.hook, listener.id, attempt, outcome.status, response.duration_ms)
            told = verdict(response.code, response.retryable) if self.delivery.circuit_breaker else None
            self._circuits.saw(listener.id, told)
            if outcome.status != "delivered":
                log.warning("listener %s event %s attempt %s: %s -> %s", listener.id, event_id,
                            attempt, response.error, outcome.status,
                            extra={"listener_id": listener.id, "event_id": event_id, "attempt": attempt,
                                   "status": outcome.status, "code": response.code})
            self._results.put_nowait(Result(
                delivery_id, attempt, listener.id, outcome.status, outcome.retry_in,
                response.code, response.error, response.duration_ms, response.body, outcome.gone,
                session, told))
        finally:
            self._request_ended(listener.id)
            self._pump()
            self._room.set()

    def _request_ended(self, listener_id: int) -> None:
        """One request fewer in flight; a listener with none leaves the table (it is
        summed after every request)."""
        left = self._in_flight[listener_id] - 1
        if left:
            self._in_flight[listener_id] = left
        else:
            del self._in_flight[listener_id]

    def _note_circuits(self, rows: list[tuple[Any, ...]], *, complete: bool = False) -> None:
        """Takes circuit rows into this relay's view; logs the changes its own results
        made, and keeps the /metrics gauge in step with every change it learns of."""
        for listener_id, circuit, transition in self._circuits.note(
                rows, time.monotonic(), complete=complete):
            listener = self.listeners.get(listener_id)
            if not circuit.open_until:
                metrics.circuit_closed(listener_id)
                self._claimable = True  # its held deliveries are due
                self._work_ready.set()
            elif listener is not None:
                metrics.circuit_opened(listener.hook, listener_id)
            if transition == "closed":
                log.info("listener %s answers again: circuit closed", listener_id,
                         extra={"listener_id": listener_id, "status": "circuit-closed"})
            elif transition is not None:
                log.warning("listener %s: the last %s requests failed (last: %s); its deliveries "
                            "wait, without spending an attempt, %g s for one sent as a probe",
                            listener_id, circuit.failures, circuit.last_error, circuit.pause,
                            extra={"listener_id": listener_id, "status": "circuit-open"})

    async def _record_circuits(self, store: RelayStore, batch: list[Result]) -> None:
        """Counts a recorded batch into the shared circuits (circuit.py): only
        failures, probes, and results of listeners whose circuit holds failures."""
        rows, new = self._circuits.tally(batch)
        if rows:
            self._note_circuits(await store.record_circuits(rows, new, self._circuit_settings))
            self._circuits.recorded(rows)
            self._pump()  # an open circuit releases its queued deliveries, a closed one sends on

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
            await store.release_deliveries(self._released, self._session_id)
            self._released = []
        if not self._unrecorded:
            return
        batch = self._unrecorded
        for result in batch:  # claimed in a session carried over: lands under this one
            if result.session in self._carried:
                result.session = self._session_id
        await store.record_results(batch)
        self._unrecorded = []
        if self.delivery.circuit_breaker:
            await self._record_circuits(store, batch)
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
        """Gives requests in flight until their timeout to finish; the rest are cancelled,
        and their claims taken over once this relay's session ends, so another relay (or
        the next run) sends them again.
        Claimed deliveries not yet started are released to be due at once."""
        self._released.extend(self._unsent())
        deadline = time.monotonic() + self.delivery.timeout + 1
        while sum(self._in_flight.values()) and time.monotonic() < deadline:
            self._room.clear()  # set as each request ends
            await _wait(self._room, deadline - time.monotonic())
        for task in self._senders:  # a request still under way: taken over, sent again
            task.cancel()

    def _unsent(self) -> list[int]:
        """Takes the claimed deliveries not sent yet (queued, or admitted and not
        taken by a sender) off the queues: their ids."""
        unsent = [row[0] for queue in self._queued.values() for row in queue]
        for queue in self._queued.values():
            queue.clear()
        while not self._sends.empty():  # admitted, no sender took it yet
            listener, delivery_id, *_ = self._sends.get_nowait()
            unsent.append(delivery_id)
            self._request_ended(listener.id)
        return unsent


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


def _active(listeners: dict[int, Listener]) -> set[int]:
    return {listener_id for listener_id, listener in listeners.items() if listener.active}


def _index_matches(listeners: dict[int, Listener], previous: dict[str, MatchIndex[int]]
                   ) -> dict[str, MatchIndex[int]]:
    """Per hook, its listeners' ids indexed by their matches (in the listeners' order).
    A hook whose listeners and matches are unchanged keeps its index: indexing 10,000
    listeners takes a tenth of a second, and reloads come every second."""
    by_hook: dict[str, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    for listener in listeners.values():
        by_hook[listener.hook].append((listener.id, listener.rules))
    indexes = {}
    for hook, entries in by_hook.items():
        index = previous.get(hook)
        indexes[hook] = index if index is not None and index.entries == entries else MatchIndex(
            entries)
    return indexes


def _set(names: list[str] | None) -> frozenset[str] | None:
    return None if names is None else frozenset(names)


def _takes_backfill(listener: Listener, event: Event) -> bool:
    """Backfill events go to listeners that did not opt out, or to the one asked for."""
    if event.for_listener is not None:
        return event.for_listener == listener.id
    return listener.backfill



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


class Server(Protocol):
    """A server that runs beside the relay, in its event loop (the web interface,
    /metrics), bound before the relay starts."""

    async def serve(self) -> None: ...

    def stop(self) -> None: ...


def run_forever(config: Config, servers: Sequence[Server] = (), workers: int = 1,
                report_to: Connection | None = None) -> None:
    """Runs a relay until SIGTERM/SIGINT (exit 0 after a graceful stop), and the
    servers beside it in the same event loop, stopped with it. With workers > 1,
    that many relays in as many processes (relay/workers.py); this process is the
    first, and reports for all. report_to: this process is one of the others,
    reporting its metrics there."""
    import signal

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
