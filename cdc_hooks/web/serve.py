"""Serving the web interface: ``cdc-hooks web`` alone, or beside the relay
(``cdc-hooks run --web``) in the relay's event loop.

uvicorn runs on a socket bound here first, so a bad or busy address is a
one-line error before anything starts, and its own signal handling is off:
the caller's handlers stop the relay and the server together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
from collections.abc import Iterator

import uvicorn

from ..binding import http_url, is_loopback, listen, parse_bind
from ..config import WEB_TOKEN_ENV, Config, web_token
from ..errors import ConfigError
from .app import create_app

log = logging.getLogger("cdc_hooks.web")


def token_to_serve(config: Config, host: str) -> str:
    """The token; off loopback one must be configured, on loopback one is made up if not."""
    token = web_token(config)
    if token:
        return token
    if not is_loopback(host):
        raise ConfigError(f"refusing to serve the web interface on {host} without a token: "
                          f"set [web] token or {WEB_TOKEN_ENV} (or bind to 127.0.0.1)")
    token = secrets.token_urlsafe(24)
    # Like Jupyter: usable at once on this machine, never open to other local users.
    log.warning("no [web] token set: log in with this one-time token: %s", token)
    return token


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the caller's signal handlers stop the server (and the relay beside it)


class WebServer:
    """The web app on a bound socket; ``await serve()`` until ``stop()``."""

    def __init__(self, config: Config, bind: str | None = None) -> None:
        host, port = parse_bind(bind or config.web.bind)
        app = create_app(config, token=token_to_serve(config, host))
        self.socket = listen(host, port)
        self.host, self.port = host, self.socket.getsockname()[1]
        self.server = _Server(uvicorn.Config(app, lifespan="on", log_config=None, access_log=False,
                                             proxy_headers=False, server_header=False))

    @property
    def url(self) -> str:
        return http_url(self.host, self.port)

    async def serve(self) -> None:
        log.info("web interface and REST API on %s", self.url)
        await self.server.serve(sockets=[self.socket])

    def stop(self) -> None:
        self.server.should_exit = True


def serve_forever(config: Config, bind: str | None = None) -> None:
    """``cdc-hooks web``: serves until SIGTERM/SIGINT."""
    server = WebServer(config, bind)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, server.stop)
        await server.serve()

    asyncio.run(main())
