"""Same question, same answer, from every interface (issue 17, item 2): the CLI, the
REST API, the Python client (over real HTTP) and the pages are asked to list deliveries,
show one, redeliver a pending, a finished and a missing one, and report the status;
their answers are compared with each other. Each calls cdc_hooks/services, so one of
them answering differently means an interface reached around the service layer.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import psycopg
import pytest
from click.testing import Result
from fastapi.testclient import TestClient

from cdc_hooks import install as installer
from cdc_hooks.client import ApiError, Client
from cdc_hooks.config import Config
from cdc_hooks.web import create_app
from cdc_hooks.web.serve import WebServer

TOKEN = "interfaces-token-0123456789"
CONFIG = f"""
[[hooks]]
name = "myhook"
provides = ["message"]

[delivery]
allow_private_networks = true

[web]
token = "{TOKEN}"
"""
DELIVERED, DEAD, PENDING, MISSING = 1, 2, 3, 999
Outcome = tuple[str, str]  # ("queued" | "refused", how many were queued | the message)
Shown = tuple[str, str, int]  # (status, webhook-id, attempts logged) | ("refused", HTTP status, 0)


@pytest.fixture
def config(conn: psycopg.Connection[Any], make_config: Callable[..., Config]) -> Config:
    """One listener with a delivered, a dead and a pending delivery (ids 1, 2, 3)."""
    config = make_config(CONFIG)
    installer.install(config)
    conn.execute("INSERT INTO cdc_hooks.listeners (id, hook, url, secret) OVERRIDING SYSTEM VALUE "
                 "VALUES (1, 'myhook', 'http://127.0.0.1:9/hook', 'whsec_'||repeat('A', 43))")
    for delivery_id, status, attempts, code, error in (
            (DELIVERED, "delivered", 1, 200, None), (DEAD, "dead", 3, None, "refused"),
            (PENDING, "pending", 0, None, None)):
        conn.execute("INSERT INTO cdc_hooks.events (id, hook, kind, body, occurred_at) "
                     "VALUES (%s, 'myhook', 'myhook', '{\"data\": {\"message\": \"hi\"}}', now())",
                     (delivery_id,))
        conn.execute("INSERT INTO cdc_hooks.deliveries (id, event_id, listener_id, status, "
                     "attempts, last_status, last_error, finished_at) OVERRIDING SYSTEM VALUE "
                     "VALUES (%s, %s, 1, %s, %s, "
                     "%s, %s, CASE WHEN %s <> 'pending' THEN now() END)",
                     (delivery_id, delivery_id, status, attempts, code, error, status))
        if attempts:
            conn.execute("INSERT INTO cdc_hooks.attempts (delivery_id, status_code, duration_ms, "
                         "error) VALUES (%s, %s, 12.3, %s)", (delivery_id, code, error))
    return config


@pytest.fixture
def web_url(config: Config) -> Iterator[str]:
    """The web app served over HTTP on loopback, on a thread."""
    server = WebServer(config, "127.0.0.1:0")
    thread = threading.Thread(target=asyncio.run, args=(server.serve(),), daemon=True)
    thread.start()
    with httpx.Client() as probe:
        for _ in range(200):
            try:
                probe.get(f"{server.url}/healthz")
                break
            except httpx.TransportError:
                threading.Event().wait(0.05)
    yield server.url
    server.stop()
    thread.join(10)


class Cli:
    def __init__(self, cli: Callable[..., Result], config: Config) -> None:
        self.run = lambda *args: cli(config, *args)

    def deliveries(self, *filters: str) -> list[tuple[int, str]]:
        lines = self.run("deliveries", *filters).stdout.splitlines()[1:]
        return [(int(cells[0]), cells[5]) for cells in (line.split() for line in lines)
                if cells[0].isdigit()]

    def redeliver(self, delivery_id: int) -> Outcome:
        return self._queued(self.run("redeliver", str(delivery_id)))

    def redeliver_dead(self, listener_id: int) -> Outcome:
        return self._queued(self.run("redeliver", "--listener", str(listener_id)))

    @staticmethod
    def _queued(result: Result) -> Outcome:
        if result.exit_code:
            return "refused", result.stderr.strip().removeprefix("error: ")
        return "queued", result.stdout.split()[0]  # "1 delivery queued again"

    def status(self) -> dict[str, int]:
        figures = dict(line.rsplit(None, 1) for line in self.run("status").stdout.splitlines()[1:8])
        return {"pending": int(figures["deliveries pending"]), "dead": int(figures["dead letters"])}


class Rest:
    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"})

    def deliveries(self, **filters: str) -> list[tuple[int, str]]:
        return [(d["id"], d["status"])
                for d in self.http.get("/api/deliveries", params=filters).json()["items"]]

    def delivery(self, delivery_id: int) -> Shown:
        answer = self.http.get(f"/api/deliveries/{delivery_id}")
        if answer.is_error:
            return "refused", str(answer.status_code), 0
        d = answer.json()
        return d["status"], d["webhook_id"], len(d["attempt_log"])

    def redeliver(self, delivery_id: int) -> Outcome:
        return self._queued(self.http.post(f"/api/deliveries/{delivery_id}/redeliver"))

    def redeliver_dead(self, listener_id: int) -> Outcome:
        return self._queued(self.http.post(f"/api/listeners/{listener_id}/redeliver"))

    @staticmethod
    def _queued(answer: httpx.Response) -> Outcome:
        if answer.is_error:
            return "refused", answer.json()["detail"]
        return "queued", str(len(answer.json()["queued"]))

    def status(self) -> dict[str, int]:
        figures = self.http.get("/api/status").json()
        return {"pending": figures["pending"], "dead": figures["dead"]}


class Python:
    def __init__(self, url: str) -> None:
        self.client = Client(url, token=TOKEN)

    def deliveries(self, **filters: str) -> list[tuple[int, str]]:
        return [(d.id, d.status) for d in self.client.deliveries(**filters).items]

    def delivery(self, delivery_id: int) -> Shown:
        try:
            d = self.client.delivery(delivery_id)
        except ApiError as exc:
            return "refused", str(exc.status_code), 0
        return d.status, d.webhook_id, len(d.attempt_log)

    def redeliver(self, delivery_id: int) -> Outcome:
        return self._queued(self.client.redeliver, delivery_id)

    def redeliver_dead(self, listener_id: int) -> Outcome:
        return self._queued(self.client.redeliver_failed, listener_id)

    @staticmethod
    def _queued(ask: Callable[[int], Any], given: int) -> Outcome:
        try:
            return "queued", str(len(ask(given)))
        except ApiError as exc:
            return "refused", exc.message

    def status(self) -> dict[str, int]:
        figures = self.client.status()
        return {"pending": figures.pending, "dead": figures.dead}


class Pages:
    def __init__(self, client: TestClient) -> None:
        self.client = client
        page = client.get("/login")
        client.post("/login", data={"csrf": self._csrf(page.text), "token": TOKEN})

    @staticmethod
    def _csrf(html: str) -> str:
        return re.search(r'name="csrf" value="([^"]+)"', html).group(1)  # type: ignore[union-attr]

    def deliveries(self, **filters: str) -> list[tuple[int, str]]:
        html = self.client.get("/deliveries", params=filters).text
        return [(int(i), s) for s, i in re.findall(r'<tr class="delivery (\w+)" data-id="(\d+)"', html)]

    def delivery(self, delivery_id: int) -> Shown:
        answer = self.client.get(f"/deliveries/{delivery_id}")
        if answer.is_error:
            return "refused", str(answer.status_code), 0
        status, webhook_id = re.search(  # type: ignore[union-attr]
            r'<h1>Delivery \d+ <span class="status (\w+)">.*<dt>webhook-id</dt><dd><code>([^<]+)',
            answer.text, re.DOTALL).groups()
        return status, webhook_id, answer.text.count("<tr><td>")

    def redeliver(self, delivery_id: int) -> Outcome:
        return self._queued(f"/deliveries/{delivery_id}/redeliver", r"Delivery \d+ (queued) again")

    def redeliver_dead(self, listener_id: int) -> Outcome:
        return self._queued(f"/listeners/{listener_id}/redeliver", r"(\d+) failed deliveries")

    def _queued(self, path: str, flashed: str) -> Outcome:
        csrf = self._csrf(self.client.get("/deliveries").text)
        answer = self.client.post(path, data={"csrf": csrf}, follow_redirects=False)
        if answer.status_code == 303:
            count = re.search(flashed, self.client.get(answer.headers["location"]).text).group(1)  # type: ignore[union-attr]
            return "queued", count.replace("queued", "1")
        return "refused", re.search(r'<p class="error" role="alert">([^<]*)</p>',  # type: ignore[union-attr]
                                    answer.text).group(1)

    def status(self) -> dict[str, int]:
        html = self.client.get("/").text
        pending = re.search(r'Backlog</span><span class="value">(\d+)', html).group(1)  # type: ignore[union-attr]
        dead = re.search(r"(\d+) dead letters", html).group(1)  # type: ignore[union-attr]
        return {"pending": int(pending), "dead": int(dead)}


@pytest.fixture
def interfaces(config: Config, cli: Callable[..., Result], web_url: str) -> Iterator[dict[str, Any]]:
    with TestClient(create_app(config), base_url="https://testserver") as pages:
        asked = {"cli": Cli(cli, config), "rest": Rest(web_url), "python": Python(web_url),
                 "pages": Pages(pages)}
        yield asked
        asked["rest"].http.close()
        asked["python"].client.close()


def same(answers: dict[str, Any]) -> Any:
    """The one answer every interface gave (the assertion names them otherwise)."""
    assert len({repr(a) for a in answers.values()}) == 1, answers
    return next(iter(answers.values()))


def test_every_interface_lists_the_same_deliveries(interfaces):
    everything = same({name: asked.deliveries() for name, asked in interfaces.items()})
    assert everything == [(PENDING, "pending"), (DEAD, "dead"), (DELIVERED, "delivered")]
    dead = {name: asked.deliveries("--failed") if name == "cli" else asked.deliveries(status="dead")
            for name, asked in interfaces.items()}
    assert same(dead) == [(DEAD, "dead")]


def test_every_interface_shows_the_same_delivery(interfaces):
    shown = {name: asked for name, asked in interfaces.items() if name != "cli"}  # no such command
    assert same({name: asked.delivery(DEAD) for name, asked in shown.items()}) == \
        ("dead", f"msg_{DEAD}_1", 1)
    assert same({name: asked.delivery(MISSING) for name, asked in shown.items()}) == \
        ("refused", "404", 0)
    durations = interfaces["rest"].http.get(f"/api/deliveries/{DEAD}").json()
    assert durations["duration_ms"] == durations["attempt_log"][0]["duration_ms"] == 12.3  # as stored


def test_redelivery_answers_the_same_from_every_interface(interfaces, conn):
    assert same({name: asked.redeliver(PENDING) for name, asked in interfaces.items()}) == \
        ("refused", f"delivery {PENDING} is pending: it is already queued")
    assert same({name: asked.redeliver(MISSING) for name, asked in interfaces.items()}) == \
        ("refused", f"no delivery with id {MISSING}")
    finished = {}
    for name, asked in interfaces.items():
        conn.execute("UPDATE cdc_hooks.deliveries SET status = 'dead', finished_at = now() "
                     "WHERE id = %s", (DEAD,))
        finished[name] = asked.redeliver(DEAD)
        assert conn.execute("SELECT status, attempts FROM cdc_hooks.deliveries WHERE id = %s",
                            (DEAD,)).fetchone() == ("pending", 0), name
    assert same(finished) == ("queued", "1")


def test_every_interface_reports_the_same_status(interfaces):
    assert same({name: asked.status() for name, asked in interfaces.items()}) == \
        {"pending": 1, "dead": 1}


def test_redelivering_dead_letters_answers_the_same_from_every_interface(interfaces, conn):
    assert same({name: asked.redeliver_dead(MISSING) for name, asked in interfaces.items()}) == \
        ("refused", f"no listener with id {MISSING}")
    queued = {}
    for name, asked in interfaces.items():
        conn.execute("UPDATE cdc_hooks.deliveries SET status = 'dead' WHERE id = %s", (DEAD,))
        queued[name] = asked.redeliver_dead(1)
    assert same(queued) == ("queued", "1")
