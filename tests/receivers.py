"""Real HTTP receivers on loopback and a relay run as a real process, for delivery tests.

``Receiver``
    An aiohttp server on 127.0.0.1 (a free port), served from its own thread
    and event loop, so synchronous tests can drive the database and the relay
    while it answers. It records every request (method, path, headers, body)
    and answers by plan: ``plan(path, Reply(500), Reply(200))`` scripts the
    next answers of a path, ``set_default(path, Reply(...))`` the answer after
    the plan is used up (default 200). A ``Reply`` may delay, set headers
    (Retry-After, Location) and a body. Nothing is mocked: the relay speaks
    HTTP over real sockets.

``RelayProcess``
    ``python -m cdc_hooks --config FILE run`` (or another command) as a
    subprocess, its output in a log file, so a test can SIGKILL or SIGTERM it
    like an operator would.

``InProcessRelay``
    ``Relay(config).run()`` on a thread with its own loop; ``stop()`` asks it
    to stop and waits.

``wait_until(predicate, timeout)`` polls a condition; tests assert on the
outcome, never on how long it took.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from cdc_hooks.config import Config
from cdc_hooks.relay.relay import Relay


@dataclass(frozen=True)
class Reply:
    status: int = 200
    delay: float = 0.0  # seconds before answering
    headers: dict[str, str] = field(default_factory=dict)
    body: str = "ok"


@dataclass(frozen=True)
class Received:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    status: int  # what the receiver answered
    at: float  # time.monotonic() when the request arrived
    peer_port: int = 0  # the sender's TCP port: which connection (so which process) sent it

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]


Responder = Callable[[dict[str, str], bytes], Reply]


class Receiver:
    """A loopback HTTP server that records requests and answers as planned."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._received: list[Received] = []
        self._plans: dict[str, list[Reply]] = {}
        self._defaults: dict[str, Reply | Responder] = {}
        self.arrivals = 0  # requests that arrived, answered or not yet
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self.port = 0

    # Lifecycle ---------------------------------------------------------------

    def start(self) -> Receiver:
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(10)
        return self

    async def _serve(self) -> int:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        return int(self._runner.addresses[0][1])

    def close(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(
                self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    # Behaviour ---------------------------------------------------------------

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def plan(self, path: str, *replies: Reply) -> None:
        """The next answers to requests on path, in order."""
        with self._lock:
            self._plans.setdefault(path, []).extend(replies)

    def set_default(self, path: str, reply: Reply | Responder) -> None:
        """The answer on path once its plan is used up: a Reply, or a function
        of (headers, body) returning one (called on the receiver's loop)."""
        with self._lock:
            self._defaults[path] = reply

    def _next_reply(self, path: str, headers: dict[str, str], body: bytes) -> Reply:
        with self._lock:
            self.arrivals += 1
            self._lock.notify_all()
            plan = self._plans.get(path)
            if plan:
                return plan.pop(0)
            default = self._defaults.get(path, Reply())
        return default if isinstance(default, Reply) else default(headers, body)

    async def _handle(self, request: web.Request) -> web.Response:
        at = time.monotonic()
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        reply = self._next_reply(request.path, headers, body)
        if reply.delay:
            await asyncio.sleep(reply.delay)
        peer = request.transport.get_extra_info("peername") if request.transport else None
        received = Received(request.method, request.path, headers, body, reply.status, at,
                            peer[1] if peer else 0)
        with self._lock:
            self._received.append(received)
            self._lock.notify_all()
        return web.Response(status=reply.status, text=reply.body, headers=reply.headers)

    # Inspection --------------------------------------------------------------

    def received(self, path: str | None = None) -> list[Received]:
        with self._lock:
            return [r for r in self._received if path is None or r.path == path]

    def bodies(self, path: str | None = None) -> list[Any]:
        return [r.json for r in self.received(path)]

    def wait_for(self, count: int, path: str | None = None, timeout: float = 30.0) -> list[Received]:
        """At least count requests on path (all paths if None); fails after timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                got = [r for r in self._received if path is None or r.path == path]
                if len(got) >= count:
                    return got
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"receiver got {len(got)} requests on {path or 'any path'}, "
                        f"expected {count}")
                self._lock.wait(min(left, 0.5))


    def wait_for_arrivals(self, count: int, timeout: float = 30.0) -> None:
        """At least count requests arrived (answered or still being answered)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self.arrivals < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{self.arrivals} requests arrived, expected {count}")
                self._lock.wait(min(left, 0.5))


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05,
               message: str = "condition") -> Any:
    """Polls predicate until it returns something truthy, which is returned."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} not reached within {timeout} s (last: {value!r})")
        time.sleep(interval)


class RelayProcess:
    """`python -m cdc_hooks [GLOBAL...] --config FILE run [RUN...]` (or `command`
    instead of run) as a child process, killable like a real deployment; its
    output goes to a log file."""

    def __init__(self, config_path: Path, log_path: Path, *, global_args: tuple[str, ...] = (),
                 run_args: tuple[str, ...] = (), env: dict[str, str] | None = None,
                 command: str = "run") -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.argv = [sys.executable, "-m", "cdc_hooks", *global_args, "--config", str(config_path),
                     command, *run_args]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RelayProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self.env)
        return self

    def wait_connected(self) -> RelayProcess:
        wait_until(lambda: "relay connected" in self.log() or not self.running,
                   message="relay connected")
        assert self.running, self.log()
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no cleanup at all, like a crash or the OOM killer."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 30.0, sig: int = signal.SIGTERM) -> int:
        """SIGTERM (or sig) and the exit code (fails if it does not exit within timeout)."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") \
            if self.log_path.exists() else ""

    def cleanup(self) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(10)


