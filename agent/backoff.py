"""Exponential backoff with full jitter, and a stop-aware sleep."""

from __future__ import annotations

import asyncio
import contextlib
import random


class Backoff:
    """Delays that double from `initial` up to `maximum`, each drawn uniformly from [d/2, d]."""

    def __init__(self, initial: float, maximum: float, rng: random.Random | None = None) -> None:
        self.initial = initial
        self.maximum = maximum
        self.failures = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        # The exponent is capped: weeks offline means thousands of failures, and 2**1100 is no float.
        ceiling = min(self.maximum, self.initial * 2 ** min(self.failures, 60))
        self.failures += 1
        return self._rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.failures = 0


async def wait_any(seconds: float, *events: asyncio.Event) -> None:
    """Sleep up to `seconds`, waking early when any event is set."""
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        for waiter in waiters:
            with contextlib.suppress(asyncio.CancelledError):
                await waiter
