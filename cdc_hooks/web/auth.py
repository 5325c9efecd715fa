"""Who may use the web interface: one token, sent as a Bearer header by API
clients and typed once into the login form by people (then a session kept in
the database, see sessions.py; its cookie is HttpOnly, Secure, SameSite=Strict).
Forms carry the session's CSRF token, the login form a random one its cookie repeats.

The token and the session are checked before a body is read (TokenFirst, SessionFirst).
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

import psycopg
from fastapi import Depends, HTTPException, Request, Response, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..errors import CdcHooksError
from ..jsoncodec import storable_text
from . import sessions

BEARER = HTTPBearer(auto_error=False, description="The [web] token (or CDC_HOOKS_WEB_TOKEN)")
LOGIN_COOKIE = "cdc_hooks_login"  # the login form's CSRF token, before there is a session


class LoginRequired(Exception):
    """A page was asked for without a session: answered with a redirect to /login."""


def same(given: str, expected: str) -> bool:
    """Constant-time comparison that accepts any text (compare_digest wants ASCII str)."""
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode("utf-8"))


def token_of(request: Request) -> str:
    token: str = request.app.state.web.token
    return token


def is_token(request: Request, given: str | None) -> bool:
    """given is the token; raises TooManyGuesses (429) while this client is
    locked out for sending wrong ones (cdc_hooks/guesses.py)."""
    address = request.client.host if request.client else "unknown"
    right: bool = request.app.state.web.guesses.check(address, given, token_of(request))
    return right


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
            await run_in_threadpool(require_session, request)  # a database lookup
            return await handler(request)

        return session_first


def logged_in(request: Request) -> bool:
    """A live session (blocking: a worker thread's call)."""
    return sessions.session_of(request) is not None


def page_session(request: Request) -> sessions.Session | None:
    """The session, for drawing a page: None if the database cannot say (the error
    page of a database that is down must not fail in turn)."""
    try:
        return sessions.session_of(request)
    except (CdcHooksError, psycopg.Error):
        return None


def require_session(request: Request) -> None:
    """A logged-in session, else a redirect to the login page."""
    if not logged_in(request):
        raise LoginRequired


def login_csrf(request: Request) -> str:
    """The login form's CSRF token (before any session): its cookie's, else a new one."""
    return request.cookies.get(LOGIN_COOKIE) or secrets.token_urlsafe(32)


def remember_login_csrf(request: Request, response: Response, csrf: str) -> None:
    """Double submit for the login form, which comes before any session: another
    site can neither read this cookie nor make a browser send it (SameSite=Strict)."""
    response.set_cookie(LOGIN_COOKIE, csrf, **sessions.cookie_flags(request))


async def form_fields(request: Request) -> dict[str, str]:
    form = await request.form()
    return {k: v for k, v in form.multi_items() if isinstance(v, str)}


def checked_form(request: Request, fields: Annotated[dict[str, str], Depends(form_fields)]
                 ) -> dict[str, Any]:
    """Page dependency for POSTs: the form's fields, after its CSRF token is checked
    (a sync function: FastAPI runs it on a worker thread, where the session lookup may block)."""
    session = sessions.session_of(request)
    expected = session.csrf if session is not None else request.cookies.get(LOGIN_COOKIE)
    given = fields.get("csrf") or request.headers.get("x-csrf-token", "")
    if not expected or not same(given, expected):
        raise HTTPException(403, "this form expired or did not come from this site: "
                                 "reload the page and try again")
    for name, value in fields.items():
        try:
            storable_text(value)
        except ValueError as exc:
            raise HTTPException(422, f"{name}: {exc}") from None
    return fields
