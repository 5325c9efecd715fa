"""Rate limits: at most `rate` deliveries per second to a listener, across relays.

A rate-limited listener's requests go out in slots 1 / rate seconds apart, taken
by every relay and worker of the database from one sequence kept in PostgreSQL
(cdc_hooks.listener_pace). A relay with deliveries waiting for such a listener
reserves its next few slots (RESERVE_AHEAD seconds' worth) with one statement
for all its listeners (reserve_sends), so the shared cost stays low and another
relay gets the slots after them; it sends each delivery at its slot's time.
Deliveries wait in the relay's queue meanwhile: the rate fails none and spends
no attempt (their leases are renewed as for any queued delivery). A slot not
used within LATE seconds of its time (the listener's concurrency was taken, the
event loop lagged) is forfeited, not used late: late slots would bunch requests
up. A relay that dies only wastes the slots it reserved. A receiver's 429 with
Retry-After reschedules its delivery as before, on top of the rate.

A listener without a rate has no Pace: the relay's pump looks it up once per
listener and pump, and that is all it costs.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Mapping

from ..db import RelayStore

RESERVE_AHEAD = 0.2  # seconds of a listener's sending that a relay reserves at once
MAX_RESERVE = 1000  # slots reserved at once, whatever the rate
LATE = 0.05  # seconds past its time after which a slot is forfeited instead of used


class Pace:
    """The send slots this relay holds for one rate-limited listener."""

    def __init__(self, rate: float, wake: Callable[[], None], ask: Callable[[], None]) -> None:
        self.rate = rate
        self.slots: deque[float] = deque()  # their times (time.monotonic()), in order
        self.wanted = 0  # slots asked for, not reserved yet
        self.removed = False  # the listener is gone: nothing more is reserved
        self._wake = wake  # the relay's pump: starts what may be sent
        self._ask = ask
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    def ready(self, now: float, waiting: int) -> bool:
        """Whether a slot is due for one of `waiting` deliveries. If not, the pump runs
        again when one is: at the next slot's time, or once slots are reserved."""
        slots = self.slots
        while slots and slots[0] < now - LATE:
            slots.popleft()
        if slots and slots[0] <= now:
            return True
        if slots:
            self._wake_at(slots[0], now)
        elif not (self.wanted or self.removed):
            self.wanted = max(1, min(waiting, math.ceil(self.rate * RESERVE_AHEAD), MAX_RESERVE))
            self._ask()
        return False

    def take(self) -> None:
        """Spends the slot ready() found due."""
        self.slots.popleft()

    def reserved(self, ends_in: float) -> None:
        """The slots asked for are this relay's; they end in `ends_in` seconds."""
        start = time.monotonic() + ends_in - self.wanted / self.rate
        self.slots.extend(start + i / self.rate for i in range(self.wanted))
        self.wanted = 0

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _wake_at(self, at: float, now: float) -> None:
        if self._timer is not None and self._timer_at == at:
            return
        self.close()
        self._timer_at = at
        self._timer = asyncio.get_running_loop().call_later(at - now, self._woken)

    def _woken(self) -> None:
        self._timer = None
        self._wake()


class Pacing:
    """The relay's paces, by listener id, and the task that reserves their slots."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self.paces: dict[int, Pace] = {}
        self._wake = wake
        self._asked = asyncio.Event()

    def update(self, rates: Mapping[int, float]) -> None:
        """The rate-limited listeners, as loaded: a new or changed rate starts afresh."""
        paces = {}
        for listener_id, rate in rates.items():
            pace = self.paces.get(listener_id)
            if pace is None or pace.rate != rate:
                pace = Pace(rate, self._wake, self._asked.set)
            paces[listener_id] = pace
        for listener_id, pace in self.paces.items():
            if paces.get(listener_id) is not pace:
                pace.close()
        self.paces = paces

    async def run(self, store: RelayStore) -> None:
        """Reserves the slots the paces ask for, all in one statement, then wakes the
        pump; on a new connection, also those asked for before an outage."""
        while True:
            if not any(pace.wanted for pace in self.paces.values()):
                self._asked.clear()
                await self._asked.wait()
            asking = {i: pace for i, pace in self.paces.items() if pace.wanted}
            ends = await store.reserve_sends({i: pace.wanted / pace.rate
                                              for i, pace in asking.items()})
            for listener_id, pace in asking.items():
                if ends is None:  # one was removed meanwhile: asked again at the next pump
                    pace.wanted = 0
                elif listener_id in ends:
                    pace.reserved(ends[listener_id])
                else:  # removed: its deliveries are released when the reload drops it
                    pace.wanted, pace.removed = 0, True
            self._wake()
