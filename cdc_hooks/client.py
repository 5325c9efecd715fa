"""A Python client for the REST API (cdc_hooks/web/api.py), for services that manage
listeners over HTTP without database credentials: ``Client`` and ``AsyncClient``.

    >>> from cdc_hooks import Startswith
    >>> from cdc_hooks.client import Client
    >>> with Client("http://127.0.0.1:8080", token="...") as api:
    ...     created = api.add_listener("person", "https://where.joe/is/listening",
    ...                                match={"name": Startswith("J")})
    ...     created.id, created.secret

A thin adapter: answers are the API's JSON, with attribute access (``Record``);
every error answer raises ``ApiError`` with the status code and the API's message
(for a 422 it names the field). A request that never reached the server (refused,
connect timeout) is retried ``retries`` times, ``retry_backoff`` seconds apart,
doubling; nothing else is retried, so a POST is never sent twice.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, TypeAlias, TypeVar
from urllib.parse import quote

import httpx

from . import jsoncodec
from .errors import CdcHooksError
from .match import rules_to_json

T = TypeVar("T")
Answer: TypeAlias = T | Awaitable[T]  # Client's methods answer T, AsyncClient's an awaitable of it

# Failures of a request that never reached the server: safe to send again.
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout)


class ApiError(CdcHooksError):
    """An error answer of the API, or none at all (status_code None: the server could
    not be reached, or did not answer within the timeout)."""

    def __init__(self, status_code: int | None, message: str,
                 errors: list[dict[str, str]] | None = None) -> None:
        super().__init__(message if status_code is None else f"{status_code}: {message}")
        self.status_code = status_code
        self.message = message
        self.errors = errors or []  # 422: [{"field": "body.url", "message": ...}, ...]

    @property
    def fields(self) -> list[str]:
        """The fields a 422 names (body.url, query.limit, ...)."""
        return [error["field"] for error in self.errors]


class Record(dict[str, Any]):
    """A JSON object of an answer, whose keys read as attributes too (``listener.id``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


@dataclass(frozen=True)
class Page:
    """One page of deliveries, newest first; pass next_before as ``before`` for the next."""

    items: list[Record]
    next_before: int | None


def match_json(match: Mapping[str, Any]) -> dict[str, Any]:
    """A match with matcher objects (``Startswith("J")``) in the API's $-form."""
    return rules_to_json(match)


def _as_is(answer: Any) -> Any:
    return answer


class _Endpoints:
    """The API's endpoints, once for both clients: each builds its request and says
    how to read the answer; ``_call`` sends it (at once, or as a coroutine)."""

    def _call(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
              body: Any = None, read: Callable[[Any], Any] = _as_is) -> Any:
        raise NotImplementedError

    def hooks(self) -> Answer[list[Record]]:
        """The installed hooks."""
        return self._call("GET", "/api/hooks")

    def listeners(self, hook: str | None = None) -> Answer[list[Record]]:
        """Listeners (of one hook if given); secrets are never shown."""
        return self._call("GET", "/api/listeners", params={"hook": hook})

    def listener(self, listener_id: int) -> Answer[Record]:
        return self._call("GET", f"/api/listeners/{int(listener_id)}")

    def add_listener(self, hook: str, url: str, match: Mapping[str, Any] | None = None,
                     **options: Any) -> Answer[Record]:
        """A new listener, with its ``secret`` (shown this once). Options: secret, backfill,
        headers ({"X-Api-Key": "..."}: sent with every delivery, values never listed),
        events (kinds it takes), changed (columns an update must change to reach it), rate
        (at most this many deliveries per second, across every relay)."""
        body = {"hook": hook, "url": url, **options}
        if match is not None:
            body["match"] = match_json(match)
        return self._call("POST", "/api/listeners", body=body)

    def update_listener(self, listener_id: int, **changes: Any) -> Answer[Record]:
        """Changes url, match, backfill, headers (the whole set), events, changed ([] resets
        either), rate (None removes it), state; rotate_secret=True answers the new secret."""
        if changes.get("match") is not None:
            changes["match"] = match_json(changes["match"])
        return self._call("PATCH", f"/api/listeners/{int(listener_id)}", body=changes)

    def rotate(self, listener_id: int, overlap: float | None = None) -> Answer[Record]:
        """A new signing secret (its ``secret``, shown this once); the old one keeps signing
        beside it for ``overlap`` seconds (default: the server's, 24 h; 0: not at all)."""
        changes: dict[str, Any] = {"rotate_secret": True}
        if overlap is not None:
            changes["overlap_seconds"] = overlap
        return self.update_listener(listener_id, **changes)

    def pause(self, listener_id: int) -> Answer[Record]:
        """Holds deliveries; they go out on resume."""
        return self.update_listener(listener_id, state="paused")

    def resume(self, listener_id: int) -> Answer[Record]:
        """Resumes (or re-enables) a listener; held deliveries go out."""
        return self.update_listener(listener_id, state="active")

    def remove_listener(self, listener_id: int) -> Answer[None]:
        return self._call("DELETE", f"/api/listeners/{int(listener_id)}")

    def send(self, hook: str, /, **values: Any) -> Answer[Record]:
        """Sends a custom hook's event; the answer has its ``id`` (evt_...) and ``event_id``."""
        return self._call("POST", f"/api/hooks/{quote(hook, safe='')}/send", body=values)

    def deliveries(self, **filters: Any) -> Answer[Page]:
        """A page of deliveries; filters: listener, status, hook, since, until, before, limit."""
        return self._call("GET", "/api/deliveries", params=filters,
                          read=lambda answer: Page(answer["items"], answer["next_before"]))

    def delivery(self, delivery_id: int) -> Answer[Record]:
        """A delivery with its body and attempts."""
        return self._call("GET", f"/api/deliveries/{int(delivery_id)}")

    def redeliver(self, delivery_id: int) -> Answer[list[int]]:
        """Sends a finished delivery again (same webhook-id); the ids queued."""
        return self._call("POST", f"/api/deliveries/{int(delivery_id)}/redeliver",
                          read=_queued)

    def redeliver_failed(self, listener_id: int) -> Answer[list[int]]:
        """Queues every dead letter of a listener again; the ids queued."""
        return self._call("POST", f"/api/listeners/{int(listener_id)}/redeliver", read=_queued)

    def status(self, minutes: int = 5) -> Answer[Record]:
        """Backlog, lag, rates over the last minutes, failing listeners."""
        return self._call("GET", "/api/status", params={"minutes": minutes})


def _queued(answer: Any) -> list[int]:
    return list(answer["queued"])


@dataclass(frozen=True)
class _Retry:
    retries: int
    backoff: float

    def again(self, exc: Exception, attempt: int) -> bool:
        """Whether attempt (0: the first) failed in a way worth another one."""
        return isinstance(exc, NOT_SENT) and attempt < self.retries

    def pause(self, attempt: int) -> float:
        return self.backoff * 2**attempt


def _options(url: str, token: str | None, timeout: float, retries: int,
             retry_backoff: float) -> tuple[dict[str, Any], _Retry]:
    if retries < 0 or retry_backoff < 0 or timeout <= 0:
        raise ValueError("timeout must be positive, retries and retry_backoff not negative")
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return {"base_url": url, "headers": headers, "timeout": timeout}, _Retry(retries, retry_backoff)


def _request(http: httpx.Client | httpx.AsyncClient, method: str, path: str,
             params: Mapping[str, Any] | None, body: Any) -> httpx.Request:
    query = {k: v.isoformat() if isinstance(v, datetime) else v
             for k, v in (params or {}).items() if v is not None}
    if body is None:
        return http.build_request(method, path, params=query)
    return http.build_request(method, path, params=query, content=jsoncodec.dumps(body).encode(),
                              headers={"Content-Type": "application/json"})


def _answer(response: httpx.Response, read: Callable[[Any], Any]) -> Any:
    if not response.is_success:
        raise _error(response)
    if response.status_code == 204 or not response.content:
        return None
    return read(response.json(object_hook=Record))


def _error(response: httpx.Response) -> ApiError:
    try:
        problem = response.json()
        return ApiError(response.status_code, str(problem["detail"]), problem.get("errors"))
    except (ValueError, KeyError, TypeError):  # not the API's JSON (a proxy's page, ...)
        text = response.text.strip()[:200] or response.reason_phrase
        return ApiError(response.status_code, text)


def _no_answer(request: httpx.Request, exc: Exception, attempts: int) -> ApiError:
    tries = f" after {attempts} attempts" if attempts > 1 else ""
    return ApiError(None, f"{request.method} {request.url}: no answer{tries}: "
                          f"{type(exc).__name__}: {exc or 'timed out'}")


class Client(_Endpoints):
    """The REST API over HTTP; a context manager (or call close()).

    ``timeout``: seconds per request (connect, send, read each); ``retries``: how many
    times a request that could not connect is tried again, after ``retry_backoff``
    seconds, doubling. ``transport``: an httpx transport (a proxy's, a test's)."""

    def __init__(self, url: str, *, token: str | None = None, timeout: float = 10.0,
                 retries: int = 2, retry_backoff: float = 0.5,
                 transport: httpx.BaseTransport | None = None) -> None:
        options, self._retry = _options(url, token, timeout, retries, retry_backoff)
        self._http = httpx.Client(transport=transport, **options)

    def _call(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
              body: Any = None, read: Callable[[Any], Any] = _as_is) -> Any:
        request = _request(self._http, method, path, params, body)
        attempt = 0
        while True:
            try:
                response = self._http.send(request)
            except httpx.TransportError as exc:
                if not self._retry.again(exc, attempt):
                    raise _no_answer(request, exc, attempt + 1) from exc
                time.sleep(self._retry.pause(attempt))
                attempt += 1
            else:
                return _answer(response, read)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()


class AsyncClient(_Endpoints):
    """Client's methods as coroutines (``await api.hooks()``); ``async with`` it."""

    def __init__(self, url: str, *, token: str | None = None, timeout: float = 10.0,
                 retries: int = 2, retry_backoff: float = 0.5,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        options, self._retry = _options(url, token, timeout, retries, retry_backoff)
        self._http = httpx.AsyncClient(transport=transport, **options)

    async def _call(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
                    body: Any = None, read: Callable[[Any], Any] = _as_is) -> Any:
        request = _request(self._http, method, path, params, body)
        attempt = 0
        while True:
            try:
                response = await self._http.send(request)
            except httpx.TransportError as exc:
                if not self._retry.again(exc, attempt):
                    raise _no_answer(request, exc, attempt + 1) from exc
                await asyncio.sleep(self._retry.pause(attempt))
                attempt += 1
            else:
                return _answer(response, read)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        traceback: TracebackType | None) -> None:
        await self.aclose()
