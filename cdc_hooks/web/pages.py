"""The server-rendered pages: durian's "select an event, then create a listener",
listeners, the delivery log, an overview. htmx refreshes the live parts.

Every change is a POST of a form carrying the session's CSRF token, handled by
the same services as the CLI and the API; the answer is a redirect with a flash
message, except where a secret is shown (once, never stored in the session).
"""

from __future__ import annotations

import functools
from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import urlencode

import jinja2
from fastapi import APIRouter, Depends, Path, Request, Response
from fastapi.responses import RedirectResponse
from fastapi.templating import Jinja2Templates
from markupsafe import Markup, escape

from .. import jsoncodec, services
from ..errors import CdcHooksError, ListenerError
from ..guesses import TooManyGuesses
from . import chart, sessions
from .auth import (
    SessionFirst,
    checked_form,
    is_token,
    logged_in,
    login_csrf,
    page_session,
    remember_login_csrf,
)
from .dbpool import BIGINT, Db
from .forms import CONDITIONS, FilterRow, match_from_form, rows_from_form, rows_from_match

PREVIEW_EVENTS = 10
PAGE_SIZE = 50
PAGE_TEXT = 64 * 1024  # bytes of one value a page shows (a body, an event's data): the API has all

public = APIRouter(include_in_schema=False)  # the login page
router = APIRouter(include_in_schema=False, route_class=SessionFirst)  # every other page
Form = Annotated[dict[str, Any], Depends(checked_form)]
Id = Annotated[int, Path(ge=1, le=BIGINT)]


@functools.cache
def templates() -> Jinja2Templates:
    return Jinja2Templates(env=_environment())


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("cdc_hooks.web", "templates"),
                             autoescape=True, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(clock=_clock, ms=_ms, ago=_ago, pct=_pct, seconds=_seconds,
                       pretty=jsoncodec.dumps_pretty, compact=jsoncodec.dumps, capped=capped)
    env.globals.update(conditions=CONDITIONS)
    return env


def render(request: Request, name: str, http_status: int = 200, **context: Any) -> Response:
    """The page (blocking: it may look the session up, on a worker thread)."""
    session = page_session(request)
    csrf = session.csrf if session is not None else login_csrf(request)
    context.update(csrf=csrf, flash=sessions.take_flash(request), logged_in=session is not None,
                   path=request.url.path)
    response = templates().TemplateResponse(request, name, context, status_code=http_status)
    if session is None:
        remember_login_csrf(request, response, csrf)
    return response


def redirect(url: str, flash: str | None = None, request: Request | None = None) -> Response:
    if flash and request is not None:
        sessions.set_flash(request, flash)
    return RedirectResponse(url, status_code=303)


def error_page(request: Request, status: int, detail: str) -> Response:
    return render(request, "error.html", http_status=status, status_code=status, detail=detail)


def to_login(request: Request) -> Response:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    if request.method != "GET" or request.url.path.startswith("/fragments/"):
        target = "/"
    url = "/login?" + urlencode({"next": target})
    if request.headers.get("hx-request"):  # htmx would swap the login page into a fragment
        return Response(status_code=204, headers={"HX-Redirect": url})
    return RedirectResponse(url, status_code=303)


def _safe_next(target: str | None) -> str:
    """Only a path of this site: never //host or an absolute URL (open redirect)."""
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")):
        return "/"
    return target


# Login -------------------------------------------------------------------------


@public.get("/login")
def login_form(request: Request, next: str = "/") -> Response:
    if logged_in(request):
        return redirect(_safe_next(next))
    return render(request, "login.html", next=_safe_next(next))


@public.post("/login")
def login(request: Request, form: Form) -> Response:
    try:
        right = is_token(request, form.get("token", ""))
    except TooManyGuesses as exc:
        answer = render(request, "login.html", http_status=429, next=_safe_next(form.get("next")),
                        error=f"Too many wrong tokens: try again in {exc.retry_after} s.")
        answer.headers["Retry-After"] = str(exc.retry_after)
        return answer
    if not right:
        return render(request, "login.html", http_status=401, next=_safe_next(form.get("next")),
                      error="That is not the token: see [web] token in the config.")
    answer = redirect(_safe_next(form.get("next")))
    sessions.start(request, answer)
    return answer


