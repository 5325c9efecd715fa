"""Listeners: who receives which hook's events, with what filter.

The one place that validates a listener, shared by the CLI, the Python API
and the web interface: the hook must be installed, the match may name only
provided fields, the URL must be http(s) to an address the delivery policy
allows, and a given secret must be a whsec_ secret.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from . import jsoncodec
from .config import Config
from .db import Database, InstalledHook, ListenerRow
from .errors import ListenerError, MatchError, NotFound
from .match import rules_from_json
from .netpolicy import NetworkPolicy, check_url
from .signing import generate_secret, secret_key
from .urls import same_shown_url

# Options a listener may carry (listeners.config): name -> type.
LISTENER_OPTIONS: dict[str, type] = {
    "backfill": bool,  # False: no backfill ('read') events unless a backfill names it
}


@dataclass(frozen=True)
class NewListener:
    id: int
    secret: str  # shown once: it is never displayed again


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


def add_listener(db: Database, config: Config, hook: str, url: str,
                 match: Mapping[str, Any] | None = None, secret: str | None = None,
                 listener_config: Mapping[str, Any] | None = None) -> NewListener:
    declared = installed_hook(db, hook)
    match_json = validate_match(declared, dict(match or {}))
    check_url(url, policy_of(config))
    if secret is None:
        secret = generate_secret()
    else:
        secret_key(secret)
    config_json = jsoncodec.dumps(validate_config(listener_config or {}))
    with db.transaction():
        listener_id = db.add_listener(hook, url, match_json, config_json, secret)
    return NewListener(listener_id, secret)


def get_listener(db: Database, listener_id: int) -> ListenerRow:
    row = db.get_listener(listener_id)
    if row is None:
        raise NotFound(f"no listener with id {listener_id}")
    return row


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
        current = get_listener(db, listener_id)
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
                    backfill: bool | None = None) -> str | None:
    """Changes URL, match and/or whether it takes backfill events; returns the new
    secret when rotated."""
    current = get_listener(db, listener_id)
    if url is not None and same_shown_url(url, current.url):
        url = None  # as listed (credentials masked): the stored URL stays
    match_json = None
    if match is not None:
        match_json = validate_match(installed_hook(db, current.hook), dict(match))
    if url is not None:
        check_url(url, policy_of(config))
    secret = generate_secret() if rotate_secret else None
    with db.transaction():
        db.update_listener(listener_id, url=url, match_json=match_json, secret=secret,
                           backfill=backfill)
    return secret
