"""JSON for event data: numbers stay exact (PostgreSQL numeric -> Decimal -> same digits)."""

from __future__ import annotations

from typing import Any

import simplejson


def loads(text: str | bytes) -> Any:
    return simplejson.loads(text, use_decimal=True)


def dumps(value: Any) -> str:
    """Compact JSON; raises TypeError for values JSON cannot carry."""
    return simplejson.dumps(
        value, use_decimal=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