@router.post("/logout")
def logout(request: Request, form: Form) -> Response:
    answer = redirect("/login")
    sessions.end(request, answer)
    return answer


# Overview ----------------------------------------------------------------------


@router.get("/")
def overview(request: Request, db: Db) -> Response:
    return render(request, "overview.html", **_overview(db))


@router.get("/fragments/overview")
def overview_fragment(request: Request, db: Db) -> Response:
    return render(request, "_overview.html", **_overview(db))


def _overview(db: Any) -> dict[str, Any]:
    if not db.schema_exists():
        return {"installed": False}
    minutes = services.status.timeline(db, 60)
    return {"installed": True, "status": services.status.report(db, 5), "chart": chart.svg(minutes),
            "last_hour": sum(m.delivered for m in minutes),
            "failed_last_hour": sum(m.failed for m in minutes)}


# Hooks and new listeners -------------------------------------------------------


@router.get("/hooks")
def hooks_page(request: Request, db: Db) -> Response:
    return render(request, "hooks.html", hooks=services.hooks.list_hooks(db))


@router.get("/hooks/{name}/listen")
def listen_form(request: Request, db: Db, name: str) -> Response:
    hook = services.hooks.get_hook(db, name)
    return _listen_page(request, db, hook, [FilterRow(c) for c in hook.provides])


@router.get("/hooks/{name}/preview")
def preview_fragment(request: Request, db: Db, name: str) -> Response:
    hook = services.hooks.get_hook(db, name)
    return render(request, "_preview.html", **_preview(db, hook.name, hook.provides,
                                                        dict(request.query_params)))


@router.post("/hooks/{name}/listen")
def create_listener(request: Request, db: Db, name: str, form: Form) -> Response:
    hook = services.hooks.get_hook(db, name)
    rows = rows_from_form(hook.provides, form)
    url = form.get("url", "").strip()
    try:
        match = match_from_form(hook.provides, form)
        created = services.listeners.add_listener(
            db, request.app.state.web.config, hook.name, url, match,
            form.get("secret", "").strip() or None, {"backfill": _checked(form, "backfill")},
            _headers(form), *_kinds(form), _rate(form))
    except CdcHooksError as exc:  # the headers are not shown again: their values are secrets
        return _listen_page(request, db, hook, rows, url=url, backfill=_checked(form, "backfill"),
                            error=str(exc), status=422, kinds=form)
    return render(request, "secret.html", listener=services.listeners.get_listener(db, created.id),
                  secret=created.secret, headers=created.headers, created=True)


def _headers(form: dict[str, str]) -> dict[str, str]:
    """The headers textarea: "Name: value" lines."""
    return services.listeners.headers_from_lines(form.get("headers", "").splitlines())


def _new_headers(form: dict[str, str]) -> dict[str, str] | None:
    """On the edit form: the headers that replace the stored ones, or None to keep them."""
    if _checked(form, "clear_headers"):
        return {}
    return _headers(form) or None


def _listen_page(request: Request, db: Any, hook: Any, rows: list[FilterRow], *, url: str = "",
                 backfill: bool = True, error: str | None = None, status: int = 200,
                 kinds: dict[str, str] | None = None) -> Response:
    form = {f"cond:{r.column}": r.condition for r in rows} | {f"value:{r.column}": r.value for r in rows}
    form |= _kinds_fields(kinds or {})
    return render(request, "listen.html", http_status=status, hook=hook, rows=rows, url=url,
                  backfill=backfill, error=error, **form_kinds(form),
                  **_preview(db, hook.name, hook.provides, form))


def _kinds_fields(form: dict[str, str]) -> dict[str, str]:
    """The form's event kinds and changed columns (comma-separated) and rate, as typed."""
    return {name: form.get(name, "") for name in ("events", "changed", "rate")}


def form_kinds(form: dict[str, str]) -> dict[str, str]:
    return {f"{name}_text": text for name, text in _kinds_fields(form).items()}


