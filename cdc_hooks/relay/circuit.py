"""Circuit breaker: a failing receiver costs the relays almost nothing, and its
events lose nothing to it.

A listener's circuit is one row in PostgreSQL (cdc_hooks.circuits, migration
0011), shared by every relay and worker of the database. Relays count their
results into it in the record path (query record_circuits: one locked
read-modify-write per listener and batch, so N relays add up): failures,
probes, and successes while it holds failures; a listener that only succeeds
never writes it.

It opens when the last `circuit_breaker` requests failed without a usable
answer (no response, timeout, TLS or connection error, 5xx) *and* failures are
at least `circuit_failure_rate` of its requests over the last `circuit_window`
seconds: a dead receiver trips it after a handful of requests, a receiver that
answers most requests keeps it closed through runs of bad luck.

While it is open its deliveries wait, without spending an attempt: claims and
dispatch skip the listener, and deliveries a relay had claimed already are
released. The retry schedule counts only requests made. When the pause ends,
one relay takes the probe (query take_probes, a compare-and-swap on the row)
and sends one due delivery: an answer closes the circuit, another failure
opens it for twice as long (up to MAX_PAUSE). Each relay keeps a view of the
rows it must know of (Circuits), refreshed with the listeners every second and
by the rows its own results update.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

FIRST_PAUSE = 1.0  # seconds the circuit stays open the first time
MAX_PAUSE = 60.0  # the longest a recovered receiver waits for its probe
PROBE_RECHECK = 1.0  # seconds before asking again for a probe that was not taken


@dataclass
class Circuit:
    """One listener's shared circuit, as this relay last saw it."""

    open_until: float = 0.0  # monotonic time the probe may go; 0: closed
    failures: int = 0  # requests in a row without a usable answer, all relays
    last_error: str = ""
    pause: float = 0.0
    probing: bool = False  # this relay holds the probe
    probe: int | None = None  # the delivery it sends as the probe, once chosen

    def admits(self) -> str:
        """What a queued delivery of this listener does: 'send', 'probe' (send, as the
        one request that tests the receiver) or 'hold' (release it to the database,
        where it waits for the probe without spending an attempt)."""
        if not self.open_until:
            return "send"
        if self.probing and self.probe is None:
            return "probe"
        return "hold"



