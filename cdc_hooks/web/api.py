"""The REST API: JSON over the same services as the CLI (cdc_hooks/services).

Endpoints are synchronous (the Database is): FastAPI runs them in its thread
pool, so they never block the event loop a relay may share (`run --web`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel

from .. import jsoncodec, services
from ..db import Database
from .auth import TokenFirst, require_token
from .dbpool import BIGINT, Db
from .limits import BodyTooLarge
from .models import (
    DeliveryDetail,
    DeliveryPage,
    DeliveryStatus,
    HookOut,
    IsoTime,
    JsonObject,
    ListenerChanged,
    ListenerCreated,
    ListenerIn,
    ListenerOut,
    ListenerPatch,
    Problem,
    Redelivered,
    SendResult,
    StatusOut,
    Text,
    shown,
)

NO_STORE = {"Cache-Control": "no-store"}  # answers that carry a secret


def single_query_values(request: Request) -> None:
    """A repeated query parameter is refused, not silently reduced to its last value."""
    keys = [key for key, _ in request.query_params.multi_items()]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise RequestValidationError([{"loc": ("query", key), "msg": "given more than once",
                                       "type": "value_error"} for key in repeated])


class ExactJsonRequest(Request):
    """Reads a JSON body with jsoncodec, as the CLI reads JSON: a number keeps its digits
    (the standard library's float would write 0.00000001 back as 1e-08)."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = jsoncodec.loads(body)
            except UnicodeDecodeError:
                raise  # a 400: not UTF-8
            except ValueError as exc:  # FastAPI answers this one with a 422 naming the body
                raise json.JSONDecodeError(getattr(exc, "msg", str(exc)), body.decode(),
                                           getattr(exc, "pos", 0)) from None
        return self._json


class ExactJsonRoute(TokenFirst):
    """An API route: the token first (no body read without it), then a JSON body read
    by jsoncodec (ExactJsonRequest)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def exact_json_handler(request: Request) -> Response:
            return await handler(ExactJsonRequest(request.scope, request.receive))

        return exact_json_handler


def exact_answer(answer: BaseModel | list[Any], status_code: int = 200,
                 headers: dict[str, str] | None = None) -> Response:
    """The answer as FastAPI writes it, except for JSON values (a listener's match, a
    delivery's body: the model's json_values), written by jsoncodec: pydantic writes a
    Decimal as a string, so their numbers would not keep their digits."""
    return Response(jsoncodec.dumps(_exact_content(answer)), status_code, headers,
                    media_type="application/json")


def _exact_content(answer: BaseModel | list[Any]) -> Any:
    if isinstance(answer, list):
        return [_exact_content(item) for item in answer]
    content = answer.model_dump(mode="json")
    content.update((name, getattr(answer, name)) for name in getattr(answer, "json_values", ()))
    return content


ListenerId = Annotated[int, Path(ge=1, le=BIGINT, description="A listener's id")]
DeliveryId = Annotated[int, Path(ge=1, le=BIGINT, description="A delivery's id")]

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": Problem, "description": "A body that cannot be read (not UTF-8 JSON)"},
    401: {"model": Problem, "description": "No valid Bearer token"},
    413: {"model": Problem, "description": BodyTooLarge().detail},
    422: {"model": Problem, "description": "A bad request: the message names the field"},
    429: {"model": Problem, "description": "Too many wrong tokens from this address: "
                                           "wait Retry-After seconds"},
    503: {"model": Problem, "description": "The database is unreachable"},
}
_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": Problem, "description": "No such thing"}}

# The token is checked first (TokenFirst); the dependency declares it in the OpenAPI spec.
router = APIRouter(prefix="/api", dependencies=[Depends(require_token), Depends(single_query_values)],
                   responses=_ERRORS, route_class=ExactJsonRoute)


@router.get("/hooks", tags=["hooks"], summary="Installed hooks")
def list_hooks(db: Db) -> list[HookOut]:
    return [shown(HookOut, h) for h in services.hooks.list_hooks(db)]


@router.post("/hooks/{name}/send", tags=["hooks"], status_code=201, responses=_NOT_FOUND,
             summary="Send a custom hook's event (durian's send view)")
def send_event(db: Db, name: Annotated[Text, Path(description="A custom hook's name")],
               payload: Annotated[JsonObject, Body(description="The event's data: provided fields only")]
               ) -> SendResult:
    services.hooks.get_hook(db, name)  # 404 for an unknown hook, before the database refuses it
    event_id = services.hooks.send(db, name, payload)
    return SendResult(id=f"evt_{event_id}", event_id=event_id)


@router.get("/listeners", tags=["listeners"], summary="Listeners (secrets are never shown)",
            response_model=list[ListenerOut])
def list_listeners(db: Db, hook: Annotated[Text | None, Query(description="Only this hook's")] = None
                   ) -> Response:
    return exact_answer([shown(ListenerOut, v) for v in services.listeners.list_listeners(db, hook=hook)])


@router.post("/listeners", tags=["listeners"], status_code=201, response_model=ListenerCreated,
             summary="Add a listener; the answer carries its secret, shown this once")
def create_listener(db: Db, request: Request, body: ListenerIn) -> Response:
    created = services.listeners.add_listener(
        db, request.app.state.web.config, body.hook, body.url, body.match, body.secret,
        {"backfill": body.backfill}, body.headers, body.events, body.changed, body.rate)
    return exact_answer(ListenerCreated(**_listener(db, created.id).model_dump(),
                                        secret=created.secret, headers=created.headers),
                        201, NO_STORE)


def _listener(db: Database, listener_id: int) -> ListenerOut:
    return shown(ListenerOut, services.listeners.get_listener(db, listener_id))


@router.get("/listeners/{listener_id}", tags=["listeners"], responses=_NOT_FOUND,
            response_model=ListenerOut)
def get_listener(db: Db, listener_id: ListenerId) -> Response:
    return exact_answer(_listener(db, listener_id))


@router.patch("/listeners/{listener_id}", tags=["listeners"], responses=_NOT_FOUND,
              response_model=ListenerChanged,
              summary="Pause/resume, change URL, match, headers, backfill, events, changed or "
                      "rate, rotate the secret")
def change_listener(db: Db, request: Request, listener_id: ListenerId, body: ListenerPatch) -> Response:
    secret = None
    if body.overlap_seconds is not None and not body.rotate_secret:
        raise RequestValidationError([{"loc": ("body", "overlap_seconds"), "type": "value_error",
                                       "msg": "only with rotate_secret: true"}])
    rate = body.rate if "rate" in body.model_fields_set else services.listeners.KEEP  # null: no limit
    if body.url is not None or body.match is not None or body.rotate_secret or \
            body.backfill is not None or body.headers is not None or body.events is not None \
            or body.changed is not None or rate is not services.listeners.KEEP:
        secret = services.listeners.update_listener(
            db, request.app.state.web.config, listener_id, url=body.url, match=body.match,
            rotate_secret=body.rotate_secret,
            overlap=services.listeners.DEFAULT_OVERLAP if body.overlap_seconds is None
            else body.overlap_seconds,
            headers=body.headers, backfill=body.backfill, events=body.events, changed=body.changed,
            rate=rate)
    if body.state is not None:
        services.listeners.set_state(db, listener_id, body.state)
    return exact_answer(ListenerChanged(**_listener(db, listener_id).model_dump(), secret=secret),
                        headers=NO_STORE)


@router.delete("/listeners/{listener_id}", tags=["listeners"], status_code=204, responses=_NOT_FOUND,
               summary="Remove a listener and its deliveries")
def delete_listener(db: Db, listener_id: ListenerId) -> Response:
    services.listeners.remove_listener(db, listener_id)
    return Response(status_code=204)


@router.post("/listeners/{listener_id}/redeliver", tags=["listeners"], responses=_NOT_FOUND,
             summary="Queue every dead letter of a listener again")
def redeliver_failed(db: Db, listener_id: ListenerId) -> Redelivered:
    return Redelivered(queued=services.deliveries.redeliver_dead(db, listener_id=listener_id))


@router.get("/deliveries", tags=["deliveries"], summary="Deliveries, newest first, a page at a time")
def list_deliveries(
    db: Db,
    listener: Annotated[int | None, Query(ge=1, le=BIGINT, description="Only this listener's")] = None,
    status: Annotated[DeliveryStatus | None, Query()] = None,
    hook: Annotated[Text | None, Query(description="Only this hook's")] = None,
    since: Annotated[IsoTime | None, Query(description="Created at or after (ISO 8601)")] = None,
    until: Annotated[IsoTime | None, Query(description="Created before (ISO 8601)")] = None,
    before: Annotated[int | None, Query(ge=1, le=BIGINT, description="Cursor: next_before")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> DeliveryPage:
    return shown(DeliveryPage, services.deliveries.page(
        db, limit=limit, status=status, listener_id=listener, hook=hook, since=since, until=until,
        before=before))


@router.get("/deliveries/{delivery_id}", tags=["deliveries"], responses=_NOT_FOUND,
            response_model=DeliveryDetail, summary="A delivery with its attempts and their responses")
def get_delivery(db: Db, delivery_id: DeliveryId) -> Response:
    return exact_answer(shown(DeliveryDetail, services.deliveries.get_delivery(db, delivery_id)))


@router.post("/deliveries/{delivery_id}/redeliver", tags=["deliveries"],
             responses={**_NOT_FOUND, 409: {"model": Problem, "description": "Already queued"}},
             summary="Send a finished delivery again (same webhook-id)")
def redeliver(db: Db, delivery_id: DeliveryId) -> Redelivered:
    return Redelivered(queued=services.deliveries.redeliver(db, delivery_id))


@router.get("/status", tags=["status"], summary="Backlog, lag, rates, failing listeners")
def get_status(db: Db, minutes: Annotated[int, Query(ge=1, le=1440)] = 5) -> StatusOut:
    return shown(StatusOut, services.status.report(db, minutes))
