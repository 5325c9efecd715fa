"""GuessLimit: pure logic, with a clock the test moves."""

from __future__ import annotations

import sys
import threading

import pytest

from cdc_hooks import guesses
from cdc_hooks.guesses import GuessLimit, TooManyGuesses

TOKEN = "the-right-token-0123456789"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_an_address_is_locked_out_after_the_limit_until_its_oldest_guess_ages_out() -> None:
    clock = Clock()
    limit = GuessLimit(limit=3, window=60.0, clock=clock)
    for _ in range(3):
        assert limit.check("10.0.0.1", "wrong", TOKEN) is False
        clock.now += 10
    with pytest.raises(TooManyGuesses) as refused:
        limit.check("10.0.0.1", TOKEN, TOKEN)  # not even the right token, while locked out
    assert refused.value.retry_after == 30  # the first guess (t=1000) ages out at t=1060
    assert "10.0.0.1" in str(refused.value) and "30 s" in str(refused.value)
    assert limit.check("10.0.0.2", TOKEN, TOKEN) is True  # other addresses are not affected
    clock.now += 30
    assert limit.check("10.0.0.1", TOKEN, TOKEN) is True


def test_an_ipv6_client_is_its_64_network() -> None:
    limit = GuessLimit(limit=2, clock=Clock())
    limit.check("2001:db8:1:2::1", "wrong", TOKEN)
    limit.check("2001:db8:1:2:ffff::9", "wrong", TOKEN)  # another address, same /64
    with pytest.raises(TooManyGuesses):
        limit.check("2001:db8:1:2::77", TOKEN, TOKEN)
    assert limit.check("2001:db8:1:3::1", TOKEN, TOKEN) is True  # the next /64
    assert limit.check("fe80::1%eth0", TOKEN, TOKEN) is True  # a scoped address parses
    limit.check("::ffff:192.0.2.1", "wrong", TOKEN)  # IPv4-mapped: the IPv4 address
    limit.check("192.0.2.1", "wrong", TOKEN)
    assert limit.retry_after("192.0.2.1") > 0


def test_a_missing_token_is_not_a_guess() -> None:
    limit = GuessLimit(limit=2, clock=Clock())
    for _ in range(5):
        assert limit.check("10.0.0.1", None, TOKEN) is False
    assert limit.retry_after("10.0.0.1") == 0


def test_any_text_compares_without_error() -> None:
    limit = GuessLimit(clock=Clock())
    assert limit.check("a", "\udc80 not ascii \u00e9", TOKEN) is False
    assert limit.check("a", TOKEN + "x", TOKEN) is False


def test_memory_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guesses, "MAX_ADDRESSES", 100)
    clock = Clock()
    limit = GuessLimit(limit=1, window=60.0, clock=clock)
    for i in range(1000):
        limit.failed(f"10.0.{i // 256}.{i % 256}")
        clock.now += 1  # older entries age out as newer ones come
    assert len(limit._failures) <= 100
    assert limit.retry_after("10.0.3.231") > 0  # the latest is still locked out


def test_threads_may_check_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The web app checks tokens on worker threads: forgetting stale addresses
    while another thread adds one must not fail."""
    monkeypatch.setattr(guesses, "MAX_ADDRESSES", 50)
    limit = GuessLimit(limit=1, window=0.0)
    errors: list[BaseException] = []

    def guess(thread: int) -> None:
        try:
            for i in range(3000):
                limit.check(f"10.{thread}.{i // 256}.{i % 256}", "wrong", TOKEN)
        except BaseException as exc:  # what a thread raised, for the assert below
            errors.append(exc)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        threads = [threading.Thread(target=guess, args=(t,)) for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []
