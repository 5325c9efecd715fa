"""Listeners: who receives which hook's events, with what filter.

The one place that validates, changes and shows a listener, shared by the
CLI, the Python API, the REST API and the pages: the hook must be installed,
the match may name only provided fields, the URL must be http(s) to an
address the delivery policy allows, a given secret must be a whsec_ secret, its own headers must be
valid HTTP and none of those cdc-hooks sets itself, the event kinds (events)
must be ones the hook captures, the changed-column filter (changed) must
name provided columns and a rate limit must be a number of deliveries per second
within bounds. ``takes`` applies the two filters, for the relay's dispatch and
the web form's preview alike; the relay paces a rate-limited listener's sends
(relay/pacing.py).
"""

from __future__ import annotations

import contextlib
import enum
import math
import re
from collections.abc import Collection, Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from .. import jsoncodec
from ..config import Config
from ..db import Database
from ..errors import ListenerError, MatchError, NotFound
from ..match import rules_from_json
from ..netpolicy import NetworkPolicy, check_url
from ..rows import InstalledHook, ListenerCounts, ListenerRow
from ..signing import generate_secret, secret_key
from ..urls import redact_url, same_shown_url

# Options a listener may carry (listeners.config): name -> type.
LISTENER_OPTIONS: dict[str, type] = {
    "backfill": bool,  # False: no backfill ('read') events unless a backfill names it
}


# A listener's own headers: names the relay sets itself (or that frame the
# request) are refused, and so are more or longer ones than a receiver needs.
RESERVED_HEADERS = frozenset({"content-type", "content-length", "host", "user-agent",
                              "transfer-encoding", "connection"})
RESERVED_PREFIX = "webhook-"
MAX_HEADERS = 20
MAX_HEADER_VALUE = 4096
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,256}")  # RFC 7230 token, bounded
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # control characters but tab
# A listener's rate limit, deliveries per second: from one per 1000 s to far more than
# a relay sends.
MIN_RATE = 0.001
MAX_RATE = 100_000.0
DEFAULT_OVERLAP = 86_400.0  # seconds the replaced secret keeps signing after a rotation
MAX_OVERLAP = 30 * 86_400.0


class Keep(enum.Enum):
    """update_listener's default for a setting that None would clear (rate)."""

    KEEP = "keep"


KEEP = Keep.KEEP


@dataclass(frozen=True)
class NewListener:
    id: int
    secret: str  # shown once: it is never displayed again
    headers: dict[str, str]  # likewise: only their names are listed


def policy_of(config: Config) -> NetworkPolicy:
    return NetworkPolicy(config.delivery.allow_private_networks, config.delivery.allowed_networks)


def installed_hook(db: Database, name: str) -> InstalledHook:
    hooks = {h.name: h for h in db.installed_hooks()}
    if name not in hooks:
        known = ", ".join(sorted(hooks)) or "none installed: run cdc-hooks install"
        raise ListenerError(f'unknown hook "{name}" (hooks: {known})')
    return hooks[name]


def validate_match(hook: InstalledHook, match: Any) -> str:
    """The match as stored JSON text; raises MatchError/ListenerError naming the field."""
    rules_from_json(match)
    for field in match:
        if field not in hook.provides:
            raise ListenerError(
                f'match field "{field}": hook "{hook.name}" does not provide it '
                f"(provides: {', '.join(hook.provides) or 'nothing'})"
            )
    try:
        return jsoncodec.dumps(match)
    except (TypeError, ValueError) as exc:
        raise ListenerError(f"match values must be JSON-encodable: {exc}") from None


def stored_match(match_text: str) -> tuple[dict[str, Any] | None, str | None]:
    """A stored match and None, or None and why it is unusable: one stored before the
    limits of match.py, or written with SQL. Listings show the reason instead of
    failing; the relay skips such a listener (with an error log) until it is replaced."""
    try:
        match = jsoncodec.loads(match_text)
        rules_from_json(match)
    except ValueError as exc:  # MatchError, TooDeep
        return None, str(exc)
    return match, None


def allowed_events(hook: InstalledHook) -> tuple[str, ...]:
    """The event kinds a listener of the hook may choose: its captured events and
    'read' (backfills); a custom hook's events have no kinds to choose from."""
    return (*hook.events, "read") if hook.table_name is not None else ()


