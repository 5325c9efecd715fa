"""Circuit breaker: a failing receiver costs the relay almost nothing.

After `threshold` attempts in a row fail without a usable answer (no response,
timeout, TLS or connection error, 5xx), a listener's circuit opens: its due
deliveries are recorded as failed attempts without a request, so they go on
through the retry schedule (and to dead letters) at the schedule's pace while
its connections, handshakes and timeouts stop taking the CPU and the slots the
healthy listeners need. When the pause ends, one delivery is sent as a probe:
an answer closes the circuit, another failure opens it for twice as long (up
to MAX_PAUSE). Each relay keeps its own circuits, in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

FIRST_PAUSE = 1.0  # seconds the circuit stays open the first time
MAX_PAUSE = 60.0  # the longest a recovered receiver waits for its probe


@dataclass
class Circuit:
    failures: int = 0  # attempts in a row without a usable answer
    last_error: str = ""
    open_until: float = 0.0  # monotonic time; 0: closed
    pause: float = 0.0
    probing: bool = False  # the probe is in flight

    def admits(self, now: float) -> str:
        """'send', 'probe' (send, as the one request that tests the receiver),
        'wait' (a probe is in flight) or 'skip' (fail without a request)."""
        if not self.open_until:
            return "send"
        if now < self.open_until:
            return "skip"
        if self.probing:
            return "wait"
        self.probing = True
        return "probe"

    def failed(self, error: str, now: float, threshold: int) -> bool:
        """Notes a failed request; True when this opens the circuit."""
        self.failures += 1
        self.last_error = error
        if not (self.probing or (not self.open_until and self.failures >= threshold)):
            return False
        self.pause = min(MAX_PAUSE, self.pause * 2 or FIRST_PAUSE)
        self.open_until = now + self.pause
        self.probing = False
        return True

    def skip_error(self, now: float) -> str:
        return (f"not sent: the last {self.failures} requests failed (last: {self.last_error}); "
                f"next request in {max(0.0, self.open_until - now):.1f} s")


def counts_as_failure(code: int | None, retryable: bool) -> bool:
    """No usable answer: the receiver (or the way to it) is broken, not the event.
    Errors that retrying cannot help (a refused address) fail at once anyway."""
    return (code is None and retryable) or (code is not None and code >= 500)
