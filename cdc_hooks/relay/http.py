"""One HTTP attempt: signed POST, bounded in time and in what is read.

aiohttp, not httpx, carries the deliveries: it made many times more POSTs per
second against a local receiver (README, "Why aiohttp"; bench/RESULTS-relay.md).
"""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass

import aiohttp
from yarl import URL

from .. import signing
from ..netpolicy import AddressRefused, NetworkPolicy, PolicyResolver, literal_address
from ..urls import redact_url

USER_AGENT = "cdc-hooks/0.1 (+https://www.standardwebhooks.com/)"


@dataclass(frozen=True)
class Target:
    """How to send to one listener, made when listeners are loaded, not per request:
    its URL, signing key, its own headers, and the key a rotation replaced, which
    signs beside the new one until ``previous_until`` (time.time())."""

    url: str
    key: bytes
    headers: tuple[tuple[str, str], ...] = ()
    previous_key: bytes | None = None
    previous_until: float = 0.0


@dataclass(slots=True)  # not frozen: a frozen __init__ is several times slower; this is per request
class Response:
    code: int | None  # None: no HTTP response (connection error, timeout, refused)
    duration_ms: float
    error: str | None = None
    body: str | None = None
    retry_after: str | None = None
    retryable: bool = True  # for errors without a response


class Sender:
    """Owns the aiohttp session: connection reuse, SSRF-checked resolution."""

    def __init__(self, policy: NetworkPolicy, *, timeout: float, max_response_bytes: int,
                 connections: int) -> None:
        self.policy = policy
        self.timeout = timeout
        self.max_response_bytes = max_response_bytes
        self._urls: dict[str, URL] = {}  # URLs whose host passed _checked, parsed
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                resolver=PolicyResolver(policy), limit=connections, limit_per_host=0,
                ttl_dns_cache=10, enable_cleanup_closed=True,
            ),
            headers={"User-Agent": USER_AGENT, "Content-Type": "application/json"},
            # A receiver's cookies are never sent back, to it or to another listener's URL.
            cookie_jar=aiohttp.DummyCookieJar(),
            # One deadline for connecting, sending and reading the response, so a
            # receiver dripping bytes cannot stretch it; no asyncio.timeout on top
            # of it, a second timer per request.
            timeout=aiohttp.ClientTimeout(total=timeout),
            auto_decompress=False,
            skip_auto_headers=("Accept-Encoding",),
        )

    async def close(self) -> None:
        await self._session.close()

    async def post(self, target: Target, body: bytes, msg_id: str) -> Response:
        started = time.perf_counter()
        try:
            url = self._checked(target.url)
            now = time.time()
            headers = signing.headers(target.key, msg_id, int(now), body)
            if target.previous_key is not None and now < target.previous_until:
                # Standard Webhooks: space-separated signatures, any one may verify.
                headers["webhook-signature"] += " " + signing.sign(
                    target.previous_key, msg_id, int(now), body)
            if target.headers:
                headers.update(target.headers)
            async with self._session.post(url, data=body, headers=headers,
                                          allow_redirects=False) as resp:
                text = await self._read_capped(resp)
                return Response(resp.status, _ms(started), _error_for(resp.status),
                                text, resp.headers.get("Retry-After"))
        except TimeoutError:
            return Response(None, _ms(started), f"timed out after {self.timeout:g} s")
        except (AddressRefused, aiohttp.ClientConnectorError) as exc:
            refused = _policy_refusal(exc)
            if refused is not None:
                return Response(None, _ms(started), str(refused), retryable=False)
            return Response(None, _ms(started), f"connection failed: {_reason(exc)}")
        except aiohttp.InvalidURL as exc:  # e.g. a non-canonical IPv4 host: retrying cannot help
            return Response(None, _ms(started), f"invalid URL: {_reason(exc)}", retryable=False)
        except (aiohttp.ClientError, ssl.SSLError, OSError) as exc:
            return Response(None, _ms(started), f"{type(exc).__name__}: {_reason(exc)}")
        except ValueError as exc:  # e.g. an URL aiohttp cannot parse
            return Response(None, _ms(started), f"invalid request: {_reason(exc)}", retryable=False)

    def _checked(self, url: str) -> URL:
        """The URL, parsed, once its host passed the policy if it is an IP literal
        (names are checked as they are resolved). Once per URL: parsing it on every
        request showed in the relay's profile."""
        parsed = self._urls.get(url)
        if parsed is None:
            parsed = URL(url)
            host = parsed.host or ""
            address = literal_address(host)
            if address is not None:
                self.policy.check_address(host, address)
            if len(self._urls) > 10_000:
                self._urls.clear()
            self._urls[url] = parsed
        return parsed

    async def _read_capped(self, resp: aiohttp.ClientResponse) -> str:
        """At most max_response_bytes of the body: a huge response is never read in full."""
        chunks, left = [], self.max_response_bytes
        while left > 0 and not resp.content.at_eof():
            chunk = await resp.content.read(left)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        # PostgreSQL text cannot hold NUL: a receiver's NUL byte must not stop the log.
        return b"".join(chunks).decode("utf-8", "replace").replace("\x00", "\ufffd")


def _error_for(code: int) -> str | None:
    if 200 <= code < 300:
        return None
    if 300 <= code < 400:
        return f"HTTP {code}: redirects are not followed"
    return f"HTTP {code}"


def _policy_refusal(exc: BaseException) -> AddressRefused | None:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, AddressRefused):
            return seen
        seen = seen.__cause__ or seen.__context__
    os_error = getattr(exc, "os_error", None)
    return os_error if isinstance(os_error, AddressRefused) else None


def _reason(exc: BaseException) -> str:
    """The error's text; a URL it quotes (aiohttp's do) without its credentials."""
    return redact_url(str(exc)) or type(exc).__name__


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0
