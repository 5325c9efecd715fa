"""Prometheus metrics (issue 7): a real relay process serves /metrics
(``run --metrics``, ``run --web``), the web app serves it too (``web``); each
test scrapes over HTTP, parses with prometheus-client's parser and compares
the figures with what the loopback receiver got and the database recorded."""

from __future__ import annotations

import signal

import pytest
from fastapi.testclient import TestClient
from ops import TOKEN, add_listener, fetch, parse, scrape, settled, value, wait_settled
from receivers import Reply, free_port, wait_until

from cdc_hooks.guesses import LIMIT
from cdc_hooks.metrics import BUCKETS
from cdc_hooks.web import create_app

pytest_plugins = ["ops_fixtures"]  # fixtures: setup, receiver, start_relay

D = "cdc_hooks_deliveries_total"


def metrics_url(port: int) -> str:
    return f"http://127.0.0.1:{port}/metrics"


def test_scraped_counters_match_what_was_delivered_and_failed(conn, setup, cli, receiver, start_relay):
    # /bad's circuit opens with its last failure: its deliveries end dead, not waiting.
    config = setup("circuit_breaker = 15\n")
    ok = add_listener(cli, config, receiver.url("/ok"))
    flaky = add_listener(cli, config, receiver.url("/flaky"))
    bad = add_listener(cli, config, receiver.url("/bad"))
    receiver.plan("/flaky", Reply(500))  # the first request fails, the rest succeed
    receiver.set_default("/bad", Reply(503))  # every attempt fails: 3 each, then dead
    port = free_port()
    start_relay(config, "--metrics", f"127.0.0.1:{port}")
    conn.execute("INSERT INTO person (name) SELECT 'p' || i FROM generate_series(1, 4) i")
    conn.execute("INSERT INTO person (name, secret) VALUES ('Joe', 's')")
    wait_settled(conn)
    samples = wait_until(lambda: (s := scrape(metrics_url(port))) and value(
        s, "cdc_hooks_listener_circuit_open", hook="person", listener=bad) == 1 and s,
        message="/bad's circuit open")

    assert value(samples, "cdc_hooks_events_dispatched_total", hook="person") == 5
    expected = {ok: (5, 0, 0), flaky: (5, 1, 0), bad: (0, 10, 5)}  # delivered, retry, dead
    for listener, (delivered, retry, dead) in expected.items():
        labels = {"hook": "person", "listener": listener}
        got = tuple(value(samples, D, outcome=o, **labels) for o in ("delivered", "retry", "dead"))
        assert got == (delivered, retry, dead), listener
        assert value(samples, "cdc_hooks_retries_total", **labels) == retry
        assert value(samples, "cdc_hooks_dead_letters_total", **labels) == dead
    assert sum(len(receiver.received(p)) for p in ("/ok", "/flaky")) == 5 + 6
    # Every attempt of /bad on record is a request that was made.
    sent = conn.execute("SELECT count(*) FROM cdc_hooks.attempt_log a JOIN cdc_hooks.deliveries d"
                        " ON d.id = a.delivery_id WHERE d.listener_id = %s", (bad,)).fetchone()
    assert sent == (len(receiver.received("/bad")),) == (15,)
    check_histograms(conn, samples)
    assert value(samples, "cdc_hooks_database_up") == 1
    assert value(samples, "cdc_hooks_outbox_rows") == 0
    assert value(samples, "cdc_hooks_outbox_oldest_age_seconds") == 0
    for listener in expected:
        labels = {"hook": "person", "listener": listener}
        assert value(samples, "cdc_hooks_deliveries_pending", **labels) == 0
        assert value(samples, "cdc_hooks_oldest_pending_age_seconds", **labels) == 0
        assert value(samples, "cdc_hooks_listener_state", state="active", **labels) == 1
    # /bad's circuit opened (and stays open: nothing since has been answered), no other's.
    assert value(samples, "cdc_hooks_listener_circuit_open", hook="person", listener=bad) == 1
    for listener in (ok, flaky):
        assert value(samples, "cdc_hooks_listener_circuit_open", hook="person", listener=listener) == 0
    assert value(samples, "cdc_hooks_database_reconnects_total") == 0
    assert value(samples, "cdc_hooks_relay_database_connected") == 1
    lag = wait_until(lambda: value(scrape(metrics_url(port)), "cdc_hooks_relay_loop_lag_seconds")
                     is not None, message="a loop lag sample")
    assert lag is True
    assert value(samples, "process_resident_memory_bytes")