def validate_events(hook: InstalledHook, events: Iterable[str] | None) -> list[str] | None:
    """The listener's event kinds, deduplicated (None or empty: every event of the
    hook); raises ListenerError naming a kind the hook does not capture."""
    chosen = list(dict.fromkeys(events or ()))
    allowed = allowed_events(hook)
    for kind in chosen:
        if kind not in allowed:
            raise ListenerError(
                f'events: hook "{hook.name}" does not capture "{kind}" '
                f"(its events: {', '.join(allowed) or 'none to choose, it is a custom hook'})")
    return chosen or None


def validate_changed(hook: InstalledHook, changed: Iterable[str] | None) -> list[str] | None:
    """The changed-column filter (None or empty: every update); raises ListenerError
    naming a column the hook does not provide."""
    chosen = list(dict.fromkeys(changed or ()))
    for column in chosen:
        if column not in hook.provides or hook.table_name is None:
            raise ListenerError(
                f'changed: hook "{hook.name}" does not provide a column "{column}" '
                f"(provides: {', '.join(hook.provides) or 'nothing'})")
    return chosen or None


def takes(kinds: Collection[str] | None, changed: AbstractSet[str] | None, kind: str,
          changes: Mapping[str, Any] | None, for_listener: int | None = None) -> bool:
    """Whether a listener with these filters (None: none) takes an event of this kind
    and, for an update, these changed columns (None: unknown, taken). A backfill
    for one listener (for_listener) goes to it whatever its kinds."""
    if kinds is not None and kind not in kinds and for_listener is None:
        return False
    return changed is None or changes is None or not changed.isdisjoint(changes)


def split_names(values: Iterable[str]) -> list[str]:
    """Names given comma-separated and/or repeated (--events a,b --events c)."""
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


def validate_rate(rate: Any) -> float | None:
    """A rate limit in deliveries per second (None: no limit); raises ListenerError
    for anything else than a number from MIN_RATE to MAX_RATE."""
    if rate is None:
        return None
    number = math.nan
    if isinstance(rate, (int, float, Decimal)) and not isinstance(rate, bool):
        with contextlib.suppress(OverflowError, ValueError):  # 10**400, Decimal("sNaN")
            number = float(rate)
    if not MIN_RATE <= number <= MAX_RATE:  # NaN too
        raise ListenerError(f"rate must be a number of deliveries per second from {MIN_RATE:g} "
                            f"to {MAX_RATE:g}, not {_shown(repr(rate))}")
    return number


def validate_config(listener_config: Mapping[str, Any]) -> dict[str, Any]:
    """A listener's options; raises ListenerError naming an unknown or bad one."""
    for key, value in listener_config.items():
        if key not in LISTENER_OPTIONS:
            raise ListenerError(f"unknown listener option {key!r} (options: "
                                f"{', '.join(LISTENER_OPTIONS)})")
        if not isinstance(value, LISTENER_OPTIONS[key]):
            raise ListenerError(f"listener option {key!r} must be true or false, "
                                f"not {value!r}")
    return dict(listener_config)


def validate_headers(headers: Mapping[str, Any]) -> dict[str, str]:
    """A listener's own headers; raises ListenerError naming a bad one."""
    if len(headers) > MAX_HEADERS:
        raise ListenerError(f"at most {MAX_HEADERS} headers, not {len(headers)}")
    seen: set[str] = set()
    for name, value in headers.items():
        lowered = str(name).lower()
        if not isinstance(name, str) or not _TOKEN.fullmatch(name):
            raise ListenerError(f"header {name!r}: not a valid header name (letters, digits "
                                "and !#$%&'*+-.^_`|~, at most 256)")
        if lowered in RESERVED_HEADERS or lowered.startswith(RESERVED_PREFIX):
            raise ListenerError(f'header "{name}": cdc-hooks sets it itself')
        if lowered in seen:
            raise ListenerError(f'header "{name}": given twice')
        seen.add(lowered)
        if not isinstance(value, str):
            raise ListenerError(f'header "{name}": the value must be text')
        if _BAD_VALUE.search(value):
            raise ListenerError(f'header "{name}": the value must not contain control '
                                "characters (CR, LF, NUL...)")
        if len(value) > MAX_HEADER_VALUE:
            raise ListenerError(f'header "{name}": the value is longer than '
                                f"{MAX_HEADER_VALUE} characters")
    return dict(headers)