def _kinds(form: dict[str, str]) -> tuple[list[str], list[str]]:
    """(events, changed) of the form; empty: the default."""
    return (services.listeners.split_names([form.get("events", "")]),
            services.listeners.split_names([form.get("changed", "")]))


def _rate(form: dict[str, str]) -> float | None:
    """The rate limit field: deliveries per second, or empty for none."""
    text = form.get("rate", "").strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        raise ListenerError(f"rate: {text[:40]!r} is not a number of deliveries per second "
                            "(empty: no limit)") from None


def _checked(form: dict[str, str], name: str) -> bool:
    """A checkbox: its field is sent only when it is ticked."""
    return name in form


def _preview(db: Any, hook: str, provides: list[str], form: dict[str, str]) -> dict[str, Any]:
    try:
        match = match_from_form(provides, form)
        return {"events": services.hooks.preview(db, hook, match, PREVIEW_EVENTS, *_kinds(form)),
                "match": match, "preview_error": None}
    except CdcHooksError as exc:
        return {"events": [], "match": None, "preview_error": str(exc)}


# Listeners ---------------------------------------------------------------------


@router.get("/listeners")
def listeners_page(request: Request, db: Db, hook: str | None = None) -> Response:
    return render(request, "listeners.html",
                  listeners=services.listeners.list_listeners(db, hook=hook or None), hook=hook)


@router.post("/listeners/{listener_id}/pause")
def pause(request: Request, db: Db, listener_id: Id, form: Form) -> Response:
    services.listeners.set_state(db, listener_id, "paused")
    return redirect("/listeners", f"Listener {listener_id} paused: deliveries wait for resume.", request)


@router.post("/listeners/{listener_id}/resume")
def resume(request: Request, db: Db, listener_id: Id, form: Form) -> Response:
    services.listeners.set_state(db, listener_id, "active")
    return redirect("/listeners", f"Listener {listener_id} resumed.", request)


@router.get("/listeners/{listener_id}/{action}")
def confirm(request: Request, db: Db, listener_id: Id, action: str) -> Response:
    if action == "edit":
        return _edit_page(request, db, services.listeners.get_listener(db, listener_id))
    if action not in ("delete", "rotate"):
        return error_page(request, 404, "no such page")
    return render(request, "confirm.html", listener=services.listeners.get_listener(db, listener_id),
                  action=action)


@router.post("/listeners/{listener_id}/delete")
def delete(request: Request, db: Db, listener_id: Id, form: Form) -> Response:
    services.listeners.remove_listener(db, listener_id)
    return redirect("/listeners", f"Listener {listener_id} deleted.", request)


@router.post("/listeners/{listener_id}/rotate")
def rotate(request: Request, db: Db, listener_id: Id, form: Form) -> Response:
    try:
        overlap = float(form.get("overlap") or services.listeners.DEFAULT_OVERLAP)
    except ValueError:
        return error_page(request, 422, "overlap: give a number of seconds")
    secret = services.listeners.rotate(db, request.app.state.web.config, listener_id, overlap)
    return render(request, "secret.html", listener=services.listeners.get_listener(db, listener_id),
                  secret=secret, created=False)


@router.post("/listeners/{listener_id}/redeliver")
def redeliver_failed(request: Request, db: Db, listener_id: Id, form: Form) -> Response:
    queued = services.deliveries.redeliver_dead(db, listener_id=listener_id)
    return redirect(f"/deliveries?listener={listener_id}",
                    f"{len(queued)} failed deliveries of listener {listener_id} queued again.", request)


@router.post("/listeners/{listener_id}/edit")
def edit(request: Request, db: Db, listener_id: Id, form: Form) -> Response:
    current = services.listeners.get_listener(db, listener_id)
    provides = services.hooks.get_hook(db, current.hook).provides
    url = form.get("url", "").strip()
    try:
        match = match_from_form(provides, form)
        events, changed = _kinds(form)
        services.listeners.update_listener(
            db, request.app.state.web.config, listener_id, url=url, match=match,
            headers=_new_headers(form), backfill=_checked(form, "backfill"), events=events,
            changed=changed, rate=_rate(form))
    except CdcHooksError as exc:
        return _edit_page(request, db, current, rows_from_form(provides, form), url, str(exc), 422,
                          backfill=_checked(form, "backfill"), kinds=form)
    return redirect("/listeners", f"Listener {listener_id} saved.", request)


