"""The admin surface under attack (issue 12), over real HTTP against `cdc-hooks web`
(or `run --web`) as a process, with real PostgreSQL:

- sessions: the cookie is a random id kept server-side, so the login page gives
  nothing to test token guesses against offline, and logging out ends the session
  for every copy of the cookie, in every web process;
- the token's minimum length holds for every source of it;
- bodies: the token (or session) is checked before a body is read, and bodies over
  the limit are refused unread, chunked ones as they stream;
- pages show at most the first 64 KiB of a value, the API all of it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import httpx
import pytest
from receivers import RelayProcess, free_port, wait_until

from cdc_hooks import install as installer
from cdc_hooks.config import Config, load_config

MAX_BODY = 1 << 20  # bytes of a request body, as README documents
PAGE_TEXT = 64 << 10  # bytes of a value a page shows
TOKEN = "security-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HOOKS = """
[[hooks]]
name = "person"
table = "person"
provides = ["name"]

[delivery]
allow_private_networks = true
retry_schedule = [0.2]
"""
CONFIG = HOOKS + f'\n[web]\ntoken = "{TOKEN}"\n'


class WebProcess(RelayProcess):
    """`cdc-hooks web --bind 127.0.0.1:PORT`, or with relay=True `run --web` (a relay beside it)."""

    def __init__(self, config: Config, log_path: Path, *, relay: bool = False) -> None:
        assert config.path is not None
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        bind = f"127.0.0.1:{self.port}"
        if relay:
            super().__init__(config.path, log_path, run_args=("--web", bind))
        else:
            super().__init__(config.path, log_path, command="web", run_args=("--bind", bind))
        self.start()
        wait_until(lambda: "web interface and REST API on" in self.log() or not self.running,
                   message="web interface up")
        assert self.running, self.log()


@pytest.fixture
def config(installed: Callable[..., Config]) -> Config:
    return installed(CONFIG, "CREATE TABLE person (id serial PRIMARY KEY, name text)")


@pytest.fixture
def start_web(config: Config, tmp_path: Path) -> Iterator[Callable[..., WebProcess]]:
    started: list[WebProcess] = []

    def start(relay: bool = False) -> WebProcess:
        started.append(WebProcess(config, tmp_path / f"web-{len(started)}.log", relay=relay))
        return started[-1]

    yield start
    for process in started:
        process.cleanup()


# HTTP as a browser (or an attacker replaying a saved cookie) sends it ---------


def call(web: WebProcess, method: str, path: str, cookies: dict[str, str] | None = None,
         **kwargs: Any) -> httpx.Response:
    """One request with exactly these cookies (httpx would not send Secure ones over http)."""
    headers = dict(kwargs.pop("headers", {}))
    if cookies:
        headers["Cookie"] = "; ".join(f"{name}={value}" for name, value in cookies.items())
    return httpx.request(method, web.url + path, headers=headers, follow_redirects=False,
                         timeout=60, **kwargs)


def kept(cookies: dict[str, str], response: httpx.Response) -> dict[str, str]:
    """The cookies a browser holds after this response (Max-Age=0 deletes one)."""
    jar: SimpleCookie = SimpleCookie()
    for header in response.headers.get_list("set-cookie"):
        jar.load(header)
    held = dict(cookies)
    for name, morsel in jar.items():
        if morsel["max-age"] == "0" or not morsel.value:
            held.pop(name, None)
        else:
            held[name] = morsel.value
    return held


def csrf_in(page: httpx.Response) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]


def log_in(web: WebProcess) -> dict[str, str]:
    """Through the login form: the cookies held afterwards."""
    form = call(web, "GET", "/login")
    cookies = kept({}, form)
    answer = call(web, "POST", "/login", cookies, data={"csrf": csrf_in(form), "token": TOKEN})
    assert answer.status_code == 303 and answer.headers["location"] == "/", answer.text
    return kept(cookies, answer)


def to_login(response: httpx.Response) -> bool:
    return response.status_code == 303 and response.headers["location"].startswith("/login")


def add_listener(web: WebProcess, url: str = "http://127.0.0.1:9/a") -> int:
    made = call(web, "POST", "/api/listeners", headers=AUTH, json={"hook": "person", "url": url})
    assert made.status_code == 201, made.text
    return made.json()["id"]  # type: ignore[no-any-return]


# Sessions (issue 12, items 4 and 11) ---------------------------------------


def test_a_cookie_saved_before_logout_opens_nothing_after_it(start_web):
    web = start_web()
    listener = add_listener(web)
    session = log_in(web)
    page = call(web, "GET", "/listeners", session)
    assert page.status_code == 200 and f"listener-{listener}" in page.text
    csrf = csrf_in(page)
    saved = dict(session)  # what an attacker copied, or a browser that ignores the deletion

    out = call(web, "POST", "/logout", session, data={"csrf": csrf})
    assert out.status_code == 303 and out.headers["location"] == "/login"
    for path in ("/", "/listeners", "/deliveries", "/fragments/overview"):
        assert to_login(call(web, "GET", path, saved)), path
    refused = call(web, "POST", f"/listeners/{listener}/delete", saved, data={"csrf": csrf})
    assert to_login(refused)
    assert call(web, "GET", f"/api/listeners/{listener}", headers=AUTH).status_code == 200
    assert to_login(call(web, "POST", "/logout", saved, data={"csrf": csrf}))
    assert "cdc_hooks_session" not in kept(session, out)  # a browser forgets it too


def _signed_under(value: str, key: str) -> bool:
    """Whether value verifies as itsdangerous' TimestampSigner(key) signs (Starlette's
    session cookie): the offline check an attacker ran for each token guess."""
    data, _, signature = value.rpartition(".")
    derived = hashlib.sha1(b"itsdangerous.Signer" + b"signer" + key.encode()).digest()
    expected = base64.urlsafe_b64encode(hmac.new(derived, data.encode(), hashlib.sha1).digest())
    return hmac.compare_digest(expected.rstrip(b"="), signature.encode())


def _verifies_under_the_token(value: str, token: str) -> bool:
    """Any HMAC keyed by the token (or by the key the old sessions derived from it)
    that a part of the cookie would verify under."""
    keys = [token, hmac.new(token.encode(), b"cdc-hooks web session", hashlib.sha256).hexdigest()]
    parts = value.split(".")
    for key in keys:
        if _signed_under(value, key):
            return True
        for digest in (hashlib.sha1, hashlib.sha256):
            for i, part in enumerate(parts[1:], 1):
                mac = hmac.new(key.encode(), ".".join(parts[:i]).encode(), digest).digest()
                if part.rstrip("=") == base64.urlsafe_b64encode(mac).decode().rstrip("="):
                    return True
    return False


def test_no_cookie_lets_a_token_guess_be_checked_offline(start_web, conn):
    first, second = start_web(), start_web()  # one token, two processes
    issued = [kept({}, call(web, "GET", "/login")) for web in (first, second)]
    values = [value for cookies in issued for value in cookies.values()]
    assert values and len(set(values)) == len(values)  # unrelated, though the token is one
    assert not [v for v in values if _verifies_under_the_token(v, TOKEN)]
    assert to_login(call(first, "GET", "/", issued[0]))  # the login page's cookie is no session

    session = log_in(first)
    assert not [v for v in session.values() if _verifies_under_the_token(v, TOKEN)]
    # Kept in the database: by the SHA-256 of the cookie's id, never the id itself.
    stored = conn.execute("SELECT id_hash FROM cdc_hooks.web_sessions").fetchall()
    assert stored == [(hashlib.sha256(session["cdc_hooks_session"].encode()).digest(),)]
    # So one session works in every web process, and logging out in one ends it in all.
    assert call(second, "GET", "/listeners", session).status_code == 200
    csrf = csrf_in(call(second, "GET", "/listeners", session))
    assert call(second, "POST", "/logout", session, data={"csrf": csrf}).status_code == 303
    assert to_login(call(first, "GET", "/listeners", session))
    assert conn.execute("SELECT count(*) FROM cdc_hooks.web_sessions").fetchone() == (0,)


def test_expired_sessions_are_refused_and_pruned_at_the_next_login(start_web, conn):
    web = start_web()
    old = log_in(web)
    conn.execute("UPDATE cdc_hooks.web_sessions SET expires_at = now() - interval '1 second'")
    assert to_login(call(web, "GET", "/listeners", old))
    new = log_in(web)
    assert call(web, "GET", "/listeners", new).status_code == 200
    assert conn.execute("SELECT count(*) FROM cdc_hooks.web_sessions").fetchone() == (1,)


# The token's minimum length, from every source (item 5) -------------------------


@pytest.mark.parametrize(("command", "web_section", "source"), [
    (["web", "--bind", "127.0.0.1:{port}"], "", "CDC_HOOKS_WEB_TOKEN"),
    (["run", "--web", "127.0.0.1:{port}"], "", "CDC_HOOKS_WEB_TOKEN"),
    (["run", "--metrics", "127.0.0.1:{port}"], "", "CDC_HOOKS_WEB_TOKEN"),
    (["web", "--bind", "127.0.0.1:{port}"], '[web]\ntoken = "short"\n', "[web] token"),
    (["run", "--metrics", "127.0.0.1:{port}"], '[web]\ntoken = "short"\n', "[web] token"),
], ids=["web-env", "run-web-env", "run-metrics-env", "web-config", "run-metrics-config"])
def test_a_short_token_is_refused_from_every_source(conn, make_config, command, web_section, source):
    conn.execute("CREATE TABLE person (id serial PRIMARY KEY, name text)")
    path = make_config(HOOKS).path
    installer.install(load_config(path))  # so a relay would start
    path.write_text(path.read_text() + web_section)  # a bad token fails loading: written after
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if source == "CDC_HOOKS_WEB_TOKEN":
        env["CDC_HOOKS_WEB_TOKEN"] = "a"
    port = free_port()
    argv = [sys.executable, "-m", "cdc_hooks", "--config", str(path),
            *(arg.format(port=port) for arg in command)]
    # Before the fix the server started and accepted "Bearer a": the timeout ends the test.
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"error: {source} must be a string of at least 16 characters"], result.stderr


# Bodies (item 6) ----------------------------------------------------------------


def raw_status(web: WebProcess, head: list[str], body: Iterable[bytes] = (b"{",)) -> int:
    """Sends a request's head and these body bytes on a fresh connection, then reads
    the answer's status: an answer only once the whole announced body was read never comes."""
    with socket.create_connection(("127.0.0.1", web.port), timeout=60) as sock:
        sock.sendall(("\r\n".join([*head, "Host: 127.0.0.1", "", ""])).encode())
        for chunk in body:
            sock.sendall(chunk)
        status_line = sock.makefile("rb").readline()
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    return int(status_line.split()[1])