class Circuits:
    """This relay's view of the shared circuits it must know of: open ones, and
    those with failures lately, whose successes must be counted (live)."""

    def __init__(self, threshold: int) -> None:
        self.known: dict[int, Circuit] = {}
        self.threshold = threshold
        # This relay's failures in a row per listener, not yet on record: at the
        # threshold, its sends wait for the record (a few ms) to say whether the
        # shared circuit opened, instead of going on at a fast-failing receiver.
        self._unrecorded_runs: dict[int, int] = {}

    def get(self, listener_id: int) -> Circuit | None:
        return self.known.get(listener_id)

    def saw(self, listener_id: int, verdict: str | None) -> None:
        """A request of this relay ended (verdict as verdict() says)."""
        if verdict == "failed":
            self._unrecorded_runs[listener_id] = self._unrecorded_runs.get(listener_id, 0) + 1
        elif verdict == "answered" and self._unrecorded_runs:
            self._unrecorded_runs.pop(listener_id, None)

    def suspect(self, listener_id: int) -> bool:
        """Failures in a row on record, and this relay's since, reach the threshold."""
        if not self._unrecorded_runs or listener_id not in self._unrecorded_runs:
            return False
        circuit = self.known.get(listener_id)
        on_record = circuit.failures if circuit is not None else 0
        return on_record + self._unrecorded_runs[listener_id] >= self.threshold > 0

    def recorded(self, rows: Iterable[Sequence[Any]]) -> None:
        """The record path counted these rows (of tally) into the shared circuits: their
        failures after the last answer are on record now."""
        for listener_id, _, _, trailing, *_ in rows:
            left = self._unrecorded_runs.get(listener_id, 0) - trailing
            if left > 0:
                self._unrecorded_runs[listener_id] = left
            else:
                self._unrecorded_runs.pop(listener_id, None)

    def note(self, rows: Iterable[Sequence[Any]], now: float, *, complete: bool = False
             ) -> list[tuple[int, Circuit, str | None]]:
        """Takes rows of circuit_states (complete: every live row) or record_circuits
        (listener_id, seconds until the probe may go or None, probe held by a relay,
        failures, last error, pause, live, transition). Returns (listener, circuit,
        transition) of each whose open state changed, with what record_circuits
        says it did (None: learned from another relay's change)."""
        changed = []
        seen = set()
        for listener_id, seconds, probe_held, failures, last_error, pause, live, transition in rows:
            seen.add(listener_id)
            circuit = self.known.get(listener_id)
            was_open = circuit is not None and bool(circuit.open_until)
            if not live:
                self.known.pop(listener_id, None)
                circuit = Circuit()
            elif circuit is None:
                circuit = self.known[listener_id] = Circuit()
            circuit.failures, circuit.last_error, circuit.pause = failures, last_error or "", pause
            if circuit.probing and not probe_held:  # its result is on record, or its lease lapsed
                circuit.probing, circuit.probe = False, None
            if seconds is None:
                circuit.open_until, circuit.probing, circuit.probe = 0.0, False, None
            elif not circuit.probing:  # a probe this relay holds keeps its own time
                # another relay's probe: ask again when its result is due at the latest
                circuit.open_until = now + max(seconds, PROBE_RECHECK if probe_held else seconds)
            if was_open != bool(circuit.open_until) or transition is not None:
                changed.append((listener_id, circuit, transition))
        if complete:
            for listener_id in self.known.keys() - seen:
                circuit = self.known.pop(listener_id)
                if circuit.open_until:
                    circuit.open_until = 0.0
                    changed.append((listener_id, circuit, None))
        return changed

    def drop(self, listener_ids: Iterable[int]) -> None:
        for listener_id in listener_ids:
            self.known.pop(listener_id, None)

    def due_probes(self, now: float, active: Container[int]) -> list[int]:
        """Listeners (of those active) whose circuit's pause is over and whose probe
        this relay may ask for."""
        return [i for i, c in self.known.items()
                if c.open_until and not c.probing and now >= c.open_until and i in active]

    def taken(self, listener_ids: Iterable[int], asked: Iterable[int], now: float) -> None:
        """take_probes answered: this relay holds the probes of listener_ids; the rest of
        those asked for are held elsewhere (or had nothing due): asked again later."""
        mine = set(listener_ids)
        for listener_id in asked:
            circuit = self.known[listener_id]
            if listener_id in mine:
                circuit.probing, circuit.probe = True, None
            else:
                circuit.open_until = now + PROBE_RECHECK

    def unsent_probes(self) -> list[int]:
        """Listeners whose probe this relay holds and has not sent yet."""
        return [i for i, c in self.known.items() if c.probing and c.probe is None]

    def give_back(self, listener_ids: Iterable[int], now: float) -> None:
        for listener_id in listener_ids:
            circuit = self.known[listener_id]
            circuit.probing, circuit.probe = False, None
            circuit.open_until = now + PROBE_RECHECK

    def next_change(self, now: float) -> float | None:
        """Seconds until the earliest open circuit may send its probe (None: none open)."""
        waits = [c.open_until - now for c in self.known.values() if c.open_until and not c.probing]
        return max(0.0, min(waits)) if waits else None

    def tally(self, results: Sequence[Any]) -> tuple[list[list[Any]], list[int]]:
        """record_circuits rows of a batch of results (each with listener_id,
        delivery_id, verdict: 'failed', 'answered' or None, error, code): per listener
        with a failure, a probe, or a live circuit, [listener_id, requests, failed,
        failed after its last answer, probe verdict, last error]; and the listeners
        with a failure but no row known (add_circuits)."""
        failing = {r.listener_id for r in results if r.verdict == "failed"}
        rows: dict[int, list[Any]] = {}
        for result in results:
            verdict = result.verdict
            circuit = self.known.get(result.listener_id)
            probe = circuit is not None and circuit.probing and circuit.probe == result.delivery_id
            if probe:
                circuit.probing, circuit.probe = False, None  # type: ignore[union-attr]
            if verdict is None or (circuit is None and result.listener_id not in failing):
                continue  # closed, no failures lately: a success writes nothing
            row = rows.get(result.listener_id)
            if row is None:
                row = rows[result.listener_id] = [result.listener_id, 0, 0, 0, None, None]
            row[1] += 1
            if verdict == "failed":
                row[2] += 1
                row[3] += 1
                row[5] = result.error or f"HTTP {result.code}"
            else:
                row[3] = 0
            if probe:
                row[4] = verdict
        new = [i for i, row in rows.items() if row[2] and i not in self.known]
        return list(rows.values()), new


def verdict(code: int | None, retryable: bool) -> str | None:
    """What a request tells of its receiver: 'failed' (no usable answer: the receiver,
    or the way to it, is broken, not the event), 'answered', or None (never sent:
    refused by the network policy, which retrying cannot help)."""
    if code is None:
        return "failed" if retryable else None
    return "failed" if code >= 500 else "answered"
