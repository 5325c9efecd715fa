"""Structured logs (issue 7): ``--log-format json`` writes one JSON object per
line with the fields of what happened; in either format, no secret reaches the
log (listener secret, a column the hook does not provide, DSN password, web
token), checked on a real relay process delivering to a loopback receiver."""

from __future__ import annotations

import base64
import json
import logging
import signal
import sys

import pytest
from ops import TOKEN, add_listener, fetch, wait_settled
from receivers import Reply, free_port, wait_until

from cdc_hooks.config import load_config
from cdc_hooks.logs import JsonFormatter

pytest_plugins = ["ops_fixtures"]  # fixtures: setup, receiver, start_relay

LISTENER_SECRET = "whsec_" + base64.b64encode(b"log-test-secret-24-bytes").decode()
COLUMN_SECRET = "column-secret-value-7f3a9c"
DSN_PASSWORD = "dsn-password-5be1d2"


def record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    made = logging.LogRecord("cdc_hooks.relay", logging.WARNING, __file__, 1, message, args, None)
    made.__dict__.update(extra)
    return made


def test_json_line_has_time_level_logger_message_and_extra_fields():
    line = JsonFormatter().format(record("listener %s event %s", 3, 7000, listener_id=3, event_id=7000,
                                         status="pending"))
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "warning" and entry["logger"] == "cdc_hooks.relay"
    assert entry["message"] == "listener 3 event 7000"
    assert (entry["listener_id"], entry["event_id"], entry["status"]) == (3, 7000, "pending")
    assert entry["time"].endswith("Z") and "T" in entry["time"]
    assert "args" not in entry and "msg" not in entry  # LogRecord internals stay out


def test_json_line_carries_the_traceback_and_survives_unusual_values():
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        failed = record("it failed", when=object(), amount=1.5)
        failed.exc_info = sys.exc_info()
    line = JsonFormatter().format(failed)
    assert "\n" not in line
    entry = json.loads(line)
    assert "ValueError: boom" in entry["exception"] and entry["amount"] == 1.5
    assert entry["when"].startswith("<object object")


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_relay_logs_never_contain_secrets(conn, setup, cli, receiver, start_relay, log_format):
    config = setup(f'\n[web]\ntoken = "{TOKEN}"\n')
    assert config.path is not None and config.dsn is not None
    with_password = f'dsn = "{config.dsn} password={DSN_PASSWORD}"'  # trust auth: never asked for
    config.path.write_text(config.path.read_text().replace(f'dsn = "{config.dsn}"', with_password))
    config = load_config(config.path)
    assert DSN_PASSWORD in (config.dsn or "")
    failing = add_listener(cli, config, receiver.url("/fail"), "--secret", LISTENER_SECRET)
    gone = add_listener(cli, config, receiver.url("/gone"), "--secret", LISTENER_SECRET)
    receiver.plan("/fail", Reply(500, body=f"echoing {COLUMN_SECRET}"))
    receiver.set_default("/gone", Reply(410))
    metrics_port, web_port = free_port(), free_port()
    relay = start_relay(config, "--metrics", f"127.0.0.1:{metrics_port}", "--web", f"127.0.0.1:{web_port}",
                        global_args=("--log-format", log_format))
    conn.execute("INSERT INTO person (name, secret) VALUES ('Joe', %s)", (COLUMN_SECRET,))
    conn.execute("UPDATE person SET secret = %s || '!'", (COLUMN_SECRET,))  # no provided column: no event
    wait_settled(conn)
    assert fetch(f"http://127.0.0.1:{metrics_port}/metrics", TOKEN)[0] == 200
    assert fetch(f"http://127.0.0.1:{web_port}/metrics", TOKEN)[0] == 200
    wait_until(lambda: "410 Gone" in relay.log(), message="the 410 is logged")
    assert relay.terminate() == 0
    log = relay.log()
    for secret in (LISTENER_SECRET, LISTENER_SECRET.removeprefix("whsec_"), COLUMN_SECRET,
                   DSN_PASSWORD, TOKEN):
        assert secret not in log
    if log_format == "json":
        check_json_log(log, failing, gone)
    else:
        assert f"listener {failing} event " in log and f"listener {gone} answered 410 Gone" in log


def check_json_log(log: str, failing: int, gone: int) -> None:
    entries = [json.loads(line) for line in log.splitlines() if line.strip()]
    for entry in entries:
        assert {"time", "level", "logger", "message"} <= entry.keys(), entry
    retried = [e for e in entries if e.get("listener_id") == failing and "event_id" in e]
    assert [(e["status"], e["attempt"], e["code"], e["level"]) for e in retried] == [
        ("pending", 1, 500, "warning")]
    assert any(e.get("listener_id") == gone and e.get("status") == "disabled" for e in entries)
    loggers = {e["logger"] for e in entries}
    assert {"cdc_hooks.relay", "cdc_hooks.metrics", "cdc_hooks.web"} <= loggers, loggers
    assert any(e["logger"].startswith("uvicorn") for e in entries), loggers  # others' logs too
    assert not any("color_message" in e for e in entries)


def test_log_format_is_checked(cli, make_config):
    result = cli(make_config(""), "--log-format", "xml", "status")
    assert result.exit_code == 2 and "xml" in result.output


def test_sigterm_still_exits_0_with_json_logs(setup, start_relay):
    relay = start_relay(setup(), global_args=("--log-format", "json"))
    assert relay.terminate(sig=signal.SIGINT) == 0
    assert all(json.loads(line) for line in relay.log().splitlines() if line.strip())
