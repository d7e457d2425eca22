"""agent.backoff: exponential backoff with jitter, and the stop-aware sleep the loops use."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from agent.backoff import Backoff, wait_any


@pytest.mark.parametrize("seed", range(5))
def test_delays_double_up_to_the_maximum_with_jitter(seed: int) -> None:
    backoff = Backoff(1.0, 20.0, random.Random(seed))
    ceilings = [1, 2, 4, 8, 16, 20, 20, 20, 20, 20]
    for ceiling in ceilings:
        delay = backoff.next_delay()
        assert ceiling / 2 <= delay <= ceiling
    assert backoff.failures == len(ceilings)


def test_jitter_spreads_retries_over_the_whole_interval() -> None:
    delays = []
    for seed in range(200):
        backoff = Backoff(10.0, 300.0, random.Random(seed))
        delays.append(backoff.next_delay())
    assert min(delays) < 5.5 and max(delays) > 9.5  # not stuck at one end of [5, 10]
    assert len(set(delays)) == len(delays)


def test_reset_starts_again_from_the_initial_delay() -> None:
    backoff = Backoff(0.5, 60.0, random.Random(1))
    for _ in range(8):
        backoff.next_delay()
    assert backoff.next_delay() > 30
    backoff.reset()
    assert backoff.failures == 0
    assert 0.25 <= backoff.next_delay() <= 0.5
    assert 0.5 <= backoff.next_delay() <= 1.0


def test_weeks_of_failures_keep_the_delay_at_the_maximum() -> None:
    backoff = Backoff(1.0, 300.0, random.Random(3))
    for _ in range(5000):
        delay = backoff.next_delay()
    assert 150.0 <= delay <= 300.0


async def test_wait_any_times_out_or_wakes_on_an_event() -> None:
    stop, other = asyncio.Event(), asyncio.Event()
    started = time.monotonic()
    await wait_any(0.05, stop, other)
    assert time.monotonic() - started >= 0.04

    asyncio.get_running_loop().call_later(0.02, other.set)
    started = time.monotonic()
    await wait_any(10.0, stop, other)
    assert time.monotonic() - started < 5

    stop.set()
    started = time.monotonic()
    await wait_any(10.0, stop)
    assert time.monotonic() - started < 1


async def test_wait_any_leaves_no_task_behind() -> None:
    events = [asyncio.Event() for _ in range(5)]
    before = len(asyncio.all_tasks())
    await wait_any(0.01, *events)
    events[2].set()
    await wait_any(10.0, *events)
    assert len(asyncio.all_tasks()) == before
