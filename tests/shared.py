"""Configs and tables several test files start from (fixtures: conftest.py)."""

from __future__ import annotations

import re
from typing import Any

# The application's table of durian's Person, with a column no hook provides.
PERSON_TABLE = "CREATE TABLE person (id serial PRIMARY KEY, name text, address text, secret text)"

# The person table's hook (a json column to match inside) and a custom hook.
PERSON_HOOKS = """
[[hooks]]
name = "person"
table = "person"
events = ["insert", "update", "delete"]
provides = ["name", "address", "profile"]

[[hooks]]
name = "myhook"
provides = ["message", "n"]
"""
PROFILE_TABLE = ("CREATE TABLE person (id serial PRIMARY KEY, name text, address text, profile jsonb,"
                 " secret text)")

# Loopback receivers need allow_private_networks; a tiny schedule keeps retries fast.
LOOPBACK_DELIVERY = """
[delivery]
allow_private_networks = true
retry_schedule = [0.2, 0.2]
timeout = 2
"""

# A custom hook, and deliveries to loopback receivers retried only after an hour.
PING_HOOK = """
[[hooks]]
name = "ping"
provides = ["n"]

[delivery]
allow_private_networks = true
retry_schedule = [3600]
timeout = 2
"""


def web_section(token: str) -> str:
    return f'\n[web]\ntoken = "{token}"\n'


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def csrf_of(client: Any, path: str = "/listeners") -> str:
    """The CSRF token of a page's form (a logged-in client for any page but /login)."""
    found = re.search(r'name="csrf" value="([^"]+)"', client.get(path).text)
    assert found is not None, path
    return found.group(1)


def login(client: Any, token: str, next_page: str = "/listeners") -> Any:
    """Logs a TestClient in through the login form; the answer (303 when the token is right)."""
    return client.post("/login", data={"csrf": csrf_of(client, "/login"), "token": token,
                                       "next": next_page}, follow_redirects=False)
