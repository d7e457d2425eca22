"""Hybrid logical clocks: encoding, monotonicity under any wall clock, the drift bound, carries."""

from __future__ import annotations

from typing import NamedTuple

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_protocol_strategies import examples

from protocol.errors import ClockDrift
from protocol.hlc import (
    DEFAULT_MAX_DRIFT_MS,
    LOGICAL_BITS,
    LOGICAL_MASK,
    MAX_HLC,
    HybridClock,
    format_hlc,
    logical,
    pack,
    physical_ms,
)

NOW = 1_700_000_000_000
PHYSICAL = st.integers(0, 2**47 - 1)  # MAX_HLC is 2**63 - 1: signed 64-bit storage
LOGICAL = st.integers(0, LOGICAL_MASK)


class Wall:
    """An injected wall clock the test moves by hand (the clock may read it more than once)."""

    def __init__(self, ms: int = NOW) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


@examples(200)
@given(ms=PHYSICAL, counter=LOGICAL)
def test_pack_round_trip(ms: int, counter: int) -> None:
    hlc = pack(ms, counter)
    assert 0 <= hlc <= MAX_HLC
    assert (physical_ms(hlc), logical(hlc)) == (ms, counter)
    assert hlc == ms * 2**LOGICAL_BITS + counter


@examples(200)
@given(a=st.tuples(PHYSICAL, LOGICAL), b=st.tuples(PHYSICAL, LOGICAL))
def test_integer_order_is_time_then_counter(a: tuple[int, int], b: tuple[int, int]) -> None:
    assert (pack(*a) < pack(*b)) == (a < b)


@pytest.mark.parametrize("counter", [-1, LOGICAL_MASK + 1])
def test_pack_refuses_counter_out_of_range(counter: int) -> None:
    with pytest.raises(ValueError, match="logical"):
        pack(NOW, counter)


def test_format_hlc() -> None:
    assert format_hlc(pack(NOW + 42, 7)) == "2023-11-14T22:13:20.042Z+7"


class Step(NamedTuple):
    op: str  # "now", "receive" or "jump"
    ms: int  # the wall clock for "now"/"receive"; the size of a wall clock jump for "jump"
    ahead: int = 0  # "receive": remote ms minus this clock's physical ms (negative: behind)
    counter: int = 0  # "receive": the remote logical counter


steps = st.one_of(
    st.builds(Step, st.just("now"), st.integers(0, 2 * NOW)),
    st.builds(
        Step,
        st.just("receive"),
        st.integers(0, 2 * NOW),
        st.integers(-10 * DEFAULT_MAX_DRIFT_MS, DEFAULT_MAX_DRIFT_MS),
        LOGICAL,
    ),
    st.builds(Step, st.just("jump"), st.integers(-3_600_000, 3_600_000)),
)


@examples(200)
@given(
    start=st.integers(0, 2 * NOW),
    script=st.lists(steps, max_size=60),
    offset=st.integers(-DEFAULT_MAX_DRIFT_MS, DEFAULT_MAX_DRIFT_MS),
)
def test_monotonic_under_any_wall_clock(start: int, script: list[Step], offset: int) -> None:
    """Every timestamp issued or returned exceeds all earlier ones and every remote one received,
    and never falls behind the (offset) wall clock, whatever the wall clock does: set at random,
    or jumping up to an hour back or forward."""
    wall = Wall(start)
    clock = HybridClock(wall, offset_ms=offset)
    previous = clock.last
    for step in script:
        if step.op == "jump":
            wall.ms = max(0, wall.ms + step.ms)
            continue
        wall.ms = step.ms
        physical = max(0, wall.ms + offset)
        if step.op == "now":
            stamp = clock.now()
        else:
            remote = pack(max(0, physical + step.ahead), step.counter)
            stamp = clock.receive(remote)
            assert stamp > remote
        assert stamp > previous
        assert stamp >= pack(physical)
        assert clock.last == stamp
        previous = stamp


@examples(100)
@given(
    ahead=st.integers(1, 10 * DEFAULT_MAX_DRIFT_MS),
    counter=LOGICAL,
    last=st.integers(0, pack(NOW + DEFAULT_MAX_DRIFT_MS)),
    offset=st.integers(-60_000, 60_000),
)
def test_far_future_is_refused_and_does_not_move_the_clock(
    ahead: int, counter: int, last: int, offset: int
) -> None:
    clock = HybridClock(Wall(), last=last, offset_ms=offset)
    remote = pack(NOW + offset + DEFAULT_MAX_DRIFT_MS + ahead, counter)
    with pytest.raises(ClockDrift, match="ahead"):
        clock.receive(remote)
    assert clock.last == last


def test_drift_bound_is_inclusive_and_configurable() -> None:
    clock = HybridClock(Wall(), max_drift_ms=1000)
    at_bound = pack(NOW + 1000, LOGICAL_MASK)
    assert clock.receive(at_bound) == at_bound + 1
    with pytest.raises(ClockDrift):
        clock.receive(pack(NOW + 1001))


def test_received_time_is_kept_after_the_wall_clock_catches_up() -> None:
    wall = Wall()
    clock = HybridClock(wall)
    remote = pack(NOW + 60_000, 5)
    assert clock.receive(remote) == remote + 1
    assert clock.now() == remote + 2  # wall clock is behind: the logical counter runs
    wall.ms = NOW + 120_000
    assert clock.now() == pack(NOW + 120_000)


def test_logical_overflow_carries_into_the_millisecond() -> None:
    clock = HybridClock(Wall(), last=pack(NOW, LOGICAL_MASK))
    assert clock.now() == pack(NOW + 1, 0)
    clock = HybridClock(Wall())
    assert clock.receive(pack(NOW, LOGICAL_MASK)) == pack(NOW + 1, 0)


@examples(50)
@given(ms=st.integers(0, NOW), counter=st.integers(LOGICAL_MASK - 20, LOGICAL_MASK))
def test_counter_runs_through_the_carry(ms: int, counter: int) -> None:
    """With a frozen wall clock, 100 ticks are 100 consecutive integers across the carry."""
    clock = HybridClock(Wall(ms), last=pack(ms, counter))
    ticks = [clock.now() for _ in range(100)]
    assert ticks == list(range(pack(ms, counter) + 1, pack(ms, counter) + 101))


def test_offset_shifts_physical_time_and_clamps_at_zero() -> None:
    assert HybridClock(Wall(), offset_ms=-500).now() == pack(NOW - 500)
    assert HybridClock(Wall(100), offset_ms=-500).now() == pack(0, 1)


def test_observe_raises_last_without_a_drift_check() -> None:
    clock = HybridClock(Wall())
    far = pack(NOW + 10 * DEFAULT_MAX_DRIFT_MS)
    clock.observe(far)
    clock.observe(0)
    assert clock.last == far
    assert clock.now() == far + 1


def test_exhausted_clock_raises() -> None:
    with pytest.raises(OverflowError):
        HybridClock(Wall(), last=MAX_HLC).now()
