"""The resend rule every MQTT client follows (hw.backends.mqtt_contract.Retry), without a broker or a clock."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from hw.backends.mqtt_contract import Retry

SEND, WAIT, ABSENT, EXHAUSTED = Retry.SEND, Retry.WAIT, Retry.ABSENT, Retry.EXHAUSTED


def test_sends_at_once_then_after_each_timeout_then_gives_up() -> None:
    r = Retry(timeout=2.0, tries=3, presence_timeout=10.0)
    assert r.step(0.0, True, 0) == (SEND, 0.0)
    assert r.step(0.5, True, 0) == (WAIT, 1.5)
    assert r.step(2.0, True, 0) == (SEND, 0.0)
    assert r.step(4.0, True, 0) == (SEND, 0.0)
    assert r.tries == 3
    assert r.step(6.0, True, 0) == (EXHAUSTED, 0.0)


def test_a_device_coming_back_gets_the_request_again_at_once() -> None:
    r = Retry(timeout=5.0, tries=2, presence_timeout=10.0)
    assert r.step(0.0, True, 0)[0] == SEND
    assert r.step(1.0, False, 0) == (WAIT, 10.0)  # absent: wait for it up to the presence timeout
    assert r.step(3.0, True, 1) == (SEND, 0.0)    # presence back: resend before the timeout,
    assert r.tries == 1                           # which is no new try
    assert r.step(8.0, True, 1)[0] == SEND
    assert r.step(13.0, True, 1)[0] == EXHAUSTED


def test_a_device_absent_for_the_presence_timeout_is_given_up() -> None:
    r = Retry(timeout=1.0, tries=5, presence_timeout=4.0)
    assert r.step(10.0, False, 0) == (WAIT, 4.0)
    assert r.step(12.0, False, 0) == (WAIT, 2.0)
    assert r.step(14.0, False, 0) == (ABSENT, 0.0)


@given(st.lists(st.tuples(st.floats(0, 3), st.booleans(), st.integers(0, 2)), max_size=60),
       st.integers(1, 5))
def test_never_more_sends_than_tries_plus_comebacks(events: list[tuple[float, bool, int]],
                                                    tries: int) -> None:
    r = Retry(timeout=1.0, tries=tries, presence_timeout=2.0)
    now, sends, comebacks, last = 0.0, 0, 0, None
    for dt, online, back in events:
        now += dt
        what, wait = r.step(now, online, back)
        assert wait >= 0
        if online and back != last:
            comebacks += 1
            last = back
        if what == SEND:
            sends += 1
        if what in (ABSENT, EXHAUSTED):
            break
    assert sends <= tries + comebacks
    assert r.tries <= tries + comebacks  # a comeback after a timeout counts as a try