def chunked(size: int, piece: int = 64 * 1024) -> Iterator[bytes]:
    """Chunks of a body of size bytes (JSON-ish text), without the last, empty one."""
    sent = 0
    while sent < size:
        data = (b'{"url": "' if sent == 0 else b"") + b"a" * min(piece, size - sent)
        data = data[:size - sent]
        sent += len(data)
        yield f"{len(data):x}\r\n".encode() + data + b"\r\n"


def test_the_token_is_checked_before_the_body_is_read(start_web):
    web = start_web()
    malformed = call(web, "POST", "/api/listeners", content=b'{"hook": ',
                     headers={"Content-Type": "application/json"})
    assert malformed.status_code == 401 and malformed.headers["www-authenticate"] == "Bearer"
    huge = f"Content-Length: {100 << 20}"  # announced, never sent
    for path in ("/api/listeners", "/api/hooks/person/send"):
        assert raw_status(web, [f"POST {path} HTTP/1.1", "Content-Type: application/json", huge]) == 401
    form = "Content-Type: application/x-www-form-urlencoded"
    assert raw_status(web, ["POST /hooks/person/listen HTTP/1.1", form, huge]) == 303  # to the login
    assert raw_status(web, ["POST /login HTTP/1.1", form, huge]) == 413  # needs no session: limited


