"""Token guessing, slowed down: the admin surfaces (REST API, web login, /metrics)
refuse an address that sent LIMIT wrong tokens within WINDOW seconds until the
oldest of those is WINDOW seconds old.

Per process and per client address, as the server sees it (an IPv6 client
by its /64: one host usually has the whole network): behind a reverse proxy
every client shares the proxy's address, so a flood of wrong tokens locks
everyone out for at most WINDOW seconds, never longer.
"""

from __future__ import annotations

import hmac
import ipaddress
import math
import threading
import time
from collections import deque
from collections.abc import Callable

LIMIT = 10  # wrong tokens per address and window
WINDOW = 60.0  # seconds
MAX_ADDRESSES = 10_000  # addresses remembered at most (memory stays bounded)


class TooManyGuesses(Exception):
    """Answered 429 with Retry-After: retry_after seconds."""

    def __init__(self, address: str, retry_after: int) -> None:
        super().__init__(f"too many wrong tokens from {address}: try again in {retry_after} s")
        self.retry_after = retry_after


class GuessLimit:
    def __init__(self, limit: int = LIMIT, window: float = WINDOW,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window = window
        self.clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()  # the web app checks tokens on worker threads

    def check(self, address: str, given: str | None, token: str) -> bool:
        """True if given is the token (compared in constant time). Raises
        TooManyGuesses while the address is locked out, without comparing; a wrong
        token counts toward the limit, a missing one (None) does not."""
        with self._lock:
            wait = self.retry_after(address)
            if wait:
                raise TooManyGuesses(address, wait)
            if given is None:
                return False
            if hmac.compare_digest(given.encode("utf-8", "replace"), token.encode("utf-8")):
                return True
            self.failed(address)
            return False

    def retry_after(self, address: str) -> int:
        """Whole seconds until this address may try a token again; 0: now."""
        failures = self._failures.get(_client(address))
        if failures is None or len(failures) < self.limit:
            return 0
        return max(0, math.ceil(failures[0] + self.window - self.clock()))

    def failed(self, address: str) -> None:
        """Notes a wrong token from this address."""
        now, client = self.clock(), _client(address)
        failures = self._failures.get(client)
        if failures is None:
            if len(self._failures) >= MAX_ADDRESSES:
                self._forget_before(now - self.window)
            failures = self._failures[client] = deque(maxlen=self.limit)
        failures.append(now)

    def _forget_before(self, moment: float) -> None:
        stale = [a for a, failures in self._failures.items() if failures[-1] < moment]
        for address in stale or list(self._failures)[: MAX_ADDRESSES // 2]:
            del self._failures[address]


def _client(address: str) -> str:
    """Who sent it: the address, or an IPv6 address's /64."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:  # "testclient", a Unix socket: as given
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return f"{ipaddress.IPv6Address(int(ip) >> 64 << 64)}/64"
    return str(ip)
