"""The circuit breaker's states (pure logic; the relay's use of it is in test_relay.py)."""

from __future__ import annotations

from cdc_hooks.relay.circuit import FIRST_PAUSE, MAX_PAUSE, Circuit, counts_as_failure


def test_stays_closed_below_the_threshold() -> None:
    circuit = Circuit()
    assert not circuit.failed("HTTP 500", now=0.0, threshold=3)
    assert not circuit.failed("HTTP 500", now=0.0, threshold=3)
    assert circuit.admits(0.0) == "send"


def test_opens_at_the_threshold_then_probes_once() -> None:
    circuit = Circuit()
    for _ in range(2):
        circuit.failed("timed out", now=10.0, threshold=3)
    assert circuit.failed("timed out", now=10.0, threshold=3)
    assert circuit.admits(10.5) == "skip"
    assert "the last 3 requests failed (last: timed out)" in circuit.skip_error(10.5)
    assert circuit.admits(10.0 + FIRST_PAUSE) == "probe"
    assert circuit.admits(10.0 + FIRST_PAUSE) == "wait"  # one probe at a time


def test_requests_sent_before_it_opened_do_not_extend_the_pause() -> None:
    circuit = Circuit()
    for _ in range(3):
        circuit.failed("HTTP 502", now=0.0, threshold=3)
    assert not circuit.failed("HTTP 502", now=0.5, threshold=3)  # was in flight
    assert circuit.open_until == FIRST_PAUSE


def test_a_failed_probe_doubles_the_pause_up_to_the_cap() -> None:
    circuit = Circuit()
    for _ in range(3):
        circuit.failed("refused", now=0.0, threshold=3)
    now, pauses = 0.0, []
    for _ in range(10):
        now = circuit.open_until
        assert circuit.admits(now) == "probe"
        assert circuit.failed("refused", now=now, threshold=3)
        pauses.append(circuit.pause)
    assert pauses[:3] == [2 * FIRST_PAUSE, 4 * FIRST_PAUSE, 8 * FIRST_PAUSE]
    assert pauses[-1] == MAX_PAUSE


def test_what_counts_as_a_failure() -> None:
    assert counts_as_failure(None, retryable=True)  # no answer: timeout, refused, TLS
    assert counts_as_failure(503, retryable=True)
    assert not counts_as_failure(None, retryable=False)  # refused by the network policy
    assert not counts_as_failure(404, retryable=True)  # an answer: the receiver is up
    assert not counts_as_failure(200, retryable=True)