def check_histograms(conn, samples) -> None:
    """Per listener: one observation per attempt in the database's attempt log,
    cumulative buckets from 1 ms to 10 s and +Inf."""
    attempts = dict(conn.execute(
        "SELECT d.listener_id, count(*) FROM cdc_hooks.attempt_log a"
        " JOIN cdc_hooks.deliveries d ON d.id = a.delivery_id GROUP BY 1").fetchall())
    name = "cdc_hooks_attempt_duration_seconds"
    for listener, count in attempts.items():
        labels = {"hook": "person", "listener": listener}
        assert value(samples, f"{name}_count", **labels) == count
        assert value(samples, f"{name}_sum", **labels) > 0
        buckets = [value(samples, f"{name}_bucket", le=str(b), **labels) for b in BUCKETS]
        assert None not in buckets and buckets == sorted(buckets)
        assert value(samples, f"{name}_bucket", le="+Inf", **labels) == count


def test_backlog_gauges_show_held_deliveries_and_their_age(conn, setup, cli, receiver, start_relay):
    config = setup()
    listener = add_listener(cli, config, receiver.url())
    assert cli(config, "listeners", "pause", str(listener)).exit_code == 0
    port = free_port()
    start_relay(config, "--metrics", f"127.0.0.1:{port}")
    conn.execute("INSERT INTO person (name) VALUES ('a'), ('b'), ('c')")
    labels = {"hook": "person", "listener": listener}
    samples = wait_until(lambda: (s := scrape(metrics_url(port))) and value(
        s, "cdc_hooks_deliveries_pending", **labels) == 3 and s, message="3 pending deliveries")
    assert value(samples, "cdc_hooks_oldest_pending_age_seconds", **labels) > 0
    assert value(samples, "cdc_hooks_listener_state", state="paused", **labels) == 1
    assert value(samples, "cdc_hooks_listener_state", state="active", **labels) == 0
    assert value(samples, D, outcome="delivered", **labels) is None  # nothing attempted yet
    assert cli(config, "listeners", "resume", str(listener)).exit_code == 0
    wait_settled(conn)
    samples = scrape(metrics_url(port))
    assert value(samples, "cdc_hooks_deliveries_pending", **labels) == 0
    assert value(samples, "cdc_hooks_oldest_pending_age_seconds", **labels) == 0
    assert value(samples, D, outcome="delivered", **labels) == 3
    assert len(receiver.received()) == 3


def test_reconnects_are_counted_and_scrapes_survive_a_lost_connection(conn, setup, cli, receiver,
                                                                      start_relay):
    config = setup()
    listener = add_listener(cli, config, receiver.url())
    port = free_port()
    start_relay(config, "--metrics", f"127.0.0.1:{port}")
    assert value(scrape(metrics_url(port)), "cdc_hooks_database_up") == 1
    conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                 " WHERE datname = current_database() AND pid <> pg_backend_pid()")
    samples = wait_until(lambda: (s := scrape(metrics_url(port))) and value(
        s, "cdc_hooks_relay_database_connected") == 1 and value(
        s, "cdc_hooks_database_reconnects_total") >= 1 and s, message="the relay reconnected")
    assert value(samples, "cdc_hooks_database_up") == 1  # the scrape's own connection came back
    conn.execute("INSERT INTO person (name) VALUES ('after')")
    wait_settled(conn)
    samples = scrape(metrics_url(port))
    assert value(samples, D, hook="person", listener=listener, outcome="delivered") == 1


