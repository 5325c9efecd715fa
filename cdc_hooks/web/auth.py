"""Who may use the web interface: one token, sent as a Bearer header by API
clients and typed once into the login form by people (then a signed session
cookie: HttpOnly, Secure, SameSite=Strict). Forms carry a per-session CSRF token.

The session signing key is derived from the token, so changing the token logs
every browser out, and several processes with one token share sessions.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import HTTPException, Request, Response, Security
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .models import storable_text

BEARER = HTTPBearer(auto_error=False, description="The [web] token (or CDC_HOOKS_WEB_TOKEN)")
SESSION_COOKIE = "cdc_hooks_session"
SESSION_MAX_AGE = 12 * 3600  # seconds: a day's work, then log in again


class LoginRequired(Exception):
    """A page was asked for without a session: answered with a redirect to /login."""


def same(given: str, expected: str) -> bool:
    """Constant-time comparison that accepts any text (compare_digest wants ASCII str)."""
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode("utf-8"))


def session_key(token: str) -> str:
    return hmac.new(token.encode(), b"cdc-hooks web session", hashlib.sha256).hexdigest()


def token_of(request: Request) -> str:
    return request.app.state.web.token  # type: ignore[no-any-return]


def fingerprint(token: str) -> str:
    """What a session stores to say it logged in with this token (never the token)."""
    return hmac.new(token.encode(), b"cdc-hooks web login", hashlib.sha256).hexdigest()[:32]


def is_token(request: Request, given: str | None) -> bool:
    """given is the token; raises TooManyGuesses (429) while this client is
    locked out for sending wrong ones (cdc_hooks/guesses.py)."""
    address = request.client.host if request.client else "unknown"
    return request.app.state.web.guesses.check(address, given, token_of(request))  # type: ignore[no-any-return]


def require_bearer(request: Request, given: str | None) -> None:
    if not is_token(request, given):
        raise HTTPException(401, "missing or wrong token: send Authorization: Bearer TOKEN",
                            headers={"WWW-Authenticate": "Bearer"})


def require_token(request: Request,
                  credentials: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)]) -> None:
    """API dependency: a valid Authorization: Bearer header, else 401."""
    require_bearer(request, credentials.credentials if credentials else None)


Handler = Callable[[Request], Coroutine[Any, Any, Response]]


class TokenFirst(APIRoute):
    """An API route that checks the Bearer token before anything else. FastAPI reads
    and parses a route's body before it runs the route's dependencies: without this,
    a client without the token had its body read whole and parsed (a 422, not a 401)."""

    def get_route_handler(self) -> Handler:
        handler = super().get_route_handler()

        async def token_first(request: Request) -> Response:
            credentials = await BEARER(request)
            require_bearer(request, credentials.credentials if credentials else None)
            return await handler(request)

        return token_first


class SessionFirst(APIRoute):
    """A page route: a logged-in session before its form is read, else the login page."""

    def get_route_handler(self) -> Handler:
        handler = super().get_route_handler()

        async def session_first(request: Request) -> Response:
            require_session(request)
            return await handler(request)

        return session_first


def logged_in(request: Request) -> bool:
    stored = request.session.get("login")
    return isinstance(stored, str) and same(stored, fingerprint(token_of(request)))


def require_session(request: Request) -> None:
    """Page dependency: a logged-in session, else a redirect to the login page."""
    if not logged_in(request):
        raise LoginRequired


def log_in(request: Request) -> None:
    request.session.clear()  # a fresh session (and CSRF token) on login: no fixation
    request.session["login"] = fingerprint(token_of(request))
    new_csrf_token(request)


def csrf_token(request: Request) -> str:
    token = request.session.get("csrf")
    return token if isinstance(token, str) else new_csrf_token(request)


def new_csrf_token(request: Request) -> str:
    token = secrets.token_urlsafe(24)
    request.session["csrf"] = token
    return token


async def checked_form(request: Request) -> dict[str, Any]:
    """Page dependency for POSTs: the form's fields, after its CSRF token is checked."""
    form = await request.form()
    fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
    expected = request.session.get("csrf")
    given = fields.get("csrf") or request.headers.get("x-csrf-token", "")
    if not isinstance(expected, str) or not same(given, expected):
        raise HTTPException(403, "this form expired or did not come from this site: "
                                 "reload the page and try again")
    for name, value in fields.items():
        try:
            storable_text(value)
        except ValueError as exc:
            raise HTTPException(422, f"{name}: {exc}") from None
    return fields
