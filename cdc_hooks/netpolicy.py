"""Which network addresses webhooks may go to (SSRF defence).

By default only global unicast addresses: loopback, private, link-local (cloud
metadata), unspecified, shared, reserved, site-local and multicast ranges are
refused. An IPv6 address that carries an IPv4 address (IPv4-mapped,
-compatible and -translated, NAT64 64:ff9b::/96, 6to4, Teredo) reaches that
IPv4 host through a translator or a tunnel, so it is refused unless the IPv4
address is global too. The check applies to the address actually connected
to, after DNS resolution (see PolicyResolver), and again when a listener is
created.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from .errors import ListenerError
from .urls import redact_url

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class AddressRefused(OSError):
    """A destination address is outside the delivery policy."""


@dataclass(frozen=True)
class NetworkPolicy:
    allow_private_networks: bool = False
    allowed_networks: Sequence[Network] = ()

    def allows(self, address: str) -> bool:
        """Whether the policy lets a connection go to this IP address: one of its
        forms (itself, an IPv4 address embedded in it) is in allowed_networks, or
        private networks are allowed, or every form is public."""
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        forms = address_forms(ip)
        if any(form in network for form in forms for network in self.allowed_networks):
            return True
        if self.allow_private_networks:
            return True
        return all(_is_public(form) for form in forms)

    def check_address(self, host: str, address: str) -> None:
        if not self.allows(address):
            raise AddressRefused(
                f"{host} resolves to {address}, a non-public address refused by the delivery "
                "policy (set [delivery] allow_private_networks or allowed_networks to permit it)"
            )


def check_url(url: str, policy: NetworkPolicy) -> None:
    """Validates a listener URL at creation: http(s), a host, allowed addresses.
    Errors quote it with its credentials masked."""
    shown = redact_url(url)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ListenerError(f"URL {shown!r} must be http:// or https://")
    if not parts.hostname:
        raise ListenerError(f"URL {shown!r} has no host")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ListenerError(f"URL {shown!r} has an invalid port") from None
    try:
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ListenerError(f"URL {shown!r}: cannot resolve {parts.hostname}: {exc}") from None
    for info in infos:
        try:
            policy.check_address(parts.hostname, str(info[4][0]))
        except AddressRefused as exc:
            raise ListenerError(f"URL {shown!r}: {exc}") from None
    if literal_address(parts.hostname) is None and _legacy_ipv4(parts.hostname):
        # getaddrinfo reads 2130706433 or 127.1 as IPv4, aiohttp refuses to send to
        # them: refuse now rather than fail every delivery.
        raise ListenerError(f"URL {shown!r}: write the IPv4 address {parts.hostname} in dotted "
                            f"form ({infos[0][4][0]})")


class PolicyResolver(AbstractResolver):
    """aiohttp resolver that drops addresses the policy refuses: the relay
    connects only to what it checked, so DNS rebinding cannot slip past."""

    def __init__(self, policy: NetworkPolicy) -> None:
        self.policy = policy
        self._inner = aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        allowed = [r for r in results if self.policy.allows(r["host"])]
        if not allowed:
            self.policy.check_address(host, results[0]["host"] if results else "(nothing)")
        return allowed

    async def close(self) -> None:
        await self._inner.close()


# Not global, though ipaddress (before Python 3.13) says they are: the local-use
# NAT64 prefix (RFC 8215) and the deprecated site-local range.
_NOT_PUBLIC_V6 = (ipaddress.IPv6Network("64:ff9b:1::/48"), ipaddress.IPv6Network("fec0::/10"))
# Prefixes whose low 32 bits are an IPv4 address that the packet ends up at.
_IPV4_IN_LOW_BITS = (
    ipaddress.IPv6Network("::/96"),  # IPv4-compatible (deprecated), also :: and ::1
    ipaddress.IPv6Network("::ffff:0:0/96"),  # IPv4-mapped
    ipaddress.IPv6Network("::ffff:0:0:0/96"),  # IPv4-translated (RFC 2765)
    ipaddress.IPv6Network("64:ff9b::/96"),  # NAT64 well-known prefix (RFC 6052)
)


def address_forms(ip: ipaddress.IPv4Address | ipaddress.IPv6Address
                  ) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]:
    """The address and every IPv4 address embedded in it: translated to or
    tunnelled to, each must pass the policy (a NAT64 or 6to4 form of 127.0.0.1 or
    of the metadata address must not)."""
    if isinstance(ip, ipaddress.IPv4Address):
        return (ip,)
    embedded: list[ipaddress.IPv4Address] = []
    if any(ip in prefix for prefix in _IPV4_IN_LOW_BITS):
        embedded.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if ip.sixtofour is not None:
        embedded.append(ip.sixtofour)
    if ip.teredo is not None:
        embedded.extend(ip.teredo)  # the server and the client
    return (ip, *embedded)


def _is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if any(ip in prefix for prefix in _IPV4_IN_LOW_BITS):
        return True  # a wrapper: judged by the IPv4 address it embeds
    if isinstance(ip, ipaddress.IPv6Address) and any(ip in net for net in _NOT_PUBLIC_V6):
        return False
    return ip.is_global and not ip.is_multicast


def literal_address(host: str) -> str | None:
    """The host if it is an IP literal (aiohttp connects to those without resolving)."""
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return None


def _legacy_ipv4(host: str) -> bool:
    """A host the C library takes for an IPv4 address in a non-dotted-quad form."""
    try:
        socket.inet_aton(host)
    except OSError:
        return False
    return True