class RelayProcesses:
    """Starts RelayProcesses for a test, their logs in log_dir; cleanup() kills
    those still up (a fixture's teardown)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[RelayProcess] = []

    def start(self, config: Config | Path, *run_args: str, global_args: tuple[str, ...] = (),
              env: dict[str, str] | None = None, wait_connected: bool = True) -> RelayProcess:
        path = config.path if isinstance(config, Config) else config
        assert path is not None
        relay = RelayProcess(path, self.log_dir / f"relay-{len(self.started)}.log",
                             global_args=global_args, run_args=run_args, env=env).start()
        self.started.append(relay)
        return relay.wait_connected() if wait_connected else relay

    def cleanup(self) -> None:
        for relay in self.started:
            relay.cleanup()


class InProcessRelay:
    """Relay(config).run() on a thread, for tests that need no process boundary."""

    def __init__(self, config: Config) -> None:
        self.relay = Relay(config)
        self._loop = asyncio.new_event_loop()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self.relay.run())
        except BaseException as exc:  # reported by stop()
            self._error = exc
        finally:
            self._loop.close()

    def start(self) -> InProcessRelay:
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self.relay.stop)
            self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError("relay did not stop")
        if self._error is not None:
            raise self._error


PG_BIN = Path("/usr/lib/postgresql/15/bin")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def skip_without_postgres_user() -> None:
    """initdb refuses to run as root: a server of a test's own then runs as postgres."""
    if os.geteuid() == 0:
        import pwd

        try:
            pwd.getpwnam("postgres")
        except KeyError:
            import pytest

            pytest.skip("running as root without a postgres user to run initdb as")


class OwnPostgres:
    """A PostgreSQL server the test owns (initdb + pg_ctl into a temp dir on a
    free port), so it may stop and restart it: the shared server is never touched.
    Run as the postgres system user when the tests run as root (initdb refuses root)."""

    def __init__(self) -> None:
        self.bin = _bin_dir()
        self.dir = Path(tempfile.mkdtemp(prefix="cdc-hooks-own-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.user = "postgres" if os.geteuid() == 0 else None
        if self.user:
            shutil.chown(self.dir, self.user)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres",
                  "--no-sync", "-E", "UTF8")
        self.dsn = f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run([str(self.bin / tool), *args], check=True, user=self.user,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "log"), "-o", options,
                  "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


def _bin_dir() -> Path:
    """This machine's PostgreSQL 15, else pg_ctl on PATH, else pgserver's own build."""
    if (PG_BIN / "pg_ctl").exists():
        return PG_BIN
    found = shutil.which("pg_ctl")
    if found is not None:
        return Path(found).parent
    from pgserver._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)
