"""How a DSN shows in messages: its target (host:port/dbname), never its password.

Every message, log line and HTTP answer about the database goes through here.
A DSN can parse into something else than meant, with part of the password in
another field: an unencoded ``@`` or ``/`` in a URL's password puts the rest
of it in the host, the port or the database name, and an unquoted space in a
key/value password makes the rest an option name, which psycopg's parse
error quotes. So a DSN is described only when it parses, its hosts and ports
look like hosts and ports, and, written as a URL, it has no ``@`` but the one
that ends its user and password; otherwise it is called malformed, and
neither it nor psycopg's error is repeated.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .errors import MalformedDsn, first_line

DSN_ENV = "CDC_HOOKS_DSN"

_HOST = re.compile(r"[\w.-]*|[0-9A-Fa-f:.]+(%[A-Za-z0-9_.-]+)?|/.*")
_PORT = re.compile(r"[0-9]*")
_URL_PREFIXES = ("postgresql://", "postgres://")


def parse_dsn(dsn: str) -> dict[str, str] | None:
    """The DSN's parameters, or None when it is malformed (see the module's doc)."""
    if _url_with_stray_at(dsn):
        return None
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:  # its text quotes the DSN: never shown
        return None
    fields = [(_HOST, h) for h in _entries(params, "host") + _entries(params, "hostaddr")]
    fields += [(_PORT, p) for p in _entries(params, "port")]
    if not all(pattern.fullmatch(value) for pattern, value in fields):
        return None
    return {key: str(value) for key, value in params.items() if value is not None}


def describe_dsn(dsn: str) -> str:
    """host:port/dbname of a DSN, for messages: never any part of its password."""
    params = parse_dsn(dsn)
    if params is None:
        return "(malformed DSN)"
    host = params.get("host") or params.get("hostaddr") or "local socket"
    port = params.get("port") or "5432"
    return f"{host}:{port}/{params.get('dbname') or params.get('user') or ''}"


def check_dsn(dsn: str, origin: str | None = None) -> None:
    """Raises MalformedDsn, saying where the DSN came from, when it is malformed.
    origin: where it was given (default: CDC_HOOKS_DSN or the config file)."""
    if parse_dsn(dsn) is None:
        where = origin or (DSN_ENV if os.environ.get(DSN_ENV) == dsn else "[database] dsn")
        raise MalformedDsn(
            f"the database DSN ({where}) is malformed (not shown: it may hold a password); "
            "put key=value values in single quotes, or percent-encode @ / ? # and spaces "
            "in a URL's password")


def connect_error(dsn: str, exc: BaseException) -> str:
    """The reason a connection failed: psycopg's first line, with the password
    (should it ever show) masked."""
    return redact(dsn, first_line(exc))


def redact(dsn: str, text: str) -> str:
    """The text with the DSN's password masked (a defence in depth: libpq does not
    quote the password, and a malformed DSN is never tried). Not a password of
    under 4 characters: masking would garble the message, not hide much."""
    params = parse_dsn(dsn)
    password = params.get("password") if params else None
    return text.replace(password, "***") if password and len(password) >= 4 else text


def without_password(dsn: str) -> str:
    """The DSN in key/value form without its password (psql asks or reads .pgpass)."""
    params = parse_dsn(dsn)
    if params is None:
        return "(malformed DSN)"
    params.pop("password", None)
    return make_conninfo(**params)


def _url_with_stray_at(dsn: str) -> bool:
    """A URL with an ``@`` outside its userinfo: a password's, not percent-encoded."""
    if not dsn.lower().startswith(_URL_PREFIXES):
        return False
    before_query = dsn.split("://", 1)[1].split("?", 1)[0]
    authority, _, path = before_query.partition("/")
    return authority.count("@") > 1 or "@" in path


def _entries(params: Mapping[str, str | int | None], key: str) -> list[str]:
    value = params.get(key)
    return [] if not value else str(value).split(",")
