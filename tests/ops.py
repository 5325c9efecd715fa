"""Helpers of the operations tests (metrics, logs): a `cdc-hooks ... run` process
with chosen options, scraping /metrics over HTTP and parsing it with
prometheus-client's own parser, and the schema both test files use."""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import psycopg
from click.testing import Result
from prometheus_client.parser import text_string_to_metric_families
from receivers import wait_until
from shared import PERSON_TABLE

from cdc_hooks.config import Config

HOOKS = """
[[hooks]]
name = "person"
table = "person"
events = ["insert", "update", "delete"]
provides = ["name", "address"]
"""

# Loopback receivers need allow_private_networks; a tiny schedule keeps retries fast.
DELIVERY = """
[delivery]
allow_private_networks = true
retry_schedule = [0.2, 0.2]
timeout = 2
"""

TABLE = PERSON_TABLE
TOKEN = "metrics-test-token-0123456789"

Cli = Callable[..., Result]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def add_listener(cli: Cli, config: Config, url: str, *options: str) -> int:
    result = cli(config, "listeners", "add", "person", url, *options)
    assert result.exit_code == 0, result.output
    return int(re.search(r"listener (\d+) added", result.stdout).group(1))  # type: ignore[union-attr]


def settled(conn: psycopg.Connection[Any]) -> bool:
    """Nothing left to dispatch or deliver (dead letters count as settled)."""
    row = conn.execute(
        "SELECT (SELECT count(*) FROM cdc_hooks.outbox)"
        " + (SELECT count(*) FROM cdc_hooks.deliveries WHERE status = 'pending')").fetchone()
    return row is not None and row[0] == 0


def wait_settled(conn: psycopg.Connection[Any]) -> None:
    wait_until(lambda: settled(conn), message="all changes dispatched and delivered")


def fetch(url: str, token: str | None = None) -> tuple[int, str]:
    """(status, body) of a GET, with a Bearer token if given."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def parse(text: str) -> Samples:
    """Every sample of an exposition, by (sample name, labels), via prometheus-client's parser."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(url: str, token: str | None = None) -> Samples:
    status, body = fetch(url, token)
    assert status == 200, body
    return parse(body)


def value(samples: Samples, name: str, **labels: Any) -> float | None:
    return samples.get((name, frozenset((k, str(v)) for k, v in labels.items())))
