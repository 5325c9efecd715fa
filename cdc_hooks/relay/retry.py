"""What an attempt's outcome means: delivered, retry later, or give up."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

RETRYABLE_STATUS = {408, 429}
MAX_RETRY_AFTER = 3600.0  # a receiver cannot park a delivery for longer per attempt
JITTER = 0.2  # +-20%, so retries of a burst do not return as a burst


@dataclass(slots=True)  # not frozen: a frozen __init__ is several times slower; this is per attempt
class Outcome:
    status: str  # 'delivered', 'pending' (retry later) or 'dead'
    retry_in: float | None = None
    gone: bool = False  # 410: the receiver asks us to stop; the listener is disabled


def classify(code: int | None, attempt: int, schedule: Sequence[float], *,
             retry_after: str | None = None, retryable_error: bool = True) -> Outcome:
    """Outcome of attempt number ``attempt`` (1-based) that got HTTP ``code``
    (None: no response — connection error or timeout)."""
    if code is not None and 200 <= code < 300:
        return Outcome("delivered")
    if code == 410:
        return Outcome("dead", gone=True)
    retryable = retryable_error if code is None else (code >= 500 or code in RETRYABLE_STATUS)
    if not retryable or attempt > len(schedule):
        return Outcome("dead")
    delay = schedule[attempt - 1] * random.uniform(1 - JITTER, 1 + JITTER)
    hinted = parse_retry_after(retry_after) if code in (429, 503) else None
    if hinted is not None:
        delay = min(max(hinted, delay), MAX_RETRY_AFTER)
    return Outcome("pending", retry_in=delay)


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP date), else None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())