def _edit_page(request: Request, db: Any, current: Any, rows: list[FilterRow] | None = None,
               url: str | None = None, error: str | None = None, status: int = 200,
               backfill: bool | None = None, kinds: dict[str, str] | None = None) -> Response:
    hook = services.hooks.get_hook(db, current.hook)
    rows = rows or rows_from_match(hook.provides, current.match or {})
    if current.match_error and error is None:
        error = f"the stored filter is unusable ({current.match_error}): saving replaces it"
    form = {f"cond:{r.column}": r.condition for r in rows} | {f"value:{r.column}": r.value for r in rows}
    form |= {f"keep:{r.column}": r.keep for r in rows if r.keep}
    form |= _kinds_fields(kinds if kinds is not None else {
        "events": ",".join(current.events or ()), "changed": ",".join(current.changed or ()),
        "rate": "" if current.rate is None else f"{current.rate:g}"})
    return render(request, "listen.html", http_status=status, hook=hook, rows=rows, listener=current,
                  url=current.url if url is None else url, error=error,
                  backfill=current.backfill if backfill is None else backfill,
                  **form_kinds(form), **_preview(db, hook.name, hook.provides, form))


# Deliveries --------------------------------------------------------------------


@router.get("/deliveries")
def deliveries_page(request: Request, db: Db) -> Response:
    return render(request, "deliveries.html", listeners=services.listeners.list_listeners(db),
                  **_deliveries(request, db))


@router.get("/fragments/deliveries")
def delivery_rows(request: Request, db: Db) -> Response:
    return render(request, "_delivery_rows.html", **_deliveries(request, db))


def _deliveries(request: Request, db: Any) -> dict[str, Any]:
    query = request.query_params
    listener_id, before = _id(query.get("listener")), _id(query.get("before"))
    status = query.get("status") if query.get("status") in services.deliveries.STATUSES else None
    filters = {"listener_id": listener_id, "before": before, "status": status}
    found = services.deliveries.page(db, limit=PAGE_SIZE, status=status, listener_id=listener_id,
                                     before=before)
    items, next_before = found.items, found.next_before
    keep = {k: v for k, v in (("listener", filters["listener_id"]), ("status", filters["status"])) if v}
    return {"items": items, "filters": filters, "live": filters["before"] is None,
            "query": urlencode(keep),
            "older": f"/deliveries?{urlencode(keep | {'before': next_before})}" if next_before else None}


@router.get("/deliveries/{delivery_id}")
def delivery_page(request: Request, db: Db, delivery_id: Id) -> Response:
    return render(request, "delivery.html", d=services.deliveries.get_delivery(db, delivery_id))


@router.post("/deliveries/{delivery_id}/redeliver")
def redeliver(request: Request, db: Db, delivery_id: Id, form: Form) -> Response:
    services.deliveries.redeliver(db, delivery_id)
    return redirect(f"/deliveries/{delivery_id}", f"Delivery {delivery_id} queued again.", request)


# Formatting --------------------------------------------------------------------


def _id(text: str | None) -> int | None:
    return int(text) if text and text.isdigit() and 0 < int(text) <= BIGINT else None


def _clock(value: datetime | None) -> str:
    return "-" if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _ago(value: datetime | None) -> str:
    if value is None:
        return "-"
    seconds = max(0.0, (datetime.now(UTC) - value).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f} ms" if value >= 10 else f"{value:.1f} ms"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f} s"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def capped(text: str | None) -> str:
    """At most PAGE_TEXT bytes of text, then a note of its whole size: a captured
    value of megabytes would otherwise make every page showing it as big."""
    data = (text or "").encode("utf-8", "replace")
    if len(data) <= PAGE_TEXT:
        return text or ""
    shown = data[:PAGE_TEXT].decode("utf-8", "ignore")  # not half a character
    return Markup(f'{escape(shown)}<span class="truncated">… truncated: {len(data):,} bytes in all '
                  "(the API gives it whole)</span>")