def test_metrics_need_the_token_when_one_is_configured(conn, setup, cli, start_relay):
    config = setup(f'\n[web]\ntoken = "{TOKEN}"\n')
    port = free_port()
    start_relay(config, "--metrics", f"127.0.0.1:{port}")
    status, body = fetch(metrics_url(port))
    assert status == 401 and "Bearer" in body
    assert fetch(metrics_url(port), "wrong-token-wrong-token")[0] == 401
    assert value(scrape(metrics_url(port), TOKEN), "cdc_hooks_database_up") == 1
    # Guessing is slowed down: after LIMIT wrong tokens, even the right one waits.
    for _ in range(LIMIT - 1):
        assert fetch(metrics_url(port), "wrong-token-wrong-token")[0] == 401
    status, body = fetch(metrics_url(port), TOKEN)
    assert status == 429 and "too many wrong tokens from 127.0.0.1" in body


def test_metrics_public_needs_no_token(conn, setup, cli, start_relay):
    config = setup(f'\n[web]\ntoken = "{TOKEN}"\nmetrics_public = true\n')
    port = free_port()
    start_relay(config, "--metrics", f"127.0.0.1:{port}")
    assert value(scrape(metrics_url(port)), "cdc_hooks_database_up") == 1


def test_metrics_off_loopback_without_a_token_are_refused(setup, cli):
    config = setup()
    result = cli(config, "run", "--metrics", "0.0.0.0:0")
    assert result.exit_code == 2 and "without a token" in result.stderr
    result = cli(config, "run", "--metrics", "nowhere")
    assert result.exit_code == 2 and "expected HOST:PORT" in result.stderr


def test_run_web_serves_the_relay_counters_behind_the_token(conn, setup, cli, receiver, start_relay):
    config = setup(f'\n[web]\ntoken = "{TOKEN}"\n')
    listener = add_listener(cli, config, receiver.url())
    port = free_port()
    relay = start_relay(config, "--web", f"127.0.0.1:{port}")
    conn.execute("INSERT INTO person (name) VALUES ('web')")
    wait_settled(conn)
    url = f"http://127.0.0.1:{port}/metrics"
    wait_until(lambda: fetch(url)[0] == 401, message="the web server answers")
    samples = scrape(url, TOKEN)
    assert value(samples, D, hook="person", listener=listener, outcome="delivered") == 1
    assert value(samples, "cdc_hooks_events_dispatched_total", hook="person") == 1
    assert relay.terminate(sig=signal.SIGTERM) == 0


def test_web_app_metrics_show_the_outbox_waiting_without_a_relay(conn, setup, cli):
    """`cdc-hooks web` alone: database gauges (here: changes no relay took yet)."""
    config = setup()
    add_listener(cli, config, "http://127.0.0.1:9/")
    conn.execute("INSERT INTO person (name) VALUES ('a')")
    conn.execute("INSERT INTO person (name) VALUES ('b')")
    assert not settled(conn)
    with TestClient(create_app(config, token=TOKEN), base_url="https://testserver") as client:
        refused = client.get("/metrics")
        assert refused.status_code == 401 and refused.json()["detail"].startswith("missing or wrong token")
        answer = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    samples = parse(answer.text)
    assert value(samples, "cdc_hooks_outbox_rows") == 2
    assert value(samples, "cdc_hooks_outbox_oldest_age_seconds") > 0
    assert value(samples, "cdc_hooks_database_up") == 1


def test_web_app_metrics_public(setup):
    config = setup('\n[web]\nmetrics_public = true\n')
    with TestClient(create_app(config, token=TOKEN), base_url="https://testserver") as client:
        answer = client.get("/metrics")
    assert answer.status_code == 200
    assert value(parse(answer.text), "cdc_hooks_database_up") == 1


@pytest.mark.parametrize("bad", ["yes", 1])
def test_metrics_public_must_be_a_boolean(make_config, bad):
    from cdc_hooks.errors import ConfigError

    with pytest.raises(ConfigError, match="metrics_public must be true or false"):
        make_config(f"[web]\nmetrics_public = {bad!r}\n".replace("'", '"'))
