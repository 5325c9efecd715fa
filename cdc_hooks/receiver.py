"""``cdc-hooks debug-receiver``: durian's debug view, a webhook receiver that prints.

It answers every POST with 200 and shows what arrived: the path, the
``webhook-id``, hook, event, key and data, and whether the Standard Webhooks
signature verifies with one of the given secrets. ``cdc-hooks demo`` runs the
same receiver in-process (``Receiver``), collecting deliveries through a callback.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from . import jsoncodec, signing
from .errors import CdcHooksError

log = logging.getLogger("cdc_hooks.receiver")

VERIFIED = "verified"
INVALID = "INVALID: matches none of the given secrets"
MISSING = "MISSING: no webhook-signature header"
SKIPPED = "unsigned check skipped (no --secret given)"
TOLERANCE = 300  # seconds: Standard Webhooks receivers reject older (or future) timestamps
MAX_BODY = 16 << 20


@dataclass(frozen=True)
class Delivery:
    """One request as received."""

    path: str
    webhook_id: str | None
    timestamp: str | None
    signature_header: str | None
    body: bytes
    payload: Any  # the parsed JSON body, None if it is not JSON
    signature: str  # VERIFIED, INVALID, MISSING or SKIPPED
    received_at: float  # time.monotonic()

    @property
    def verified(self) -> bool:
        return self.signature == VERIFIED

    @property
    def clock_skew(self) -> float | None:
        """Seconds between the signed timestamp and now, if it is beyond the tolerance."""
        try:
            skew = time.time() - int(self.timestamp or "")
        except ValueError:
            return None
        return skew if abs(skew) > TOLERANCE else None


class Receiver:
    """An aiohttp server accepting webhooks on any path; ``start`` returns its base URL."""

    def __init__(self, secrets: Sequence[str] = (),
                 on_delivery: Callable[[Delivery], None] | None = None) -> None:
        # Parsed up front: a malformed secret is a usage error, not a failed delivery.
        self._keys = [signing.secret_key(s) for s in secrets]
        self.on_delivery = on_delivery
        self.deliveries: list[Delivery] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listens on host:port (0: a free port) and returns the base URL."""
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_route("POST", "/{tail:.*}", self._handle)
        app.router.add_route("GET", "/{tail:.*}", self._hello)
        # shutdown_timeout: stopping waits this long for requests still being answered.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, host, port).start()
        except OSError as exc:
            await self._runner.cleanup()
            raise CdcHooksError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        bound_port = self._runner.addresses[0][1]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{bound_port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _hello(self, request: web.Request) -> web.Response:
        return web.Response(text="cdc-hooks debug receiver: POST webhooks here\n")

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        delivery = Delivery(
            path=request.path,
            webhook_id=request.headers.get("webhook-id"),
            timestamp=request.headers.get("webhook-timestamp"),
            signature_header=request.headers.get("webhook-signature"),
            body=body,
            payload=_parse(body),
            signature=self._check(request, body),
            received_at=time.monotonic(),
        )
        self.deliveries.append(delivery)
        if self.on_delivery is not None:
            try:
                self.on_delivery(delivery)
            except Exception:  # a display bug must not turn into retries
                log.exception("on_delivery callback failed")
        return web.Response(text="thanks!\n")  # durian's listening view said so too

    def _check(self, request: web.Request, body: bytes) -> str:
        if not self._keys:
            return SKIPPED
        header = request.headers.get("webhook-signature")
        if not header:
            return MISSING
        msg_id = request.headers.get("webhook-id", "")
        timestamp = request.headers.get("webhook-timestamp", "")
        if any(signing.verify(key, msg_id, timestamp, body, header) for key in self._keys):
            return VERIFIED
        return INVALID


def _parse(body: bytes) -> Any:
    try:
        return jsoncodec.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None


def format_delivery(delivery: Delivery) -> str:
    """A few lines for the terminal: what arrived and whether it is genuine."""
    lines = [f"POST {delivery.path}  webhook-id: {delivery.webhook_id or '(none)'}  "
             f"signature: {delivery.signature}"]
    skew = delivery.clock_skew
    if skew is not None:
        lines.append(f"  warning: webhook-timestamp is {skew:+.0f} s off; receivers reject "
                     f"beyond {TOLERANCE} s")
    payload = delivery.payload
    if not isinstance(payload, dict):
        text = delivery.body[:500].decode("utf-8", "replace")
        more = " ..." if len(delivery.body) > 500 else ""
        lines.append(f"  body (not a JSON object): {text}{more}")
        return "\n".join(lines)
    key = payload.get("key")
    lines.append(f"  hook: {payload.get('hook')}  event: {payload.get('event')}  "
                 f"id: {payload.get('id')}" + (f"  key: {jsoncodec.dumps_spaced(key)}" if key else ""))
    lines.append(f"  data: {jsoncodec.dumps_spaced(payload.get('data'))}")
    for extra in ("changes", "old_key"):
        if extra in payload:
            lines.append(f"  {extra}: {jsoncodec.dumps_spaced(payload[extra])}")
    return "\n".join(lines)


def serve(host: str, port: int, secrets: Sequence[str] = ()) -> None:
    """Runs the receiver in the foreground, printing each delivery, until SIGINT/SIGTERM."""
    asyncio.run(_serve(host, port, secrets))


async def _serve(host: str, port: int, secrets: Sequence[str]) -> None:
    receiver = Receiver(secrets, lambda d: print(format_delivery(d) + "\n", flush=True))
    url = await receiver.start(host, port)
    checking = (f"verifying signatures with {len(secrets)} secret{'s' * (len(secrets) > 1)}"
                if secrets else "unsigned check skipped: give --secret whsec_... to verify signatures")
    print(f"debug receiver listening on {url} ({checking}); Ctrl-C to stop\n", flush=True)
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):  # SIGTERM: `docker stop` (PID 1 ignores it otherwise)
        loop.add_signal_handler(sig, stopped.set)
    try:
        await stopped.wait()
    finally:
        await receiver.stop()
        print(f"debug receiver stopped after {len(receiver.deliveries)} deliveries", flush=True)
