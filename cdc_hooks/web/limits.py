"""How big a request body may be: listeners, events and forms are small, and a
server that reads whatever it is sent can be made to hold any amount of memory.

The limit applies when the app reads a body, not before: a request refused for
its token (401) or session (redirect to the login) is refused unread, as such.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_BODY = 1 << 20  # bytes of a request body: 1 MiB


class BodyTooLarge(HTTPException):
    """Answered 413 (JSON for the API, a page for the pages)."""

    def __init__(self) -> None:
        super().__init__(413, f"the request body is over the limit of 1 MiB ({MAX_BODY:,} bytes)")


class BodyLimit:
    """ASGI middleware: reading a body whose Content-Length is over MAX_BODY raises
    BodyTooLarge before a byte of it is read; a chunked body raises as soon as the
    bytes received pass the limit."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        announced = _content_length(scope)
        received = 0

        async def receive_within_limit() -> Message:
            nonlocal received
            if announced is not None and announced > MAX_BODY:
                raise BodyTooLarge
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > MAX_BODY:
                    raise BodyTooLarge
            return message

        await self.app(scope, receive_within_limit, send)


def _content_length(scope: Scope) -> int | None:
    text = Headers(scope=scope).get("content-length")
    return int(text) if text is not None and text.isdigit() else None
