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

import os
import subprocess
import sys

import pytest
from receivers import free_port

from cdc_hooks import install as installer
from cdc_hooks.config import load_config

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
