"""What the REST API takes and returns (pydantic: the OpenAPI spec comes from these).

Request bodies are strict (no "1" for 1, no unknown keys) and refuse text that
PostgreSQL cannot store (NUL, lone surrogates), so a bad body is a 422 naming
the field instead of a database error.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from .. import jsoncodec
from ..jsoncodec import storable_text
from ..services.listeners import MAX_RATE, MIN_RATE

Model = TypeVar("Model", bound=BaseModel)
DeliveryStatus = Literal["pending", "delivered", "dead"]


def shown(model: type[Model], answer: Any) -> Model:
    """A service's answer (a dataclass of cdc_hooks.services) as this model of it."""
    return model.model_validate(answer, from_attributes=True)
ListenerState = Literal["active", "paused", "disabled"]


def storable_json(value: Any) -> Any:
    """A JSON value nested at most jsoncodec.MAX_DEPTH levels deep (checked first: the
    walk below recurses), whose keys and strings are storable_text."""
    if jsoncodec.deeper_than(value, jsoncodec.MAX_DEPTH):
        raise ValueError(jsoncodec.TOO_DEEP)
    return _storable(value)


def _storable(value: Any) -> Any:
    if isinstance(value, str):
        return storable_text(value)
    if isinstance(value, dict):
        for key, item in value.items():
            storable_text(key)
            _storable(item)
    elif isinstance(value, list):
        for item in value:
            _storable(item)
    return value


def iso_time(value: Any) -> Any:
    """ISO 8601 only: pydantic would also read a bare number as a Unix time."""
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            raise ValueError("must be an ISO 8601 time such as 2024-05-01T12:00:00Z") from None
    return value


Text = Annotated[str, AfterValidator(storable_text)]
IsoTime = Annotated[datetime, BeforeValidator(iso_time)]
JsonObject = Annotated[dict[str, Any], AfterValidator(storable_json)]
Rate = Annotated[float, Field(ge=MIN_RATE, le=MAX_RATE, allow_inf_nan=False)]


class FieldProblem(BaseModel):
    field: str = Field(description="Where: body.url, query.limit, path.listener_id, ...")
    message: str


class Problem(BaseModel):
    """Every error answer: `detail` says what is wrong and names the field."""

    detail: str
    errors: list[FieldProblem] | None = None


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    ready: bool
    problems: list[str] = Field(description="Why not ready (empty when ready)")


class HookOut(BaseModel):
    name: str
    table: str | None = Field(description="SCHEMA.TABLE; null for a custom hook (sent explicitly)")
    events: list[str]
    provides: list[str]
    key: list[str]
    custom: bool
    listeners: int
    delivered_last_hour: int


class LastDelivery(BaseModel):
    status: DeliveryStatus
    code: int | None = Field(description="HTTP status of the last attempt, if any answer")
    error: str | None
    finished_at: datetime | None


class ListenerStats(BaseModel):
    """Over the listener's last 1000 deliveries."""

    delivered: int
    dead: int
    retrying: int
    queued: int
    success_rate: float | None = Field(description="delivered / (delivered + dead + retrying)")


class ListenerOut(BaseModel):
    json_values: ClassVar[tuple[str, ...]] = ("match",)  # see api.exact_answer
    id: int
    hook: str
    url: str
    match: dict[str, Any] | None = Field(
        description='The filter in $-operator JSON form, e.g. {"name": {"$startswith": "J"}}; '
                    "null if the stored one is unusable (see match_error)")
    match_error: str | None = Field(
        default=None, description="Why the stored filter is unusable (the relay skips the "
                                  "listener until it is replaced), else null")
    state: ListenerState
    disabled_reason: str | None
    backfill: bool = Field(description="Takes backfill ('read') events of cdc-hooks backfill")
    header_names: list[str] = Field(
        description="Names of its own headers sent with every delivery (values are never shown)")
    secret_overlap_until: datetime | None = Field(
        description="Until then the secret a rotation replaced still signs beside the new one")
    events: list[str] | None = Field(description="Event kinds it takes; null: every event of the hook")
    changed: list[str] | None = Field(
        description="Updates reach it only if one of these columns changed; null: any update")
    rate: float | None = Field(
        description="At most this many deliveries per second, across every relay; null: no limit")
    created_at: datetime
    updated_at: datetime
    last_delivery: LastDelivery | None
    stats: ListenerStats


class ListenerCreated(ListenerOut):
    secret: str = Field(description="The signing secret: shown this once, never again")
    headers: dict[str, str] = Field(description="Its own headers with their values: "
                                                "shown this once, never again")


class ListenerChanged(ListenerOut):
    secret: str | None = Field(description="The new signing secret if rotated (shown once), else null")


class ListenerIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    hook: Text = Field(description="An installed hook's name")
    url: Text = Field(description="http(s) URL the events are POSTed to")
    match: JsonObject = Field(default_factory=dict, description="Filter in $-operator JSON form")
    secret: Text | None = Field(default=None, description="whsec_... (default: generated)")
    backfill: bool = Field(default=True, description="Take backfill ('read') events")
    headers: dict[Text, Text] = Field(
        default_factory=dict, description='HTTP headers sent with every delivery, e.g. '
        '{"X-Api-Key": "..."}; not webhook-*, Content-Type, Content-Length, Host, '
        "User-Agent, Transfer-Encoding, Connection")
    events: list[Text] | None = Field(
        default=None, description="Event kinds to take: any of the hook's events, and 'read' "
                                  "for backfills (default: every event of the hook)")
    changed: list[Text] | None = Field(
        default=None, description="An update is delivered only if one of these provided "
                                  "columns changed (default: any update)")
    rate: Rate | None = Field(
        default=None, description="At most this many deliveries per second, across every "
                                  "relay; bursts wait their turn (default: no limit)")


class ListenerPatch(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    state: Literal["active", "paused"] | None = Field(default=None, description="Pause or resume")
    url: Text | None = None
    match: JsonObject | None = None
    rotate_secret: bool = Field(default=False, description="Replace the signing secret")
    overlap_seconds: float | None = Field(
        default=None, ge=0, le=30 * 86_400, allow_inf_nan=False,
        description="With rotate_secret: how long the old secret keeps signing beside the new "
                    "one (webhook-signature carries both), default 86400; 0: not at all")
    backfill: bool | None = Field(default=None, description="Take backfill ('read') events, or not")
    headers: dict[Text, Text] | None = Field(
        default=None, description="Replace its own headers (the whole set; {} removes them)")
    events: list[Text] | None = Field(
        default=None, description="Replaces the event kinds; [] resets to every event of the hook")
    changed: list[Text] | None = Field(
        default=None, description="Replaces the changed-column filter; [] resets to any update")
    rate: Rate | None = Field(
        default=None, description="A new rate limit, deliveries per second; null removes it "
                                  "(not given: kept)")


class SendResult(BaseModel):
    id: str = Field(description="evt_<event_id>")
    event_id: int


class DeliveryOut(BaseModel):
    id: int
    event_id: int
    listener_id: int
    hook: str
    kind: str = Field(description="insert, update, delete or the custom hook's name")
    status: DeliveryStatus
    attempts: int
    last_code: int | None
    last_error: str | None
    created_at: datetime
    finished_at: datetime | None
    next_attempt_at: datetime | None = Field(
        description="When a pending delivery is next due; null once delivered or dead")
    duration_ms: float | None = Field(description="Duration of the last attempt")
    latency_ms: float | None = Field(description="From the change's commit to the delivery's end")


class DeliveryPage(BaseModel):
    items: list[DeliveryOut]
    next_before: int | None = Field(description="Pass as `before` for the next (older) page")


class AttemptOut(BaseModel):
    attempted_at: datetime
    status_code: int | None
    duration_ms: float
    error: str | None
    response: str | None = Field(description="Start of the response body (capped by the relay)")


class DeliveryDetail(DeliveryOut):
    json_values: ClassVar[tuple[str, ...]] = ("body",)  # see api.exact_answer
    url: str | None
    webhook_id: str
    body: dict[str, Any] = Field(description="The JSON POSTed")
    attempt_log: list[AttemptOut]


class Redelivered(BaseModel):
    queued: list[int] = Field(description="Ids of the deliveries queued again")


class FailingListener(BaseModel):
    id: int
    hook: str
    url: str
    state: ListenerState
    disabled_reason: str | None
    dead: int
    retrying: int


class HookNotCapturing(BaseModel):
    hook: str
    table: str = Field(description="SCHEMA.TABLE")
    problem: str = Field(description="Why its writes commit without events (e.g. the table was "
                                     "dropped and created again, without the hook's triggers)")


class StatusOut(BaseModel):
    minutes: int
    outbox_chunks: int = Field(description="Captured statements not yet dispatched")
    pending: int = Field(description="Deliveries waiting or retrying")
    oldest_outbox_age: float | None = Field(description="Seconds since the oldest undispatched change")
    oldest_pending_age: float | None = Field(description="Seconds since the oldest pending delivery")
    delivered: int
    deliveries_per_second: float
    failed_attempts: int
    dead: int
    failing_listeners: list[FailingListener]
    hooks_not_capturing: list[HookNotCapturing] = Field(
        description="Table hooks whose triggers are gone or disabled (empty: every hook captures)")