def test_bodies_over_the_limit_are_refused_unread_on_api_and_page_routes(start_web):
    web = start_web()
    bearer = f"Authorization: Bearer {TOKEN}"
    json_type = "Content-Type: application/json"
    over = f"Content-Length: {MAX_BODY + 1}"
    assert raw_status(web, ["POST /api/listeners HTTP/1.1", bearer, json_type, over]) == 413
    assert raw_status(web, ["PATCH /api/listeners/1 HTTP/1.1", bearer, json_type, over]) == 413
    refused = call(web, "POST", "/api/listeners", headers=AUTH,
                   content=json.dumps({"hook": "person", "url": "x" * MAX_BODY}).encode())
    assert refused.status_code == 413 and "1 MiB" in refused.json()["detail"]
    at_limit = b'{"hook": "person", "url": "' + b"a" * (MAX_BODY - 29) + b'"}'
    assert len(at_limit) == MAX_BODY
    assert call(web, "POST", "/api/listeners", headers=AUTH, content=at_limit).status_code == 422

    session = log_in(web)
    cookie = "Cookie: " + "; ".join(f"{k}={v}" for k, v in session.items())
    form = "Content-Type: application/x-www-form-urlencoded"
    assert raw_status(web, ["POST /hooks/person/listen HTTP/1.1", cookie, form, over]) == 413
    page = call(web, "POST", "/hooks/person/listen", session,
                data={"csrf": csrf_in(call(web, "GET", "/listeners", session)), "url": "a" * MAX_BODY})
    assert page.status_code == 413 and "1 MiB" in page.text and "<html" in page.text

    stream = "Transfer-Encoding: chunked"
    assert raw_status(web, ["POST /api/listeners HTTP/1.1", bearer, json_type, stream],
                      chunked(MAX_BODY + 1)) == 413
    assert raw_status(web, ["POST /hooks/person/listen HTTP/1.1", cookie, form, stream],
                      chunked(MAX_BODY + 1)) == 413
    assert call(web, "GET", "/healthz").status_code == 200  # and it still serves


