"""Bounds on what users give and on what the relay sends (issue 12), against real
PostgreSQL, the web server as a real process on loopback and real receivers.

- A match is at most 32 levels deep, 256 field rules and 64 KiB as JSON, in every
  interface (CLI, REST API, Python API, web form); a send payload at most 32 levels.
- A listener stored with a match beyond the limits (by SQL, or before them) cannot
  break a listing (it shows with the reason) nor the relay (which skips it).
- An event body over [delivery] max_event_bytes, or nested too deeply to encode,
  arrives as a marker without data, with its key.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import psycopg
import pytest
from click.testing import Result
from receivers import InProcessRelay

from cdc_hooks import install as installer
from cdc_hooks.config import Config
from cdc_hooks.errors import ListenerError, MatchError
from cdc_hooks.registry import Registry
from cdc_hooks.registry import send as send_event

Conn = psycopg.Connection[Any]
Cli = Callable[..., Result]

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON_AUTH = {**AUTH, "Content-Type": "application/json"}

CONFIG = f"""
[[hooks]]
name = "person"
table = "person"
events = ["insert", "update"]
provides = ["name", "profile"]

[[hooks]]
name = "myhook"
provides = ["message", "n"]

[delivery]
allow_private_networks = true
retry_schedule = [0.2]

[retention]
interval = 0

