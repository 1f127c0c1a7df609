"""The client's adaptive throttle (activities_client/throttle.py): given what the service accepted,
then how much the client sends."""

from __future__ import annotations

import random

import pytest

from activities_client.throttle import AdaptiveThrottle, refusal_probability


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_refusal_probability_is_the_sre_formula() -> None:
    assert refusal_probability(0, 0, 2.0) == 0.0
    assert refusal_probability(100, 50, 2.0) == 0.0  # the service took half: no throttling at ratio 2
    assert refusal_probability(100, 0, 2.0) == pytest.approx(100 / 101)
    assert refusal_probability(300, 100, 2.0) == pytest.approx(100 / 301)


def test_a_service_that_accepts_everything_is_never_throttled() -> None:
    throttle = AdaptiveThrottle(clock=FakeClock(), chance=lambda: 0.0)  # the unluckiest draw
    for _ in range(10_000):
        assert throttle.admits()
        throttle.accepted()


def simulate(capacity: int, wanted: int, seconds: int, ratio: float = 2.0) -> list[tuple[int, int]]:
    """A client wanting `wanted` requests a second of a service accepting `capacity` a second:
    (sent, accepted) per second."""
    clock, draws = FakeClock(), random.Random(7)
    throttle = AdaptiveThrottle(ratio=ratio, clock=clock, chance=draws.random)
    per_second = []
    for _ in range(seconds):
        sent = accepted = 0
        for _ in range(wanted):
            if throttle.admits():
                sent += 1
                if accepted < capacity:
                    accepted += 1
                    throttle.accepted()
        per_second.append((sent, accepted))
        clock.now += 1
    return per_second


@pytest.mark.parametrize("ratio", [1.5, 2.0])
def test_at_three_times_capacity_a_client_sends_about_ratio_times_what_is_accepted(ratio: float) -> None:
    steady = simulate(capacity=1000, wanted=3000, seconds=30, ratio=ratio)[10:]
    sent = sum(s for s, _ in steady)
    accepted = sum(a for _, a in steady)
    assert accepted == 1000 * len(steady)  # the service stays busy
    assert sent / accepted == pytest.approx(ratio, rel=0.1)  # and is sent only `ratio` times that
    assert sent < 3000 * len(steady) * 0.75


def test_when_the_overload_ends_the_throttle_lets_everything_through_again() -> None:
    clock = FakeClock()
    throttle = AdaptiveThrottle(clock=clock, chance=random.Random(3).random)
    for _ in range(5000):
        throttle.admits()  # refused by the service: nothing accepted
    assert sum(throttle.admits() for _ in range(1000)) < 100
    clock.now += throttle.window_s + 1  # the window has passed
    admitted = 0
    for _ in range(1000):
        if throttle.admits():
            admitted += 1
            throttle.accepted()
    assert admitted == 1000


def test_an_outage_is_not_an_overload() -> None:
    """Requests that got no reply at all are not counted: after the outage nothing is held back."""
    throttle = AdaptiveThrottle(clock=FakeClock(), chance=lambda: 0.0)
    for _ in range(1000):
        assert throttle.admits()
        throttle.unanswered()
    assert throttle.admits()


def test_a_request_without_reply_is_uncounted_even_when_its_timeout_ended_in_a_later_second() -> None:
    clock = FakeClock()
    throttle = AdaptiveThrottle(clock=clock, chance=lambda: 0.0)
    for _ in range(100):
        assert throttle.admits()
        clock.now += 1.5  # a 1.5 s timeout
        throttle.unanswered()
    assert throttle.admits()


def test_a_quiet_client_never_throttles_itself() -> None:
    throttle = AdaptiveThrottle(clock=FakeClock(), chance=lambda: 0.0, min_requests=20)
    assert all(throttle.admits() for _ in range(20))  # every one refused by the service, none held back
    assert not throttle.admits()
