"""The REST API's Python client (cdc_hooks.client, issue 16): every method of Client and
AsyncClient against a live `cdc-hooks web` process, a real relay and a loopback
receiver; error answers as ApiError; retries only of requests that never left.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from receivers import InProcessRelay, Receiver, Reply, free_port, wait_until
from shared import PERSON_TABLE

from cdc_hooks import Endswith, Startswith
from cdc_hooks.client import ApiError, AsyncClient, Client, Page
from cdc_hooks.config import Config

TOKEN = "client-test-token-0123456789"
CONFIG = f"""
[[hooks]]
name = "person"
table = "person"
provides = ["name", "address"]

[[hooks]]
name = "myhook"
provides = ["message", "n"]

[delivery]
allow_private_networks = true
retry_schedule = [0.2]
timeout = 2

[web]
token = "{TOKEN}"
"""


@pytest.fixture
def config(installed: Callable[..., Config]) -> Config:
    return installed(CONFIG, PERSON_TABLE)


@pytest.fixture
def server(config: Config, serve_web: Callable[[Config], str]) -> str:
    """`cdc-hooks web` as its own process; its URL."""
    return serve_web(config)


@pytest.fixture
def relay(config: Config) -> Iterator[None]:
    running = InProcessRelay(config).start()
    yield
    running.stop()


class Blocking:
    """An AsyncClient whose coroutines are run to their end, so that one scenario
    drives both clients."""

    def __init__(self, client: AsyncClient, loop: asyncio.AbstractEventLoop) -> None:
        self.client, self.loop = client, loop

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.client, name)

        def run(*args: Any, **kwargs: Any) -> Any:
            coroutine = method(*args, **kwargs)
            assert asyncio.iscoroutine(coroutine), name
            return self.loop.run_until_complete(coroutine)

        return run


def open_client(kind: str, url: str, **options: Any) -> Iterator[Any]:
    if kind == "sync":
        with Client(url, **options) as client:
            yield client
        return
    loop = asyncio.new_event_loop()
    client = AsyncClient(url, **options)
    try:
        yield Blocking(loop.run_until_complete(client.__aenter__()), loop)
    finally:
        loop.run_until_complete(client.__aexit__(None, None, None))
        loop.close()


@pytest.fixture(params=["sync", "async"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def api(kind: str, server: str) -> Iterator[Any]:
    yield from open_client(kind, server, token=TOKEN)


# Every method, against the live server ------------------------------------------


def finished(api: Any, count: int, **filters: Any) -> list[Any]:
    """count deliveries (with the filters), none pending."""
    def done() -> list[Any] | None:
        items = api.deliveries(**filters).items
        return items if len(items) >= count and all(d.status != "pending" for d in items) else None
    return wait_until(done, message=f"{count} finished deliveries")  # type: ignore[no-any-return]


def test_every_method_against_the_live_server(api, conn, relay, receiver: Receiver):
    assert {h.name for h in api.hooks()} == {"person", "myhook", "cdc_hooks.listener_disabled"}

    # durian's three listeners.
    joe = api.add_listener("person", receiver.url("/joe"), match={"name": "Joe"})
    j = api.add_listener("person", receiver.url("/j"), match={"name": Startswith("J")},
                         backfill=False)
    everyone = api.add_listener("person", receiver.url("/all"))
    assert j.secret.startswith("whsec_") and j.secret != everyone.secret
    assert (j.hook, j.url, j.match, j.backfill, j.state) == (
        "person", receiver.url("/j"), {"name": {"$startswith": "J"}}, False, "active")
    assert api.listener(joe.id).match == {"name": "Joe"} and "secret" not in api.listener(joe.id)
    receiver.set_default("/dead", Reply(500))
    dead = api.add_listener("myhook", receiver.url("/dead"))
    assert [x.id for x in api.listeners()] == [joe.id, j.id, everyone.id, dead.id]
    assert [x.id for x in api.listeners(hook="myhook")] == [dead.id]

    conn.execute("INSERT INTO person (name, address) VALUES ('Joe', 'a'), ('Jane', 'b'), ('Bob', 'c')")
    sent = api.send("myhook", message="hi", n=1)
    assert sent.id == f"evt_{sent.event_id}"
    receiver.wait_for(1 + 2 + 3)
    assert sorted(b["data"]["name"] for b in receiver.bodies("/j")) == ["Jane", "Joe"]
    (dead_letter,) = finished(api, 1, listener=dead.id, status="dead")

    page = api.deliveries(listener=j.id)
    assert isinstance(page, Page) and len(page.items) == 2 and page.next_before is None
    first = api.deliveries(limit=1, hook="person")
    assert len(first.items) == 1 and first.next_before == first.items[0].id
    older = api.deliveries(limit=10, hook="person", before=first.next_before)
    assert len(older.items) == 5 and first.items[0].id not in [d.id for d in older.items]
    assert len(api.deliveries(since=datetime.now(UTC) - timedelta(hours=1)).items) == 7
    assert api.deliveries(until=datetime.now(UTC) - timedelta(hours=1)).items == []
    detail = api.delivery(page.items[0].id)
    assert detail.body["hook"] == "person" and detail.attempt_log[0].status_code == 200

    assert api.redeliver(detail.id) == [detail.id]
    receiver.wait_for(3, "/j")
    receiver.set_default("/dead", Reply(200))
    assert api.redeliver_failed(dead.id) == [dead_letter.id]
    finished(api, 1, listener=dead.id, status="delivered")

    changed = api.update_listener(j.id, match={"name": Endswith("e")}, rotate_secret=True,
                                  url=receiver.url("/e"))
    assert changed.secret.startswith("whsec_") and changed.secret != j.secret
    assert (changed.match, changed.url) == ({"name": {"$endswith": "e"}}, receiver.url("/e"))
    assert api.update_listener(j.id, backfill=True).secret is None
    assert api.pause(j.id).state == "paused" and api.listener(j.id).state == "paused"
    assert api.resume(j.id).state == "active"

    status = api.status()
    assert status.minutes == 5 and status.delivered == 7 and status.pending == 0
    assert api.status(minutes=60).minutes == 60

    assert api.remove_listener(everyone.id) is None
    assert everyone.id not in [x.id for x in api.listeners()]


def test_error_answers_raise_api_error_with_the_status_and_the_apis_message(api, kind, server,
                                                                            receiver):
    for wrong in open_client(kind, server, token="wrong-token-0123456789"):
        with pytest.raises(ApiError) as unauthorized:
            wrong.hooks()
        assert unauthorized.value.status_code == 401

    with pytest.raises(ApiError) as not_found:
        api.listener(424242)
    assert not_found.value.status_code == 404
    assert not_found.value.message == "no listener with id 424242"
    assert str(not_found.value) == "404: no listener with id 424242"

    with pytest.raises(ApiError) as unknown_option:
        api.add_listener("person", receiver.url("/x"), colour="red")
    assert unknown_option.value.status_code == 422 and unknown_option.value.fields == ["body.colour"]
    assert unknown_option.value.message.startswith("body.colour: ")

    with pytest.raises(ApiError, match='422: match field "bogus": hook "person" does not provide it'):
        api.add_listener("person", receiver.url("/x"), match={"bogus": Startswith("J")})
    with pytest.raises(ApiError, match=r'404: .*"nohook"'):
        api.send("nohook", message="hi")
    with pytest.raises(ApiError, match=r"422: .*does not provide bogus"):
        api.send("myhook", bogus=1)
    with pytest.raises(ApiError) as bad_limit:
        api.deliveries(limit=0)
    assert bad_limit.value.status_code == 422 and bad_limit.value.fields == ["query.limit"]
    assert api.listeners() == []  # nothing half-done


def test_no_server_is_an_api_error_without_a_status_after_the_retries(kind):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for client in open_client(kind, url, token=TOKEN, retries=2, retry_backoff=0):
        with pytest.raises(ApiError) as refused:
            client.status()
    assert refused.value.status_code is None
    assert str(refused.value).startswith(f"GET {url}/api/status?minutes=5: no answer after 3 attempts: "
                                         "ConnectError: ")


# Retries (pure logic: a scripted transport) ----------------------------------------


class Script:
    """Fails the first requests as told, then answers; counts the requests."""

    def __init__(self, *failures: Exception) -> None:
        self.failures, self.requests = list(failures), 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        if self.failures:
            raise self.failures.pop(0)
        return httpx.Response(201, json={"id": "evt_1", "event_id": 1})


def refused_connection() -> httpx.ConnectError:
    return httpx.ConnectError("connection refused")


def test_a_request_that_could_not_connect_is_sent_again():
    script = Script(refused_connection(), httpx.ConnectTimeout("timed out"))
    with Client("http://api", retries=2, retry_backoff=0, transport=httpx.MockTransport(script)) as api:
        assert api.send("myhook", n=1).event_id == 1
    assert script.requests == 3


def test_a_request_that_may_have_arrived_is_not_sent_again():
    script = Script(httpx.ReadTimeout("timed out"))
    with (Client("http://api", retries=5, retry_backoff=0,
                 transport=httpx.MockTransport(script)) as api,
          pytest.raises(ApiError, match="no answer: ReadTimeout: timed out") as timed_out):
        api.send("myhook", n=1)
    assert timed_out.value.status_code is None and script.requests == 1


def test_retries_are_counted_in_the_async_client_too():
    script = Script(refused_connection(), refused_connection(), refused_connection())

    async def run() -> None:
        async with AsyncClient("http://api", retries=2, retry_backoff=0,
                               transport=httpx.MockTransport(script)) as api:
            with pytest.raises(ApiError, match="after 3 attempts: ConnectError"):
                await api.send("myhook", n=1)

    asyncio.run(run())
    assert script.requests == 3


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="retries and retry_backoff not negative"):
        Client("http://api", retries=-1)
