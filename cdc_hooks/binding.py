"""The address a server of cdc-hooks listens on (the web interface, /metrics):
HOST:PORT as given, whether it is loopback, and the bound socket.

Binding here, before anything starts, makes a bad or busy address a one-line error.
"""

from __future__ import annotations

import ipaddress
import socket

from .errors import ConfigError


def parse_bind(text: str, option: str = "--bind", example: str = "127.0.0.1:8080") -> tuple[str, int]:
    """HOST:PORT, [IPv6]:PORT or :PORT (loopback) -> (host, port); a ConfigError
    naming the option otherwise."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f'{option} {text!r}: expected HOST:PORT, such as "{example}"')
    return host.strip("[]") or "127.0.0.1", int(port_text)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket; ConfigError if the address is bad or busy."""
    # proto=IPPROTO_TCP, not socket.create_server's 0: asyncio sets TCP_NODELAY only on
    # connections whose proto says TCP; without it every keep-alive request waits for
    # a delayed ACK (~40 ms).
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def http_url(host: str, port: int, path: str = "") -> str:
    """The URL of a server listening on host:port (an IPv6 host in brackets)."""
    return f"http://{f'[{host}]' if ':' in host else host}:{port}{path}"