[web]
token = "{TOKEN}"
"""


@pytest.fixture
def config(installed: Callable[..., Config]) -> Config:
    return installed(CONFIG, "CREATE TABLE person (id serial PRIMARY KEY, name text, profile jsonb)")


@pytest.fixture
def web(config: Config, serve_web: Callable[[Config], str]) -> Iterator[httpx.Client]:
    """`cdc-hooks web` as a process on a loopback port, and a client of it."""
    with httpx.Client(base_url=serve_web(config), timeout=30) as client:
        yield client


def nested(depth: int, leaf: Any = 1) -> Any:
    """{"a": {"a": ... leaf}}: depth levels of objects."""
    value = leaf
    for _ in range(depth):
        value = {"a": value}
    return value


def nested_text(depth: int) -> str:
    """The JSON of nested(depth), written out (the encoders recurse)."""
    return '{"a":' * depth + "1" + "}" * depth


def store_listener(conn: Conn, match_text: str) -> int:
    """A listener written with SQL, past every check (as before the limits)."""
    row = conn.execute("INSERT INTO cdc_hooks.listeners (hook, url, match, secret) "
                       "VALUES ('person', 'http://127.0.0.1:9/x', %s::jsonb, %s) RETURNING id",
                       (match_text, "whsec_" + "A" * 32)).fetchone()
    return int(row[0])  # type: ignore[index]


def log_in(web: httpx.Client) -> dict[str, str]:
    """Logs in to the pages over plain HTTP: the session cookie is Secure, so it is
    carried by hand. Returns the headers (cookie) for the next requests."""
    page = web.get("/login")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
    cookie = {"Cookie": page.headers["set-cookie"].split(";")[0]}
    answer = web.post("/login", headers=cookie, data={"csrf": csrf, "token": TOKEN, "next": "/"},
                      follow_redirects=False)
    assert answer.status_code == 303, answer.text
    return {"Cookie": answer.headers["set-cookie"].split(";")[0]}


def csrf_of(web: httpx.Client, session: dict[str, str], path: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"',  # type: ignore[union-attr]
                     web.get(path, headers=session).text).group(1)


# A match: depth, field rules, size ---------------------------------------------


def test_the_api_refuses_a_match_beyond_the_limits_naming_them(web):
    listeners = web.get("/api/listeners", headers=AUTH)
    assert listeners.status_code == 200 and listeners.json() == []
    for depth in (33, 300):  # 300: stored, then a 500 for it and every listing after
        answer = web.post("/api/listeners", headers=AUTH, json={
            "hook": "person", "url": "http://127.0.0.1:9/x", "match": {"profile": nested(depth)}})
        assert answer.status_code == 422, answer.text
        assert "body.match" in answer.text and "more than 32 levels deep" in answer.text
    for depth in (900, 5000):  # as raw text: too deep for the client's encoder
        body = '{"hook": "person", "url": "http://127.0.0.1:9/x", "match": {"profile": ' + \
            nested_text(depth) + "}}"
        answer = web.post("/api/listeners", headers=JSON_AUTH, content=body)
        assert 400 <= answer.status_code < 500, answer.text
    many = {"profile": {f"f{i}": i for i in range(257)}}
    answer = web.post("/api/listeners", headers=AUTH,
                      json={"hook": "person", "url": "http://127.0.0.1:9/x", "match": many})
    assert answer.status_code == 422 and "257 field rules, more than the limit of 256" in answer.text
    big = {"name": {"$contains": "x" * 70_000}}
    answer = web.post("/api/listeners", headers=AUTH,
                      json={"hook": "person", "url": "http://127.0.0.1:9/x", "match": big})
    assert answer.status_code == 422 and "more than the limit of 65536" in answer.text
    at_the_limit = {"profile": nested(31)}  # 32 levels with the top object
    made = web.post("/api/listeners", headers=AUTH,
                    json={"hook": "person", "url": "http://127.0.0.1:9/x", "match": at_the_limit})
    assert made.status_code == 201, made.text
    patched = web.patch(f"/api/listeners/{made.json()['id']}", headers=AUTH,
                        json={"match": {"profile": nested(40)}})
    assert patched.status_code == 422 and "more than 32 levels deep" in patched.text
    listeners = web.get("/api/listeners", headers=AUTH)
    assert listeners.status_code == 200
    assert [item["match"] for item in listeners.json()] == [at_the_limit]


def test_the_cli_refuses_a_match_beyond_the_limits(config, cli, conn):
    dotted = "profile" + ".a" * 40 + "=x"
    for option in (dotted, "profile.tags:=" + "[" * 40 + "]" * 40,
                   "profile.tags:=" + "[" * 5000 + "]" * 5000):
        result = cli(config, "listeners", "add", "person", "http://127.0.0.1:9/x", "--match", option)
        assert result.exit_code == 2, result.output
        assert len(result.stderr.splitlines()) == 1 and "more than 32 levels deep" in result.stderr
    options = [f"--match=profile.f{i}=x" for i in range(257)]
    result = cli(config, "listeners", "add", "person", "http://127.0.0.1:9/x", *options)
    assert result.exit_code == 2 and "more than the limit of 256" in result.stderr
    assert conn.execute("SELECT count(*) FROM cdc_hooks.listeners").fetchone() == (0,)


def test_the_python_api_refuses_a_match_beyond_the_limits(config, conn):
    registry = Registry()
    registry.load(config)
    hook = registry.get("person")
    for depth in (40, 300, 5000):
        with pytest.raises(MatchError, match="match is nested more than 32 levels deep"):
            hook.listener("http://127.0.0.1:9/x").match(profile=nested(depth))
    with pytest.raises(MatchError, match="more than 32 levels deep"):
        hook.listener("http://127.0.0.1:9/x").match(profile={"tags": nested(40, [])})
    builder = hook.listener("http://127.0.0.1:9/x")
    for i in range(257):  # each call within the limits: the whole is checked on save
        builder.match(**{f"f{i}": "x"})
    with pytest.raises(MatchError, match="257 field rules"):
        builder.save()
    assert conn.execute("SELECT count(*) FROM cdc_hooks.listeners").fetchone() == (0,)


def test_the_web_form_refuses_a_match_beyond_the_limits(web, conn):
    session = log_in(web)
    csrf = csrf_of(web, session, "/hooks/person/listen")
    for kept in (nested_text(40), nested_text(5000)):
        answer = web.post("/hooks/person/listen", headers=session, data={
            "csrf": csrf, "url": "http://127.0.0.1:9/x", "keep:profile": kept})
        assert answer.status_code == 422, answer.text
        assert "more than 32 levels deep (the limit)" in answer.text
    answer = web.post("/hooks/person/listen", headers=session, data={
        "csrf": csrf, "url": "http://127.0.0.1:9/x", "cond:name": "like", "value:name": "x" * 70_000})
    assert answer.status_code == 422 and "more than the limit of 65536" in answer.text
    assert conn.execute("SELECT count(*) FROM cdc_hooks.listeners").fetchone() == (0,)


# A match stored beyond the limits ------------------------------------------------


def test_a_stored_match_beyond_the_limits_shows_in_listings_and_the_relay_skips_it(
        config, conn, web, cli, receiver, caplog):
    deep = store_listener(conn, '{"profile": ' + nested_text(300) + "}")
    deeper = store_listener(conn, '{"profile": ' + nested_text(5000) + "}")
    good = web.post("/api/listeners", headers=AUTH, json={"hook": "person", "url": receiver.url()})
    assert good.status_code == 201, good.text

    listing = web.get("/api/listeners", headers=AUTH)
    assert listing.status_code == 200, listing.text
    by_id = {item["id"]: item for item in listing.json()}
    for bad in (deep, deeper):
        assert by_id[bad]["match"] is None
        assert "nested" in by_id[bad]["match_error"]
        one = web.get(f"/api/listeners/{bad}", headers=AUTH)
        assert one.status_code == 200 and one.json()["match_error"] == by_id[bad]["match_error"]
    assert by_id[good.json()["id"]]["match"] == {} and by_id[good.json()["id"]]["match_error"] is None

    session = log_in(web)
    page = web.get("/listeners", headers=session)
    assert page.status_code == 200 and page.text.count("unusable: ") == 2
    edit = web.get(f"/listeners/{deep}/edit", headers=session)
    assert edit.status_code == 200 and "the stored filter is unusable" in edit.text
    listed = cli(config, "listeners", "list")
    assert listed.exit_code == 0 and listed.stdout.count("unusable: ") == 2

    caplog.set_level(logging.ERROR, logger="cdc_hooks.relay")
    relay = InProcessRelay(config).start()
    try:
        conn.execute("INSERT INTO person (name) VALUES ('Joe')")
        (received,) = receiver.wait_for(1)
        assert received.json["data"]["name"] == "Joe"
        assert relay._thread.is_alive()
    finally:
        relay.stop()  # raises what the relay died of, if it did
    skipped = {r.listener_id for r in caplog.records  # type: ignore[attr-defined]
               if "is unusable and skipped" in r.getMessage()}
    assert skipped == {deep, deeper}
    # Replacing the match makes the listener usable again.
    fixed = web.patch(f"/api/listeners/{deep}", headers=AUTH, json={"match": {"name": "Joe"}})
    assert fixed.status_code == 200 and fixed.json()["match_error"] is None


# Send payloads ---------------------------------------------------------------------


def test_send_payloads_are_bounded_in_every_interface(config, cli, web, conn):
    result = cli(config, "send", "myhook", "n:=" + nested_text(40))
    assert result.exit_code == 2 and "more than 32 levels deep" in result.stderr, result.output
    result = cli(config, "send", "myhook", "n:=" + "[" * 5000 + "]" * 5000)
    assert result.exit_code == 2 and "more than 32 levels deep" in result.stderr, result.output
    answer = web.post("/api/hooks/myhook/send", headers=AUTH, json={"n": nested(40)})
    assert answer.status_code == 422 and "more than 32 levels deep" in answer.text
    answer = web.post("/api/hooks/myhook/send", headers=JSON_AUTH,
                      content='{"n": ' + nested_text(900) + "}")
    assert answer.status_code == 422 and "more than 32 levels deep" in answer.text
    with pytest.raises(ListenerError, match="the payload is nested more than 32 levels deep"):
        send_event("myhook", {"n": nested(5000)}, config=config)
    assert conn.execute("SELECT count(*) FROM cdc_hooks.outbox").fetchone() == (0,)
    assert cli(config, "send", "myhook", "n:=" + nested_text(31)).exit_code == 0  # 32 levels


# Events: size and depth --------------------------------------------------------------


def test_an_event_over_max_event_bytes_arrives_without_its_data(config, conn, cli, receiver, caplog):
    """A 2 MB value (default limit 1 MiB) is captured (the write never fails) and sent as a
    marker with its key; a normal row arrives whole; listeners still match on the data."""
    cli(config, "listeners", "add", "person", receiver.url("/all"))
    cli(config, "listeners", "add", "person", receiver.url("/big"), "--match", "name=startswith:xx")
    huge = "x" * 2_000_000
    caplog.set_level(logging.WARNING, logger="cdc_hooks.relay")
    relay = InProcessRelay(config).start()
    try:
        conn.execute("INSERT INTO person (id, name) VALUES (1, 'Joe')")
        conn.execute("INSERT INTO person (id, name) VALUES (2, %s)", (huge,))
        conn.execute("UPDATE person SET name = %s || 'y' WHERE id = 2", (huge,))
        received = receiver.wait_for(3, "/all")
        assert [r.json for r in receiver.wait_for(2, "/big")] == [r.json for r in received[1:]]
    finally:
        relay.stop()
    whole, inserted, updated = (r.json for r in received)
    assert whole["data"] == {"name": "Joe", "profile": None} and "truncated" not in whole
    for marker, kind in ((inserted, "insert"), (updated, "update")):
        assert marker["key"] == {"id": 2} and marker["event"] == kind and marker["data"] is None
        assert marker["truncated"]["reason"] == "size" and marker["truncated"]["bytes"] > 2_000_000
        assert marker["id"].startswith("evt_") and marker["occurred_at"]
    assert updated["changes"] is None
    assert all(len(r.body) < 1000 for r in received[1:])
    warnings = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warnings) == 2 and all('hook person, key {"id":2}' in w for w in warnings)
    assert not any("xxxx" in r.getMessage() for r in caplog.records)  # never the values
    stored = conn.execute("SELECT max(length(body::text)) FROM cdc_hooks.events").fetchone()
    assert stored[0] < 1000  # type: ignore[index]


def test_max_event_bytes_counts_utf8_bytes_and_applies_to_custom_events(
        conn, make_config, cli, receiver):
    config = make_config(CONFIG.replace("retry_schedule = [0.2]",
                                        "retry_schedule = [0.2]\nmax_event_bytes = 2000"))
    conn.execute("CREATE TABLE person (id serial PRIMARY KEY, name text, profile jsonb)")
    installer.install(config)
    cli(config, "listeners", "add", "person", receiver.url("/person"))
    cli(config, "listeners", "add", "myhook", receiver.url("/custom"))
    relay = InProcessRelay(config).start()
    try:
        conn.execute("INSERT INTO person (id, name) VALUES (1, %s)", ("é" * 1500,))  # 3000 bytes
        conn.execute("INSERT INTO person (id, name) VALUES (2, %s)", ("é" * 800,))  # 1600 bytes
        assert cli(config, "send", "myhook", "message=" + "m" * 3000).exit_code == 0
        people = receiver.wait_for(2, "/person")
        (custom,) = receiver.wait_for(1, "/custom")
    finally:
        relay.stop()
    assert people[0].json["data"] is None and people[0].json["truncated"]["bytes"] > 3000
    assert people[1].json["data"]["name"] == "é" * 800
    assert custom.json["data"] is None and custom.json["key"] is None
    assert custom.json["truncated"]["reason"] == "size" and custom.json["truncated"]["bytes"] > 3000


def test_an_event_nested_too_deeply_arrives_without_its_data(config, conn, cli, receiver, web):
    """A json column nested 300 levels deep (beyond what the API can show) arrives as a
    marker with its key; one nested 5000 levels (beyond what the relay can even read)
    as a marker without key; the relay goes on."""
    cli(config, "listeners", "add", "person", receiver.url())
    relay = InProcessRelay(config).start()
    try:
        conn.execute("INSERT INTO person (id, profile) VALUES (1, %s::jsonb)", (nested_text(300),))
        conn.execute("INSERT INTO person (id, profile) VALUES (2, %s::jsonb)", (nested_text(5000),))
        conn.execute("INSERT INTO person (id, name) VALUES (3, 'Joe')")
        deep, deeper, whole = (r.json for r in receiver.wait_for(3))
    finally:
        relay.stop()
    assert deep["key"] == {"id": 1} and deep["data"] is None
    assert deep["truncated"] == {"reason": "depth", "bytes": None}
    assert deeper["key"] is None and deeper["data"] is None and deeper["event"] == "insert"
    assert deeper["truncated"] == {"reason": "depth", "bytes": None}
    assert whole["data"]["name"] == "Joe"
    items = web.get("/api/deliveries", headers=AUTH).json()["items"]
    for item in items:  # each delivery and its body can be shown
        assert web.get(f"/api/deliveries/{item['id']}", headers=AUTH).status_code == 200
