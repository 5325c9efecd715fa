"""`cdc-hooks run --workers N`: N relays in N processes, to use more than one core.

One relay process is CPU-bound: the HTTP client and the event loop run on one core
(figures: bench/RESULTS-relay.md). The workers share the work
through the database exactly as separate relays do (docs/operations.md, "Running several
relays"). This module only starts the other workers, gives each its share of the
limits, stops them with the first, and gathers their counters into its /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import time
from collections.abc import Callable
from dataclasses import replace
from multiprocessing.connection import Connection

from .. import logs, metrics
from ..config import Config

log = logging.getLogger("cdc_hooks.relay")

REPORT_EVERY = 1.0  # seconds between a worker's metrics reports
STOP_GRACE = 10.0  # seconds a worker may take beyond its requests' timeout to stop


def share(config: Config, workers: int) -> Config:
    """One worker's config: [delivery] concurrency is for the whole command, split
    evenly (at least 1 each). listener_concurrency is not split: it holds for all
    relays of the database together, which share it through PostgreSQL."""
    delivery = config.delivery
    return replace(config, delivery=replace(
        delivery, concurrency=max(1, delivery.concurrency // workers)))


class Workers:
    """The other workers of this command (this process is the first): spawned at
    once, each running ``target(config, number, log_format, pipe)``; stop() ends them."""

    def __init__(self, config: Config, count: int,
                 target: Callable[[Config, int, str, Connection], None]) -> None:
        # spawn, not fork: this process already holds sockets and threads.
        context = multiprocessing.get_context("spawn")
        self._timeout = config.delivery.timeout
        self._workers: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []
        self._stopping = False
        self.failure: str | None = None
        for number in range(2, count + 2):
            receive, send = context.Pipe(duplex=False)
            process = context.Process(target=target,
                                      args=(config, number, logs.current_format(), send),
                                      name=f"cdc-hooks relay worker {number}", daemon=True)
            process.start()
            send.close()
            self._workers.append((process, receive))

    def stop(self) -> None:
        """SIGTERM to each worker: a graceful stop, as the first worker's."""
        self._stopping = True
        for process, _ in self._workers:
            if process.is_alive():
                process.terminate()

    async def watch(self, stop_all: Callable[[], None]) -> None:
        """Gathers the workers' metrics until they all exited after stop(). A worker
        that exits on its own stops the whole command (failure says which)."""
        deadline = None
        while any(process.is_alive() for process, _ in self._workers):
            self._gather()
            if not self._stopping:
                self._check(stop_all)
            elif deadline is None:
                deadline = time.monotonic() + self._timeout + STOP_GRACE
            elif time.monotonic() > deadline:
                for process, _ in self._workers:
                    process.kill()
            await asyncio.sleep(0.05 if self._stopping else REPORT_EVERY)
        self._gather()
        if not self._stopping:
            self._check(stop_all)

    def _check(self, stop_all: Callable[[], None]) -> None:
        for number, (process, _) in enumerate(self._workers, 2):
            if not process.is_alive():
                self.failure = f"relay worker {number} exited with status {process.exitcode}"
                log.error("%s: stopping the others", self.failure)
                stop_all()
                return

    def _gather(self) -> None:
        for number, (_, pipe) in enumerate(self._workers, 2):
            try:
                while pipe.poll():
                    metrics.WORKERS[number] = pipe.recv()
            except (EOFError, OSError):
                continue  # exited: its last report stays counted


async def report_metrics(pipe: Connection, stopping: asyncio.Event,
                         stop: Callable[[], None]) -> None:
    """In a worker: sends its counters to the first worker every second, and once
    more when stopping. A broken pipe means the first worker is gone (killed): this
    one stops too."""
    while True:
        try:
            pipe.send(metrics.STATS)
        except OSError:
            if not stopping.is_set():
                log.error("the first relay worker is gone: stopping")
                stop()
            return
        if stopping.is_set():
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(REPORT_EVERY):
                await stopping.wait()
