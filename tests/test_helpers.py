"""The helpers several modules share (one copy each): a message's first line, the
named SQL blocks, the address a server binds."""

from __future__ import annotations

import socket

import pytest

from cdc_hooks import db
from cdc_hooks.binding import http_url, is_loopback, listen, parse_bind
from cdc_hooks.dsn import connect_error
from cdc_hooks.errors import ConfigError, first_line

REFUSED = ('connection failed: connection to server at "127.0.0.1", port 1 failed: Connection refused\n'
           "\tIs the server running on that host and accepting TCP/IP connections?")


def test_first_line_is_what_happened_not_the_hint_after_it() -> None:
    assert first_line(OSError(REFUSED)).endswith("failed: Connection refused")
    assert first_line(OSError("\n  \n  second\nthird")) == "second"
    assert first_line(KeyError()) == "KeyError"


def test_a_refused_connection_says_refused() -> None:
    # Once the last line: "Is the server running...", without the reason.
    message = connect_error("postgresql://alice:pw-secret@127.0.0.1:1/app", OSError(REFUSED))
    assert message.endswith("Connection refused") and "Is the server running" not in message


@pytest.mark.parametrize("file", ["queries.sql", "demo.sql", "backfill.sql"])
def test_every_sql_file_parses_into_named_blocks(file: str) -> None:
    blocks = db.named_queries(file)
    assert blocks and all(name.isidentifier() and text and not text.endswith(";")
                          for name, text in blocks.items())
    assert all("-- name:" not in text for text in blocks.values())


def test_parse_bind_names_the_option() -> None:
    assert parse_bind("[::1]:8080") == ("::1", 8080) and parse_bind(":9") == ("127.0.0.1", 9)
    with pytest.raises(ConfigError) as refused:
        parse_bind("9464", "--metrics", "127.0.0.1:9464")
    assert str(refused.value) == "--metrics '9464': expected HOST:PORT, such as \"127.0.0.1:9464\""


def test_loopback_and_urls() -> None:
    assert is_loopback("localhost") and is_loopback("127.0.0.2") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.com")
    assert http_url("::1", 80, "/metrics") == "http://[::1]:80/metrics"


def test_listen_makes_tcp_sockets_asyncio_sets_nodelay_on() -> None:
    # proto 0 (socket.create_server's): asyncio leaves Nagle on, each keep-alive request waits.
    with listen("127.0.0.1", 0) as sock:
        assert sock.proto == socket.IPPROTO_TCP
        with pytest.raises(ConfigError, match=r"cannot listen on 127\.0\.0\.1:"):
            listen("127.0.0.1", sock.getsockname()[1])