# Huge values on pages (item 12, part) -------------------------------------------


def test_pages_show_the_first_64_kib_of_a_huge_value_and_the_api_all_of_it(start_web, conn, receiver):
    web = start_web(relay=True)
    listener = add_listener(web, receiver.url())
    huge = "é" + "x" * (900 << 10)  # 900 KiB in one column, under [delivery] max_event_bytes
    conn.execute("INSERT INTO person (name) VALUES (%s)", (huge,))
    items = wait_until(lambda: call(web, "GET", f"/api/deliveries?listener={listener}",
                                    headers=AUTH).json()["items"], message="the delivery")
    delivery = items[0]["id"]
    assert call(web, "GET", f"/api/deliveries/{delivery}",
                headers=AUTH).json()["body"]["data"]["name"] == huge

    session = log_in(web)
    for path in (f"/deliveries/{delivery}", "/hooks/person/listen", f"/listeners/{listener}/edit",
                 "/hooks/person/preview?cond%3Aname=startswith&value%3Aname=%C3%A9"):
        page = call(web, "GET", path, session)
        assert page.status_code == 200, path
        assert len(page.content) < PAGE_TEXT + 20_000, (path, len(page.content))
        assert re.search(r"truncated: [\d,]+ bytes in all", page.text), path
    for path in ("/deliveries", "/fragments/deliveries", "/listeners", "/"):
        page = call(web, "GET", path, session)
        assert page.status_code == 200 and len(page.content) < PAGE_TEXT, path