def headers_from_lines(lines: Iterable[str]) -> dict[str, str]:
    """Headers given as "Name: value" lines (CLI --header, the web form); blank lines
    are skipped, a name given twice is refused by validate_headers."""
    headers: dict[str, str] = {}
    for line in lines:
        if not line.strip():
            continue
        name, colon, value = line.partition(":")
        if not colon:
            raise ListenerError(f'header "{_shown(line)}": write it as "Name: value"')
        name = name.strip()
        if name.lower() in (n.lower() for n in headers):
            raise ListenerError(f'header "{name}": given twice')
        headers[name] = value.strip(" \t")
    return validate_headers(headers)


def _shown(line: str) -> str:
    """A malformed header line as quoted in an error: its first 40 characters,
    since it may be a value (a secret) given without its name."""
    return line[:40] + ("..." if len(line) > 40 else "")


def validate_overlap(overlap: float) -> float:
    if not 0 <= overlap <= MAX_OVERLAP:  # NaN too
        raise ListenerError(f"overlap must be between 0 and {MAX_OVERLAP:g} seconds, "
                            f"not {overlap:g}")
    return float(overlap)


def add_listener(db: Database, config: Config, hook: str, url: str,
                 match: Mapping[str, Any] | None = None, secret: str | None = None,
                 listener_config: Mapping[str, Any] | None = None,
                 headers: Mapping[str, str] | None = None,
                 events: Iterable[str] | None = None,
                 changed: Iterable[str] | None = None, rate: float | None = None) -> NewListener:
    """headers: sent with every delivery; events: the kinds it takes (default: every
    event of the hook); changed: an update reaches it only if one of these columns
    changed (default: any update); rate: at most this many deliveries per second,
    across every relay (default: no limit)."""
    declared = installed_hook(db, hook)
    match_json = validate_match(declared, dict(match or {}))
    kinds = validate_events(declared, events)
    columns = validate_changed(declared, changed)
    rate = validate_rate(rate)
    check_url(url, policy_of(config))
    if secret is None:
        secret = generate_secret()
    else:
        secret_key(secret)
    config_json = jsoncodec.dumps(validate_config(listener_config or {}))
    own_headers = validate_headers(headers or {})
    with db.transaction():
        listener_id = db.add_listener(hook, url, match_json, config_json, secret,
                                      jsoncodec.dumps(own_headers), kinds, columns, rate)
    return NewListener(listener_id, secret, own_headers)


def _stored(db: Database, listener_id: int) -> ListenerRow:
    row = db.get_listener(listener_id)
    if row is None:
        raise NotFound(f"no listener with id {listener_id}")
    return row


@dataclass(frozen=True)
class LastDelivery:
    status: str
    code: int | None
    error: str | None
    finished_at: datetime | None


@dataclass(frozen=True)
class ListenerStats:
    """Over the listener's last 1000 deliveries."""

    delivered: int
    dead: int
    retrying: int
    queued: int
    success_rate: float | None  # delivered / (delivered + dead + retrying)


@dataclass(frozen=True)
class ListenerView:
    """A listener as every interface shows it: no secret, no header value, the URL
    with credentials masked, the match parsed (None, with match_error, if unusable)."""

    id: int
    hook: str
    url: str
    match: dict[str, Any] | None
    match_error: str | None
    match_text: str  # the stored match, as PostgreSQL writes it
    state: str
    disabled_reason: str | None
    backfill: bool
    header_names: list[str]
    secret_overlap_until: datetime | None
    events: list[str] | None
    changed: list[str] | None
    rate: float | None  # deliveries per second at most (None: no limit)
    created_at: datetime
    updated_at: datetime
    last_delivery: LastDelivery | None
    stats: ListenerStats


def list_listeners(db: Database, *, hook: str | None = None,
                   listener_id: int | None = None) -> list[ListenerView]:
    """Listeners (of one hook, or the one listener, if given), by id."""
    counts = {c.id: c for c in db.listener_stats(listener_id)}
    return [_view(row, counts.get(row.id)) for row in db.list_listeners()
            if (hook is None or row.hook == hook) and (listener_id is None or row.id == listener_id)]


def get_listener(db: Database, listener_id: int) -> ListenerView:
    found = list_listeners(db, listener_id=listener_id)
    if not found:
        raise NotFound(f"no listener with id {listener_id}")
    return found[0]


