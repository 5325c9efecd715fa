"""create_app(config): the FastAPI application serving the REST API and the pages."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import psycopg
from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import services
from ..config import WEB_TOKEN_ENV, Config, web_token
from ..db import Database
from ..errors import AlreadyQueued, CdcHooksError, ConfigError, DatabaseUnavailable, NotFound, first_line
from ..guesses import GuessLimit, TooManyGuesses
from . import api, metrics, pages
from .auth import LoginRequired, require_token
from .dbpool import Connections
from .limits import BodyLimit
from .models import FieldProblem, Health, Problem, Readiness
from .sessions import login_tag

log = logging.getLogger("cdc_hooks.web")

DESCRIPTION = """Change-data-capture from PostgreSQL to signed webhooks.

Every endpoint but /healthz and /readyz needs `Authorization: Bearer TOKEN`
(the `[web] token` of the config, or `CDC_HOOKS_WEB_TOKEN`). Matches use the
`$`-operator JSON form: a plain value is an exact match, `{"$startswith": "J"}`,
`$endswith`, `$contains`, `$like` (a regular expression, RE2), `$is`, `$any`;
any other object matches inside a json column.
"""


@dataclass(frozen=True)
class WebState:
    config: Config
    token: str
    connections: Connections
    guesses: GuessLimit  # wrong tokens per client address
    login_tag: str  # what sessions store of the token (sessions.login_tag)
    secure_cookies: bool  # Secure cookies (browsers send those to http://localhost too)


def create_app(config: Config, *, token: str | None = None, secure_cookies: bool = True,
               db_wait: float = 5.0, guesses: GuessLimit | None = None) -> FastAPI:
    """The application; `token` defaults to cdc_hooks.config.web_token(config) and one is required.
    `db_wait`: seconds a request waits for a database connection before answering 503.
    `guesses`: how many wrong tokens a client may send (default: guesses.LIMIT a minute)."""
    token = token or web_token(config)
    if not token:
        raise ConfigError(f"the web interface needs a token: set [web] token or {WEB_TOKEN_ENV}")
    connections = Connections(config.dsn, wait=db_wait)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        connections.close()

    app = FastAPI(title="cdc-hooks", version=_version(), description=DESCRIPTION,
                  docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.web = WebState(config, token, connections, guesses or GuessLimit(), login_tag(token),
                             secure_cookies)
    app.add_middleware(SecurityHeaders)
    app.add_middleware(BodyLimit)
    app.mount("/static", StaticFiles(packages=[("cdc_hooks.web", "static")]), name="static")
    _add_error_handlers(app)
    _add_health(app)
    app.include_router(api.router)
    app.include_router(metrics.router)
    app.include_router(pages.public)
    app.include_router(pages.router)
    return app


def _version() -> str:
    try:
        return version("cdc-hooks")
    except PackageNotFoundError:
        return "0"


def _add_health(app: FastAPI) -> None:
    @app.get("/healthz", tags=["health"], summary="The process is alive", openapi_extra={"security": []})
    def healthz() -> Health:
        return Health()

    @app.get("/readyz", tags=["health"], summary="The database answers and the relay keeps up",
             responses={503: {"model": Readiness, "description": "Not ready"}},
             openapi_extra={"security": []}, response_model=Readiness)
    def readyz(request: Request) -> Readiness | JSONResponse:
        try:
            with Database.connect(request.app.state.web.config.dsn) as db:
                problems = services.status.readiness(db)
        except (DatabaseUnavailable, psycopg.Error) as exc:
            problems = [first_line(exc)]
        if problems:
            return JSONResponse(Readiness(ready=False, problems=problems).model_dump(), status_code=503)
        return Readiness(ready=True, problems=[])

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(require_token)])
    def openapi() -> dict[str, Any]:
        return app.openapi()


# Errors ----------------------------------------------------------------------


def _wants_json(request: Request) -> bool:
    path = request.url.path
    return path.startswith("/api/") or path in ("/api", "/openapi.json", "/healthz", "/readyz", "/metrics")


def _problem(status: int, detail: str, errors: list[FieldProblem] | None = None,
             headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(Problem(detail=detail, errors=errors).model_dump(exclude_none=True),
                        status_code=status, headers=headers)


async def _answer(request: Request, status: int, detail: str, errors: list[FieldProblem] | None = None,
                  headers: Mapping[str, str] | None = None) -> Response:
    if _wants_json(request):
        return _problem(status, detail, errors, headers)
    # On a worker thread: drawing a page may look its session up in the database.
    return await run_in_threadpool(pages.error_page, request, status, detail)


def status_code_of(exc: CdcHooksError) -> int:
    """The HTTP status of an error the services raised: the caller's mistake is a 4xx."""
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, DatabaseUnavailable):
        return 503
    if isinstance(exc, AlreadyQueued):
        return 409
    return 422


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(CdcHooksError)
    async def core_error(request: Request, exc: CdcHooksError) -> Response:
        return await _answer(request, status_code_of(exc), str(exc))

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> Response:
        errors = [FieldProblem(field=".".join(str(p) for p in e["loc"]), message=e["msg"])
                  for e in exc.errors()]
        detail = "; ".join(f"{e.field}: {e.message}" for e in errors) or "invalid request"
        return await _answer(request, 422, detail, errors)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        return await _answer(request, exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(TooManyGuesses)
    async def too_many_guesses(request: Request, exc: TooManyGuesses) -> Response:
        return await _answer(request, 429, str(exc), headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(LoginRequired)
    async def login_required(request: Request, exc: LoginRequired) -> Response:
        return pages.to_login(request)

    @app.exception_handler(psycopg.OperationalError)
    async def connection_lost(request: Request, exc: psycopg.OperationalError) -> Response:
        return await _answer(request, 503, f"the database connection failed: {first_line(exc)}")

    @app.exception_handler(psycopg.DataError)
    async def unstorable(request: Request, exc: psycopg.DataError) -> Response:
        # A value the checks above let through but PostgreSQL refuses: still the caller's.
        message = exc.diag.message_primary or str(exc)
        return await _answer(request, 422, f"a value cannot be stored: {message}")


# Headers ---------------------------------------------------------------------

_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'")
_HEADERS = {
    "Content-Security-Policy": _CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}


class SecurityHeaders:
    """Adds CSP and friends to every answer, and no-store to all but static files:
    pages show listener data that should not linger in shared caches."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = scope["path"].startswith("/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in _HEADERS.items():
                    headers.setdefault(name, value)
                if not static:
                    headers.setdefault("Cache-Control", "no-store")
            await send(message)

        await self.app(scope, receive, send_with_headers)


def redirect(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)
