"""The pages' sessions, kept in the database (cdc_hooks.web_sessions).

The cookie carries only a random id and the table only its SHA-256, so neither
gives anything to test a token guess against, unlike a cookie signed with a key
derived from the token, which anyone could fetch from the login page and check
guesses against offline. Logging out deletes the row: the session ends for every
copy of the cookie, in every web process. A session lasts MAX_AGE from its login,
and only while the token is the one it logged in with.

The lookups block: call these on a worker thread (FastAPI runs sync endpoints and
dependencies there), never in the event loop a relay may share.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, TypedDict

import psycopg
from fastapi import Request, Response

from ..db import Database
from ..errors import DatabaseUnavailable

COOKIE = "cdc_hooks_session"
MAX_AGE = 12 * 3600  # seconds: a day's work, then log in again
_NOT_LOOKED_UP = object()


@dataclass(frozen=True)
class Session:
    id_hash: bytes
    csrf: str  # every form of the session carries it
    flash: str | None  # a message for the next page


def login_tag(token: str) -> str:
    """What a session stores of the token it logged in with, so that changing the
    token ends every session. scrypt: the table's readers (the schema's owner) get
    nothing cheap to test guesses against either."""
    return hashlib.scrypt(token.encode(), salt=b"cdc-hooks web session", n=1 << 14, r=8, p=1,
                          dklen=32).hex()


def session_of(request: Request) -> Session | None:
    """The request's live session, looked up once per request."""
    found: Session | object | None = getattr(request.state, "web_session", _NOT_LOOKED_UP)
    if found is not _NOT_LOOKED_UP:
        return found if isinstance(found, Session) else None
    request.state.web_session = None  # a lookup that failed is not tried again (the error page)
    cookie = request.cookies.get(COOKIE)
    session = None
    if cookie:
        with _sessions(request) as db:
            row = db.web_session(_hash(cookie), request.app.state.web.login_tag)
        session = Session(_hash(cookie), *row) if row else None
    request.state.web_session = session
    return session


def start(request: Request, response: Response) -> None:
    """A new session (new id, new CSRF token: no fixation) in place of the request's
    own, if any; expired sessions are pruned meanwhile."""
    session_id = secrets.token_urlsafe(32)
    with _sessions(request) as db, db.transaction():
        db.prune_web_sessions()
        _end(db, request)
        db.start_web_session(_hash(session_id), request.app.state.web.login_tag,
                             secrets.token_urlsafe(24), MAX_AGE)
    response.set_cookie(COOKIE, session_id, max_age=MAX_AGE, **cookie_flags(request))
    request.state.web_session = None  # this request still has none


def end(request: Request, response: Response) -> None:
    """Logs out: the session's row goes, so no copy of the cookie opens it again."""
    with _sessions(request) as db:
        _end(db, request)
    response.delete_cookie(COOKIE, **cookie_flags(request))
    request.state.web_session = None


def _end(db: Database, request: Request) -> None:
    cookie = request.cookies.get(COOKIE)
    if cookie:
        db.end_web_session(_hash(cookie))


def set_flash(request: Request, message: str) -> None:
    session = session_of(request)
    if session is not None:
        with _sessions(request) as db:
            db.set_web_session_flash(session.id_hash, message)


def take_flash(request: Request) -> str | None:
    """The message left for this page, once."""
    session = session_of(request)
    if session is None or session.flash is None:
        return None
    with _sessions(request) as db:
        db.set_web_session_flash(session.id_hash, None)
    return session.flash


class CookieFlags(TypedDict):
    path: str
    httponly: bool
    samesite: Literal["strict"]
    secure: bool


def cookie_flags(request: Request) -> CookieFlags:
    """HttpOnly (no script reads it), SameSite=Strict (no other site's request
    carries it), Secure unless the app was made for plain http (tests)."""
    return {"path": "/", "httponly": True, "samesite": "strict",
            "secure": request.app.state.web.secure_cookies}


def _hash(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode("utf-8", "replace")).digest()


@contextmanager
def _sessions(request: Request) -> Iterator[Database]:
    try:
        with request.app.state.web.connections.database() as db:
            yield db
    except (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName):
        raise DatabaseUnavailable("the web interface keeps its sessions in cdc_hooks.web_sessions, "
                                  "which is missing: run cdc-hooks install") from None