def _view(row: ListenerRow, counts: ListenerCounts | None) -> ListenerView:
    last = None
    if row.last_status is not None:
        last = LastDelivery(row.last_status, row.last_code, row.last_error, row.last_finished_at)
    match, match_error = stored_match(row.match)
    return ListenerView(
        id=row.id, hook=row.hook, url=redact_url(row.url), match=match, match_error=match_error,
        match_text=row.match, state=row.state, disabled_reason=row.disabled_reason,
        backfill=row.backfill, header_names=row.header_names,
        secret_overlap_until=row.overlap_until, events=row.events, changed=row.changed, rate=row.rate,
        created_at=row.created_at, updated_at=row.updated_at, last_delivery=last,
        stats=_stats(counts))


def _stats(counts: ListenerCounts | None) -> ListenerStats:
    if counts is None:
        return ListenerStats(0, 0, 0, 0, None)
    tried = counts.delivered + counts.dead + counts.retrying
    return ListenerStats(counts.delivered, counts.dead, counts.retrying, counts.queued,
                         counts.delivered / tried if tried else None)


def remove_listener(db: Database, listener_id: int) -> None:
    if not db.remove_listener(listener_id):
        raise NotFound(f"no listener with id {listener_id}")


def set_state(db: Database, listener_id: int, state: str) -> None:
    """Pause holds deliveries (they go out on resume); resume also re-enables.

    Resuming makes pending deliveries that wait for a distant retry due now,
    with a fresh attempt budget: a listener disabled after days of failures
    gets what it missed at once. Dead letters stay dead: redeliver them with
    ``cdc-hooks redeliver --listener ID`` if they are wanted.

    Resuming checks the match again, as at creation: a listener paused because
    install removed its hook or a field it matches stays paused until changed.
    """
    if state == "active":
        current = _stored(db, listener_id)
        try:
            validate_match(installed_hook(db, current.hook), jsoncodec.loads(current.match))
        except (ListenerError, MatchError) as exc:
            raise ListenerError(f"listener {listener_id} cannot be resumed: {exc}; change its "
                                "match or remove it") from None
    with db.transaction():
        if not db.set_listener_state(listener_id, state):
            raise NotFound(f"no listener with id {listener_id}")
        if state == "active":
            db.resume_listener_deliveries(listener_id)


def update_listener(db: Database, config: Config, listener_id: int, *, url: str | None = None,
                    match: Mapping[str, Any] | None = None, rotate_secret: bool = False,
                    overlap: float = DEFAULT_OVERLAP, headers: Mapping[str, str] | None = None,
                    backfill: bool | None = None, events: Iterable[str] | None = None,
                    changed: Iterable[str] | None = None,
                    rate: float | Keep | None = KEEP) -> str | None:
    """Changes URL, match, headers (the whole set: {} clears it), whether it takes
    backfill events, its event kinds and/or changed-column filter (None keeps one,
    empty resets it to its default), its rate limit (None: no limit; not given:
    kept); returns the new secret when rotated. The secret it replaces still signs
    every delivery beside it for ``overlap`` seconds."""
    overlap = validate_overlap(overlap)
    new_rate = None if rate is KEEP else validate_rate(rate)
    headers_json = None if headers is None else jsoncodec.dumps(validate_headers(headers))
    current = _stored(db, listener_id)
    changes_filters = match is not None or events is not None or changed is not None
    declared = installed_hook(db, current.hook) if changes_filters else None
    if url is not None and same_shown_url(url, current.url):
        url = None  # as listed (credentials masked): the stored URL stays
    match_json = None
    if declared is not None and match is not None:
        match_json = validate_match(declared, dict(match))
    kinds = columns = None
    if declared is not None and events is not None:
        kinds = validate_events(declared, events) or []
    if declared is not None and changed is not None:
        columns = validate_changed(declared, changed) or []
    if url is not None:
        check_url(url, policy_of(config))
    secret = generate_secret() if rotate_secret else None
    with db.transaction():
        db.update_listener(listener_id, url=url, match_json=match_json, secret=secret,
                           overlap=overlap, headers_json=headers_json, backfill=backfill,
                           events=kinds, changed=columns, set_rate=rate is not KEEP,
                           rate=new_rate)
        if url is not None:  # another receiver: its circuit starts closed
            db.reset_circuit(listener_id)
    return secret


def rotate(db: Database, config: Config, listener_id: int,
           overlap: float = DEFAULT_OVERLAP) -> str:
    """A new signing secret (returned, to be shown once); the replaced one keeps
    signing beside it for ``overlap`` seconds (0: stops at once)."""
    secret = update_listener(db, config, listener_id, rotate_secret=True, overlap=overlap)
    assert secret is not None
    return secret
